"""Request ids: one from the caller (or made up) reaches every hop's logs and comes back in responses, trailers
and errors; an unusable one is replaced or refused."""

from __future__ import annotations

import uuid

import grpc
from production_stacks import AUTH, PROMPT, LogCapture, channel_to, rpc_error, wait_until
from production_stacks import plain_stack, stack  # noqa: F401 - fixtures

from specdec.v1 import generation_pb2_grpc, verifier_pb2
from specdec.wire.client import build_request


def test_request_id_reaches_every_hop_and_comes_back(stack):
    stub = generation_pb2_grpc.GenerationStub(channel_to(stack, "coordinator"))
    request_id = "req-" + uuid.uuid4().hex
    request = build_request(token_ids=PROMPT, max_new_tokens=12, mode="sequential")
    request.request_id = ""  # only in the x-request-id header
    with LogCapture() as logs:
        call = stub.GenerateStream(request, metadata=AUTH + [("x-request-id", request_id)], timeout=30)
        chunks = list(call)
        assert chunks and all(chunk.request_id == request_id for chunk in chunks)
        assert dict(call.trailing_metadata())["x-request-id"] == request_id
        wanted = {"/specdec.v1.Generation/GenerateStream", "/specdec.v1.Verifier/Prefill",
                  "/specdec.v1.Verifier/Release", "/specdec.v1.Drafter/Draft",
                  "/specdec.v1.Drafter/Release"}  # Verify calls travel on the coordinator's VerifyStream

        def seen():
            return {e.get("method") for e in logs.entries if e["msg"] == "rpc finished"
                    and e.get("request_id") == request_id}

        assert wait_until(lambda: wanted <= seen(), timeout=2), wanted - seen()
    messages = {(e["logger"], e["msg"]) for e in logs.entries if e.get("request_id") == request_id}
    assert {("coordinator.server", "request finished"), ("verifier_svc.server", "session opened"),
            ("verifier_svc.server", "verify call finished"), ("verifier_svc.server", "session released")} <= messages

    # Unary call: the id comes back in the response and the trailers.
    response, call = stub.Generate.with_call(request, metadata=AUTH + [("x-request-id", request_id)], timeout=30)
    assert response.request_id == request_id and dict(call.trailing_metadata())["x-request-id"] == request_id
    # No id sent: one is made up, and the response body and trailers agree on it.
    response, call = stub.Generate.with_call(request, metadata=AUTH, timeout=30)
    assert len(response.request_id) == 32 and dict(call.trailing_metadata())["x-request-id"] == response.request_id
    # An unusable header value (too long for logs) is replaced, not echoed.
    response, call = stub.Generate.with_call(request, metadata=AUTH + [("x-request-id", "x" * 300)], timeout=30)
    assert dict(call.trailing_metadata())["x-request-id"] == response.request_id != "x" * 300
    # Errors carry it too.
    bad = build_request(token_ids=PROMPT, max_new_tokens=0)
    error = rpc_error(lambda: stub.Generate(bad, metadata=AUTH + [("x-request-id", request_id)], timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(error.trailing_metadata())["x-request-id"] == request_id
    # Each backend echoes the id too, also on errors (here: no token).
    for name, method in (("verifier0", "/specdec.v1.Verifier/Info"), ("drafter", "/specdec.v1.Drafter/Info")):
        info = channel_to(stack, name).unary_unary(method, request_serializer=verifier_pb2.InfoRequest.SerializeToString,
                                                 response_deserializer=verifier_pb2.ModelInfo.FromString)
        _, call = info.with_call(verifier_pb2.InfoRequest(), metadata=AUTH + [("x-request-id", request_id)], timeout=5)
        assert dict(call.trailing_metadata())["x-request-id"] == request_id
        error = rpc_error(lambda: info(verifier_pb2.InfoRequest(), metadata=[("x-request-id", request_id)], timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(error.trailing_metadata())["x-request-id"] == request_id


def test_unusable_request_id_in_the_body_is_rejected_quickly(plain_stack):
    stub = generation_pb2_grpc.GenerationStub(channel_to(plain_stack, "coordinator"))
    request = build_request(token_ids=PROMPT, max_new_tokens=4, request_id="naïve\nid")
    error = rpc_error(lambda: stub.Generate(request, timeout=2))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

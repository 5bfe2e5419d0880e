"""Bearer-token auth on every hop, message-size limits, and per-client concurrency limits (per client id, or per
token with auth_clients_file)."""

from __future__ import annotations

import uuid

import grpc
from conftest import InProcessStack
from production_stacks import AUTH, GREEDY, PROMPT, TOKEN, LogCapture, channel_to, open_sessions, rpc_error, wait_until
from production_stacks import stack  # noqa: F401 - fixtures

from specdec.v1 import drafter_pb2, drafter_pb2_grpc, generation_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from specdec.wire.client import SpecdClient, build_request


def test_bearer_token_is_required_on_every_hop(stack):
    stub = generation_pb2_grpc.GenerationStub(channel_to(stack, "coordinator"))
    request = build_request(token_ids=PROMPT, max_new_tokens=4)
    refused = [[], [("authorization", "Bearer wrong")], [("authorization", TOKEN)],
               [("authorization", f"Bearer {TOKEN}x")], [("authorization", f"Basic {TOKEN}")]]
    for metadata in refused:
        for call in (lambda: stub.Generate(request, metadata=metadata, timeout=5),
                     lambda: stub.GenerateStream(request, metadata=metadata, timeout=5)):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert "bearer token" in error.details()
    # The backends refuse callers without the token too (the coordinator forwards its own).
    verifier = verifier_pb2_grpc.VerifierStub(channel_to(stack, "verifier0"))
    drafter = drafter_pb2_grpc.DrafterStub(channel_to(stack, "drafter"))
    for call in (lambda: verifier.Info(verifier_pb2.InfoRequest(), timeout=5),
                 lambda: verifier.Prefill(verifier_pb2.PrefillRequest(session_id="x", token_ids=[1], sampling=GREEDY,
                                                                      max_new_tokens=1), timeout=5),
                 lambda: drafter.Draft(drafter_pb2.DraftRequest(session_id="x", tokens=[1, 2], max_tokens=2),
                                       timeout=5)):
        assert rpc_error(call).code() == grpc.StatusCode.UNAUTHENTICATED
    assert open_sessions(stack, AUTH) == (0, 0)  # the refused Prefill/Draft opened nothing
    # With `authorization: Bearer <token>` (what SpecdClient sends) it works, unary and streaming.
    with SpecdClient(stack.address, token=TOKEN) as client:
        assert len(client.generate(token_ids=PROMPT, max_new_tokens=4).token_ids) == 4
        assert sum(len(c.token_ids) for c in client.stream(token_ids=PROMPT, max_new_tokens=4)) == 4
    assert verifier.Info(verifier_pb2.InfoRequest(), metadata=AUTH, timeout=5).vocab_size == 256


def test_oversized_messages_are_refused(stack):
    stub = generation_pb2_grpc.GenerationStub(channel_to(stack, "coordinator"))
    limit = 1024 * 1024  # max_message_mb=1
    huge_text = build_request(max_new_tokens=4)
    huge_text.prompt = "a" * (limit + 10)
    huge_ids = build_request(token_ids=[200] * (limit // 2 + 10), max_new_tokens=4)
    for request in (huge_text, huge_ids):
        assert request.ByteSize() > limit
        error = rpc_error(lambda: stub.Generate(request, metadata=AUTH, timeout=10))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    # Under the byte limit but beyond the model's context: a clear INVALID_ARGUMENT, no upstream work.
    long_ids = build_request(token_ids=[1] * 100_000, max_new_tokens=4)
    assert long_ids.ByteSize() < limit
    error = rpc_error(lambda: stub.Generate(long_ids, metadata=AUTH, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "context length" in error.details()
    assert open_sessions(stack, AUTH) == (0, 0)
    with SpecdClient(stack.address, token=TOKEN) as client:
        assert len(client.generate(token_ids=PROMPT, max_new_tokens=4).token_ids) == 4


def test_per_client_concurrency_limit(stack):
    stub = generation_pb2_grpc.GenerationStub(channel_to(stack, "coordinator"))

    def open_stream(client_id=None, tokens=400):
        metadata = AUTH + ([("x-client-id", client_id)] if client_id else [])
        return stub.GenerateStream(build_request(token_ids=PROMPT, max_new_tokens=tokens, mode="sequential"),
                                   metadata=metadata, timeout=60)

    admitted = [open_stream() for _ in range(2)]  # max_concurrency_per_client=2
    firsts = [next(call) for call in admitted]    # both are running
    assert all(first.token_ids for first in firsts)
    error = rpc_error(lambda: open_stream(tokens=4))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per client" in error.details()
    # Another client is not affected.
    other = list(open_stream("another-backend", tokens=4))
    assert other[-1].done and sum(len(c.token_ids) for c in other) == 4
    # The admitted streams run to completion.
    for call, first in zip(admitted, firsts):
        rest = list(call)
        assert rest[-1].done and len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 400
    # Their slots are given back.
    def admitted_again():
        try:
            return list(open_stream(tokens=4))[-1].done
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False

    assert wait_until(admitted_again, timeout=2)


def test_client_tokens_name_the_client_that_limits_count(tiny_dirs, tmp_path):
    """With auth_clients_file each caller's token is its identity: a spoofed x-client-id does not
    escape its per-client limit, and the coordinator's logs name the client."""
    clients = tmp_path / "clients"
    clients.write_text("# client_id token\nalice alice-" + uuid.uuid4().hex + "\n\nbob bob-" + uuid.uuid4().hex + "\n")
    tokens = dict(line.split() for line in clients.read_text().splitlines() if line and not line.startswith("#"))
    dirs = tiny_dirs["llama"]
    running = InProcessStack(dirs["target"], dirs["target"], coordinator_overrides={
        "auth_clients_file": str(clients), "max_concurrency_per_client": 1})
    stub = generation_pb2_grpc.GenerationStub(channel_to(running, "coordinator"))

    def open_stream(client: str | None, tokens_wanted: int, extra=()):
        metadata = ([("authorization", f"Bearer {tokens[client]}")] if client else []) + list(extra)
        return stub.GenerateStream(build_request(token_ids=PROMPT, max_new_tokens=tokens_wanted, mode="sequential"),
                                   metadata=metadata, timeout=60)

    try:
        assert rpc_error(lambda: open_stream(None, 4)).code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = [("authorization", "Bearer not-a-client-token")]
        assert rpc_error(lambda: stub.GenerateStream(build_request(token_ids=PROMPT, max_new_tokens=4),
                                                      metadata=wrong, timeout=10)).code() \
            == grpc.StatusCode.UNAUTHENTICATED
        with LogCapture() as logs:
            held = open_stream("alice", 400)
            assert next(held).token_ids  # alice's one slot is taken
            spoofed = rpc_error(lambda: open_stream("alice", 4, [("x-client-id", "bob")]))
            assert spoofed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            bobs = list(open_stream("bob", 4))
            assert bobs[-1].done and sum(len(c.token_ids) for c in bobs) == 4
            held.cancel()
        finished = [e for e in logs.entries if e["msg"] == "request finished"]
        assert {e.get("client_id") for e in finished} >= {"bob"}
    finally:
        running.close()

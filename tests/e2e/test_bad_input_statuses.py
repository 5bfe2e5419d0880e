"""Bad input through the whole stack: the coordinator, the verifier and the drafter each answer it with a clear
status (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION) and keep serving."""

from __future__ import annotations

import grpc
from service_stubs import GREEDY, status_of, stubs
from service_stubs import stack  # noqa: F401 - a fixture

from specdec.client import SpecdClient
from specdec.v1 import drafter_pb2, verifier_pb2


def test_bad_input_gets_clear_statuses_and_service_keeps_serving(stack):
    running, _ = stack
    verifier, drafter = stubs(stack)
    client = SpecdClient(running.address)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = {
        "empty prompt": lambda: client.generate(token_ids=[], max_new_tokens=4),
        "empty text prompt": lambda: client.generate(prompt="", max_new_tokens=4),
        "too long": lambda: client.generate(token_ids=[1] * 600, max_new_tokens=4),
        "negative temperature": lambda: client.generate(token_ids=[1, 2], max_new_tokens=4, temperature=-1.0),
        "nan temperature": lambda: client.generate(token_ids=[1, 2], max_new_tokens=4, temperature=float("nan")),
        "top_p > 1": lambda: client.generate(token_ids=[1, 2], max_new_tokens=4, temperature=1.0, top_p=1.5),
        "top_p < 0": lambda: client.generate(token_ids=[1, 2], max_new_tokens=4, temperature=1.0, top_p=-0.2),
        "zero tokens": lambda: client.generate(token_ids=[1, 2], max_new_tokens=0),
        "huge tokens": lambda: client.generate(token_ids=[1, 2], max_new_tokens=10**9),
        "prompt out of vocabulary": lambda: client.generate(token_ids=[1, 99999], max_new_tokens=4),
    }
    for name, call in cases.items():
        code, details = status_of(call)
        assert code == invalid, name
        assert details, name
    code, details = status_of(lambda: verifier.Verify(verifier_pb2.VerifyRequest(session_id="nope", committed_len=1)))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown session" in details
    verifier.Prefill(verifier_pb2.PrefillRequest(session_id="oov", token_ids=[1, 2], sampling=GREEDY, max_new_tokens=4))
    code, details = status_of(lambda: verifier.Verify(verifier_pb2.VerifyRequest(session_id="oov", committed_len=2,
                                                                                draft_tokens=[5, 4096])))
    assert code == invalid and "vocabulary" in details
    code, _ = status_of(lambda: verifier.Verify(verifier_pb2.VerifyRequest(session_id="oov", committed_len=7)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = status_of(lambda: drafter.Draft(drafter_pb2.DraftRequest(session_id="d", tokens=[1, 300], max_tokens=2)))
    assert code == invalid
    code, _ = status_of(lambda: drafter.Draft(drafter_pb2.DraftRequest(session_id="ghost", base_len=3, tokens=[1],
                                                                       max_tokens=2)))
    assert code == grpc.StatusCode.NOT_FOUND
    # Still serving afterwards.
    assert len(client.generate(token_ids=[1, 2, 3], max_new_tokens=5).token_ids) == 5

"""What an upstream failure does: one classification (coordinator/backends.py), failover that marks down only
broken verifiers, errors that reach the caller with their own code, and blocks that fit the token budget."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import InProcessStack

from coordinator.backends import Backend, BackendPool, CallContext, Failure, UpstreamError, classify
from coordinator.features import TargetFeatures
from coordinator.verifier_session import VerifierSession
from specdec.client import SpecdClient
from specdec.errors import ContextExhausted, status_for
from specdec.v1 import verifier_pb2

Code = grpc.StatusCode


@pytest.mark.parametrize("code, deadline_passed, failure", [
    (Code.UNAVAILABLE, False, Failure.TRANSPORT),
    (Code.CANCELLED, False, Failure.TRANSPORT),
    (Code.DEADLINE_EXCEEDED, False, Failure.TRANSPORT),   # the backend's slowness, not the caller's deadline
    (Code.DEADLINE_EXCEEDED, True, Failure.REQUEST),
    (Code.RESOURCE_EXHAUSTED, False, Failure.OVERLOAD),
    (Code.NOT_FOUND, False, Failure.SESSION_LOST),
    (Code.INVALID_ARGUMENT, False, Failure.REQUEST),
    (Code.FAILED_PRECONDITION, False, Failure.REQUEST),
    (Code.OUT_OF_RANGE, False, Failure.REQUEST),
    (Code.INTERNAL, False, Failure.INTERNAL),
    (Code.UNKNOWN, False, Failure.INTERNAL),
    (Code.UNAUTHENTICATED, False, Failure.INTERNAL),
])
def test_classification(code, deadline_passed, failure):
    assert classify(code, deadline_passed) is failure


def test_an_exhausted_context_is_out_of_range():
    assert status_for(ContextExhausted("full")) == Code.OUT_OF_RANGE


class ScriptedVerifier:
    """A verifier stub whose Verify fails with the scripted codes, in order, then answers."""

    def __init__(self, verify_errors: list[Code] = ()):
        self.verify_errors = list(verify_errors)
        self.prefills = 0

    async def Prefill(self, request, timeout=None, metadata=None):  # noqa: N802 - the stub's method names
        self.prefills += 1
        return verifier_pb2.PrefillResponse(committed_len=len(request.token_ids))

    async def Verify(self, request, timeout=None, metadata=None):  # noqa: N802
        if self.verify_errors:
            code = self.verify_errors.pop(0)
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), f"scripted {code.name}")
        return verifier_pb2.VerifyResponse(accepted=0, next_token=7, committed_len=request.committed_len + 1)


def _session(first: ScriptedVerifier, second: ScriptedVerifier) -> tuple[VerifierSession, BackendPool]:
    pool = BackendPool([Backend("v0", None, first), Backend("v1", None, second)])
    session = VerifierSession(pool, CallContext([], None, retry_s=60.0),
                              verifier_pb2.PrefillRequest(session_id="s"), TargetFeatures(False))
    return session, pool


async def _open_and_verify(session: VerifierSession) -> verifier_pb2.VerifyResponse:
    await session.open([1, 2, 3], 8)
    response, _seconds = await session.verify(verifier_pb2.VerifyRequest(session_id="s", committed_len=3),
                                              [1, 2, 3], 8)
    return response


@pytest.mark.parametrize("code, marked_down, moved", [
    (Code.UNAVAILABLE, True, True),
    (Code.RESOURCE_EXHAUSTED, False, True),   # busy, not broken: another replica, nothing marked
    (Code.NOT_FOUND, False, False),           # only the session was lost: open it again where it was
])
def test_verify_fails_over_and_marks_down_only_a_broken_verifier(code, marked_down, moved):
    async def scenario():
        first, second = ScriptedVerifier(), ScriptedVerifier()
        session, pool = _session(first, second)
        await session.open([1, 2, 3], 8)
        start = session.backend
        start.stub.verify_errors = [code]
        response, _ = await session.verify(verifier_pb2.VerifyRequest(session_id="s", committed_len=3), [1, 2, 3], 8)
        assert response.next_token == 7
        assert (session.backend is not start) == moved
        assert (not start.healthy) == marked_down
        assert all(b.healthy for b in pool.backends if b is not start)

    asyncio.run(scenario())


@pytest.mark.parametrize("code", [Code.INTERNAL, Code.UNKNOWN, Code.OUT_OF_RANGE, Code.INVALID_ARGUMENT])
def test_request_errors_and_upstream_bugs_reach_the_caller_and_mark_nothing_down(code):
    async def scenario():
        first, second = ScriptedVerifier([code]), ScriptedVerifier([code])
        session, pool = _session(first, second)
        with pytest.raises(UpstreamError) as raised:
            await _open_and_verify(session)
        assert raised.value.code == code
        assert all(b.healthy for b in pool.backends) and first.prefills + second.prefills == 1

    asyncio.run(scenario())


def test_every_replica_overloaded_is_resource_exhausted_and_nothing_is_marked_down():
    class Busy(ScriptedVerifier):
        async def Prefill(self, request, timeout=None, metadata=None):  # noqa: N802
            raise grpc.aio.AioRpcError(Code.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "busy")

    async def scenario():
        session, pool = _session(Busy(), Busy())
        with pytest.raises(UpstreamError) as raised:
            await session.open([1, 2, 3], 8)
        assert raised.value.code == Code.RESOURCE_EXHAUSTED and all(b.healthy for b in pool.backends)

    asyncio.run(scenario())


# -- through real services --------------------------------------------------------------------------

def test_a_verifier_bug_in_one_request_does_not_take_the_verifier_away_from_others(tiny_dirs, monkeypatch):
    from verifier_svc.server import VerifierServicer

    submit = VerifierServicer._submit_verify

    def buggy_for_one_request(self, request):
        if request.request_id == "poison":
            raise RuntimeError("a verifier bug")
        return submit(self, request)

    monkeypatch.setattr(VerifierServicer, "_submit_verify", buggy_for_one_request)
    dirs = tiny_dirs["llama"]
    stack = InProcessStack(dirs["target"], dirs["target"], coordinator_overrides={"drafter_retry_s": 60.0})
    try:
        client = SpecdClient(stack.address)
        with pytest.raises(grpc.RpcError) as raised:
            client.generate(token_ids=[4, 5, 6], max_new_tokens=8, request_id="poison")
        assert raised.value.code() == Code.UNKNOWN  # what gRPC answers for a handler's unexpected exception
        result = client.generate(token_ids=[4, 5, 6], max_new_tokens=8)
    finally:
        stack.close()
    assert len(result.token_ids) == 8 and result.stats["fallback_steps"] == 0


@pytest.mark.parametrize("mode", ["sequential", "overlapped"])
def test_drafts_stop_at_the_token_budget_so_a_full_context_is_never_the_drafters_fault(tiny_dirs, monkeypatch, mode):
    """Prompt plus max_new_tokens fill the target's whole context: a block past the budget would not fit
    (the verifier refuses it), and the drafter is never asked for tokens the request cannot use."""
    from drafter_svc.server import DrafterServicer

    asked = []
    draft = DrafterServicer.Draft

    async def recording_draft(self, request, context):
        asked.append((request.committed_len, request.max_tokens))
        async for message in draft(self, request, context):
            yield message

    monkeypatch.setattr(DrafterServicer, "Draft", recording_draft)
    dirs = tiny_dirs["llama"]
    prompt = [(7 * i) % 250 + 1 for i in range(500)]
    max_new = 512 - len(prompt)                                # the tiny models' whole context
    stack = InProcessStack(dirs["target"], dirs["target"])     # drafting for itself: every draft is accepted
    try:
        client = SpecdClient(stack.address)
        reference = client.generate(token_ids=prompt, max_new_tokens=max_new, mode="target_only").token_ids
        result = client.generate(token_ids=prompt, max_new_tokens=max_new, mode=mode, policy="static",
                                 draft_length=4)
    finally:
        stack.close()
    assert result.token_ids == reference
    assert result.stats["fallback_steps"] == 0 and result.stats["accepted_tokens"] > 0, result.stats
    assert asked and all(committed - len(prompt) + wanted <= max_new - 1 for committed, wanted in asked), asked

"""Every session's Verify calls to a verifier over one VerifyStream (coordinator/verify_stream.py): the
tokens of unary calls, errors that stay with their call, and a lost verifier that fails only its calls."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import InProcessStack, hf_greedy

from coordinator.backends import BackendPool, CallContext, Failure, classify
from coordinator.features import TargetFeatures
from coordinator.verifier_session import VerifierSession
from coordinator.verify_stream import VerifyStream
from specdec.client import SpecdClient
from specdec.config import load_settings
from specdec.sampling_params import SamplingParams, sampling_to_proto
from specdec.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from verifier_svc.server import VerifierServicer, build_servicer, start

Code = grpc.StatusCode
NEW_TOKENS = 16
PROMPTS = [[(11 * i + 7 * j) % 250 + 1 for j in range(4 + i % 5)] for i in range(8)]


@pytest.mark.parametrize("verify_stream", [True, False])
def test_many_sessions_get_the_targets_own_tokens_over_one_stream_or_unary_calls(tiny_dirs, monkeypatch,
                                                                                 verify_stream):
    unary_calls, stream_messages = [], []
    unary, streamed = VerifierServicer.Verify, VerifierServicer.VerifyStream

    async def counted_unary(self, request, context):
        unary_calls.append(request.session_id)
        return await unary(self, request, context)

    async def counted_stream(self, request_iterator, context):
        async for batch in streamed(self, request_iterator, context):
            stream_messages.append(len(batch.results))
            yield batch

    monkeypatch.setattr(VerifierServicer, "Verify", counted_unary)
    monkeypatch.setattr(VerifierServicer, "VerifyStream", counted_stream)
    dirs = tiny_dirs["llama"]
    references = [hf_greedy(dirs["target"], prompt, NEW_TOKENS) for prompt in PROMPTS]
    stack = InProcessStack(dirs["target"], dirs["close"], coordinator_overrides={"verify_stream": verify_stream})

    def generate(prompt, mode):
        with SpecdClient(stack.address) as client:
            return client.generate(token_ids=prompt, max_new_tokens=NEW_TOKENS, mode=mode, policy="static",
                                   draft_length=3).token_ids

    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            for mode in ("target_only", "overlapped"):
                assert list(pool.map(generate, PROMPTS, [mode] * len(PROMPTS))) == references, mode
    finally:
        stack.close()
    if verify_stream:
        assert not unary_calls and sum(stream_messages) >= len(PROMPTS) * NEW_TOKENS // 4
        assert max(stream_messages) > 1  # results of one pass shared a message
    else:
        assert unary_calls and not stream_messages


# -- one verifier (or two) and the stream client in the test's own loop --------------------------------

@contextlib.asynccontextmanager
async def _verifiers(target: str, count: int = 1):
    """(servicers, running servers, addresses) of `count` verifiers serving on loopback."""
    servicers, servers = [], []
    for _ in range(count):
        settings = load_settings("verifier", {"model": target}, environ={})
        servicers.append(build_servicer(settings))
        servers.append(await start(settings, servicers[-1]))
    try:
        yield servicers, servers, [f"127.0.0.1:{server.port}" for server in servers]
    finally:
        for server in servers:
            await server.server.stop(0)


HOLD_S = 60.0  # the longest a test holds a verifier's compute thread, or waits for a state of its calls


@contextlib.contextmanager
def _held(servicer: VerifierServicer):
    """The verifier's compute thread waits meanwhile: calls queue up and stay pending.

    `after_pending` only queues the hold: the compute thread runs it after the step it is about to take,
    and that step computes (and answers) every call that arrived before it woke. So this returns only once
    the thread is inside the hold; until then no call sent in the block could stay pending."""
    holding, gate = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        gate.wait(HOLD_S)

    servicer.core.after_pending(hold)
    assert holding.wait(HOLD_S), "the verifier's compute thread did not take the hold"
    try:
        yield
    finally:
        gate.set()


async def _until(condition, what: str) -> None:
    """Waits, HOLD_S at most, for `condition` (a state of the loop this test runs in) to hold."""
    async def reached():
        while not condition():
            await asyncio.sleep(0.01)
    try:
        await asyncio.wait_for(reached(), HOLD_S)
    except asyncio.TimeoutError:
        raise AssertionError(f"not reached within {HOLD_S}s: {what}") from None


async def _prefill(stub, session_id: str, prompt: list[int]) -> int:
    response = await stub.Prefill(verifier_pb2.PrefillRequest(session_id=session_id, token_ids=prompt,
                                                              sampling=sampling_to_proto(SamplingParams()),
                                                              max_new_tokens=NEW_TOKENS))
    return response.committed_len


def _verify_request(session_id: str, committed: int, **fields) -> verifier_pb2.VerifyRequest:
    return verifier_pb2.VerifyRequest(session_id=session_id, committed_len=committed, **fields)


def test_a_failed_call_fails_alone_with_the_code_unary_verify_would_give(tiny_dirs):
    target = tiny_dirs["llama"]["target"]
    expected = hf_greedy(target, PROMPTS[0], 2)

    async def scenario():
        async with _verifiers(target) as (_servicers, _servers, [addr]), grpc.aio.insecure_channel(addr) as channel:
            stub = verifier_pb2_grpc.VerifierStub(channel)
            committed = await _prefill(stub, "good", PROMPTS[0])
            stream = VerifyStream(stub, [])
            outcomes = await asyncio.gather(
                stream.verify(_verify_request("good", committed), None),
                stream.verify(_verify_request("unknown", committed), None),                # refused on arrival
                stream.verify(_verify_request("good", committed + 5), None),               # refused by the pass
                stream.verify(_verify_request("good", committed, bild_rollback_threshold=-1.0), None),
                return_exceptions=True)
            first = stream._open
            again = await stream.verify(_verify_request("good", outcomes[0].committed_len), 10.0)
            assert stream._open is first and not first.broken  # the stream outlived the failed calls
            unary = [await _unary_code(stub, _verify_request(*args)) for args in
                     [("unknown", committed), ("good", again.committed_len + 5)]]
            return outcomes, again, unary

    outcomes, again, unary = asyncio.run(scenario())
    good, unknown, stale, invalid = outcomes
    assert [good.next_token, again.next_token] == expected
    codes = [err.code() for err in (unknown, stale, invalid)]
    assert codes == [Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT]
    assert codes[:2] == unary
    assert [classify(code) for code in codes] == [Failure.SESSION_LOST, Failure.REQUEST, Failure.REQUEST]


async def _unary_code(stub, request) -> Code:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Verify(request)
    return raised.value.code()


def test_a_timed_out_call_fails_alone(tiny_dirs):
    target = tiny_dirs["llama"]["target"]
    expected = [hf_greedy(target, prompt, 1)[0] for prompt in PROMPTS[:2]]

    async def scenario():
        async with _verifiers(target) as ([servicer], _servers, [addr]), grpc.aio.insecure_channel(addr) as channel:
            stub = verifier_pb2_grpc.VerifierStub(channel)
            committed = [await _prefill(stub, f"s{i}", prompt) for i, prompt in enumerate(PROMPTS[:2])]
            stream = VerifyStream(stub, [])
            with _held(servicer):
                patient = asyncio.ensure_future(stream.verify(_verify_request("s0", committed[0]), None))
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stream.verify(_verify_request("s1", committed[1]), 0.3)
            first = (await patient).next_token
            # The timed-out call still ran on the verifier: its session moved on by one token.
            second = await stream.verify(_verify_request("s1", committed[1] + 1), 10.0)
            return raised.value.code(), first, second.committed_len - committed[1], stream._open.broken

    code, first, advanced, broken = asyncio.run(scenario())
    assert code == Code.DEADLINE_EXCEEDED and classify(code, deadline_passed=True) is Failure.REQUEST
    assert first == expected[0] and advanced == 2 and not broken


def test_a_verifier_lost_mid_stream_fails_its_calls_as_transport_and_they_move_to_another(tiny_dirs):
    target = tiny_dirs["llama"]["target"]
    expected = [hf_greedy(target, prompt, 1)[0] for prompt in PROMPTS]

    async def scenario():
        async with _verifiers(target, 2) as (servicers, servers, addrs):
            pool = BackendPool.connect(addrs, verifier_pb2_grpc.VerifierStub, None, [])
            pool.multiplex_verify([])
            sessions = [VerifierSession(pool, CallContext([], None, retry_s=60.0), verifier_pb2.PrefillRequest(
                session_id=f"s{i}", sampling=sampling_to_proto(SamplingParams())), TargetFeatures(False))
                for i in range(len(PROMPTS))]
            for session, prompt in zip(sessions, PROMPTS):
                await session.open(prompt, NEW_TOKENS)
            lost = sessions[0].backend
            on_lost = [s for s in sessions if s.backend is lost]
            held = servicers[addrs.index(lost.addr)]
            with _held(held):
                calls = [asyncio.ensure_future(s.verify(_verify_request(s.session_id, len(p)), p, NEW_TOKENS))
                         for s, p in zip(sessions, PROMPTS)]
                # The verifier is held, so every call on it stays pending until the server stops.
                await _until(lambda: len(held.core.scheduler._verifies) == len(on_lost),
                             "the calls wait for the held verifier's compute")
                await servers[addrs.index(lost.addr)].server.stop(0)  # as if killed
                responses = await asyncio.wait_for(asyncio.gather(*calls), HOLD_S)
            await pool.close()
            return ([r.next_token for r, _seconds in responses], len(on_lost), lost.healthy,
                    all(s.backend is not lost for s in sessions))

    tokens, moved, lost_healthy, none_left = asyncio.run(scenario())
    assert tokens == expected
    assert 0 < moved < len(PROMPTS) and not lost_healthy and none_left



def test_results_split_into_messages_under_the_byte_budget_in_order():
    from verifier_svc.server import BATCH_BYTES, result_batches

    hidden = common_pb2.HiddenStates(data=bytes(BATCH_BYTES // 3))
    results = [verifier_pb2.VerifyResult(call_id=i, response=verifier_pb2.VerifyResponse(hidden=hidden if i % 2 else None))
               for i in range(7)]
    results.append(verifier_pb2.VerifyResult(call_id=7, response=verifier_pb2.VerifyResponse(
        hidden=common_pb2.HiddenStates(data=bytes(BATCH_BYTES + 1)))))
    batches = list(result_batches(results))
    assert [r.call_id for batch in batches for r in batch.results] == list(range(8))
    assert all(batch.ByteSize() <= BATCH_BYTES for batch in batches[:-1]) and len(batches[-1].results) == 1
    assert len(batches) == 3  # three results of a third each do not fit one message; the oversized one goes alone


def test_a_verifier_without_the_stream_gets_unary_calls(tiny_dirs, monkeypatch):
    async def predates_the_stream(self, request_iterator, context):
        await context.abort(Code.UNIMPLEMENTED, "Method not found!")  # what gRPC answers for an unknown method
        yield

    monkeypatch.setattr(VerifierServicer, "VerifyStream", predates_the_stream)
    target = tiny_dirs["llama"]["target"]
    expected = hf_greedy(target, PROMPTS[0], 2)

    async def scenario():
        async with _verifiers(target) as (_servicers, _servers, [addr]), grpc.aio.insecure_channel(addr) as channel:
            stub = verifier_pb2_grpc.VerifierStub(channel)
            committed = await _prefill(stub, "s", PROMPTS[0])
            stream = VerifyStream(stub, [])
            first = await stream.verify(_verify_request("s", committed), 10.0)
            tried = stream._open
            second = await stream.verify(_verify_request("s", first.committed_len), 10.0)
            return [first.next_token, second.next_token], tried.broken, stream._open is tried

    tokens, tried_broken, not_reopened = asyncio.run(scenario())
    assert tokens == expected and tried_broken and not_reopened

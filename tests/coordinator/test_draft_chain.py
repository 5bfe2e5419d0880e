"""The chain of speculative tokens (coordinator/draft_stream.py) against a scripted Draft stream: no server."""

from __future__ import annotations

import asyncio

import grpc

from coordinator.backends import Backend, BackendPool, CallContext
from coordinator.draft_stream import DraftStream
from coordinator.features import TargetFeatures
from coordinator.rounds import GenerationStats
from specdec.sampling_params import SamplingParams
from specdec.stopping import StopRule
from specdec.v1 import drafter_pb2

NO_STOP = (StopRule.NONE, 0.0)
PROMPT = [1, 2, 3]
_END = object()


class ScriptedCall:
    """A Draft server stream whose messages the test sends; like gRPC's, it still delivers what was
    already on the wire after `cancel()`, then ends with CancelledError."""

    def __init__(self, request: drafter_pb2.DraftRequest):
        self.request = request
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def send(self, *tokens: int) -> None:
        for token in tokens:
            self.queue.put_nowait(drafter_pb2.DraftToken(token=token, drafter_version="v1"))

    def end(self) -> None:
        self.queue.put_nowait(_END)

    def fail(self, code: grpc.StatusCode) -> None:
        self.queue.put_nowait(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "scripted"))

    def cancel(self) -> None:
        self.cancelled = True
        self.queue.put_nowait(asyncio.CancelledError())

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class ScriptedDrafter:
    def __init__(self):
        self.calls: list[ScriptedCall] = []

    def Draft(self, request, timeout=None, metadata=None):  # noqa: N802 - the stub's method name
        self.calls.append(ScriptedCall(request))
        return self.calls[-1]


def _stream() -> tuple[DraftStream, ScriptedDrafter]:
    drafter = ScriptedDrafter()
    pool = BackendPool([Backend("drafter0", channel=None, stub=drafter)])
    stream = DraftStream(pool, CallContext([], None, retry_s=5.0), "session", "request", SamplingParams(),
                         stall_timeout_s=5.0, features=TargetFeatures(False), stats=GenerationStats())
    assert stream.usable()
    return stream, drafter


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _tokens(stream: DraftStream) -> list[int]:
    return [t.token for t in stream.tokens]


def test_accepted_block_with_the_predicted_bonus_keeps_the_chain_and_the_stream():
    async def scenario():
        stream, drafter = _stream()
        stream.keep_drafting(PROMPT, 5, NO_STOP)
        drafter.calls[0].send(10, 11, 12, 13)
        block = await stream.gather(PROMPT, want=2, size=2, horizon=5, stop_rule=NO_STOP, wait_s=None, overlapped=True)
        assert [t.token for t in block] == [10, 11]
        await _settle()
        epoch = stream.epoch
        stream.advance(sent=2, accepted=2, next_token=12)   # the target's bonus is the chain's next token
        assert _tokens(stream) == [13] and stream.epoch == epoch and stream.streaming()
        assert len(drafter.calls) == 1 and not drafter.calls[0].cancelled
        assert stream.stats.stale_draft_tokens == 0

    asyncio.run(scenario())


def test_a_mismatch_resets_the_chain_and_late_tokens_of_the_old_epoch_are_ignored():
    async def scenario():
        stream, drafter = _stream()
        stream.keep_drafting(PROMPT, 5, NO_STOP)
        first = drafter.calls[0]
        first.send(10, 11, 12)
        await _settle()
        epoch = stream.epoch
        stream.advance(sent=2, accepted=1, next_token=40)   # the second draft was rejected
        assert stream.tokens == [] and stream.epoch == epoch + 1 and first.cancelled
        assert stream.stats.stale_draft_tokens == 2        # the rejected draft and the one built on it
        # Tokens the old stream had already sent arrive after the reset: they must not join the new chain.
        first.queue._queue.appendleft(drafter_pb2.DraftToken(token=77))  # noqa: SLF001 - on the wire before the cancel
        committed = PROMPT + [10, 40]
        stream.keep_drafting(committed, 3, NO_STOP)
        second = drafter.calls[1]
        assert second.request.base_len == len(PROMPT) and list(second.request.tokens) == [10, 40]
        second.send(50)
        await _settle()
        assert _tokens(stream) == [50]

    asyncio.run(scenario())


def test_the_first_token_after_an_exhausted_block_must_be_the_bonus():
    async def scenario():
        stream, drafter = _stream()
        stream.keep_drafting(PROMPT, 5, NO_STOP)
        call = drafter.calls[0]
        call.send(10, 11)
        await _settle()
        stream.advance(sent=2, accepted=2, next_token=12)   # the stream has sent nothing past the block yet
        assert stream.tokens == [] and stream.expected_bonus == 12
        call.send(12, 13)                                   # it predicted the bonus: drop it, keep the rest
        await _settle()
        assert _tokens(stream) == [13] and stream.stats.stale_draft_tokens == 0

        stream.advance(sent=1, accepted=1, next_token=20)
        epoch = stream.epoch
        call.send(21)                                       # the stream guessed another bonus: reset
        await _settle()
        assert stream.tokens == [] and stream.epoch == epoch + 1 and call.cancelled
        assert stream.stats.stale_draft_tokens == 1

    asyncio.run(scenario())


def test_an_exhausted_stream_waits_for_new_context():
    async def scenario():
        stream, drafter = _stream()
        stream.keep_drafting(PROMPT, 5, NO_STOP)
        drafter.calls[0].send(10)
        drafter.calls[0].end()                               # one token of five: nothing more to propose
        block = await stream.gather(PROMPT, want=3, size=3, horizon=5, stop_rule=NO_STOP, wait_s=None, overlapped=False)
        assert [t.token for t in block] == [10] and stream.exhausted and stream.base == len(PROMPT)
        stream.keep_drafting(PROMPT, 5, NO_STOP)
        assert len(drafter.calls) == 1                       # no new stream on the same context
        stream.advance(sent=1, accepted=1, next_token=11)
        stream.keep_drafting(PROMPT + [10, 11], 5, NO_STOP)
        request = drafter.calls[1].request
        assert request.base_len == len(PROMPT) and list(request.tokens) == [10, 11] and request.max_tokens == 5

    asyncio.run(scenario())


def test_a_lost_drafter_session_is_resent_in_full():
    async def scenario():
        stream, drafter = _stream()
        stream.keep_drafting(PROMPT, 2, NO_STOP)
        drafter.calls[0].send(10, 11)
        drafter.calls[0].end()
        await _settle()
        stream.advance(sent=2, accepted=2, next_token=12)
        committed = PROMPT + [10, 11, 12]
        stream.keep_drafting(committed, 2, NO_STOP)
        assert drafter.calls[1].request.base_len == len(PROMPT)
        drafter.calls[1].fail(grpc.StatusCode.NOT_FOUND)     # the drafter restarted and lost the session
        block = await stream.gather(committed, want=2, size=2, horizon=2, stop_rule=NO_STOP, wait_s=None, overlapped=False)
        assert block == [] and stream.failure is None and stream.stats.fallback_steps == 0
        assert stream.drafter.healthy and not stream.disabled
        stream.keep_drafting(committed, 2, NO_STOP)
        request = drafter.calls[2].request
        assert request.base_len == 0 and list(request.tokens) == committed

    asyncio.run(scenario())

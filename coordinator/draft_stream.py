"""The chain of speculative tokens past the committed text, fed by the drafter's `Draft` server stream.

A stream drafts on top of the committed text plus the chain so far. After a verification the chain
moves on only if the whole block was accepted and its next token is the target's bonus token (or,
when the stream has sent nothing past the block yet, its first token must be). Anything else resets
the chain: the epoch goes up, the stream is cancelled, and tokens still arriving from a stream of an
older epoch are ignored. Only the verifier commits tokens, so a wrong chain costs time, never output.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from coordinator.backends import Backend, BackendPool, CallContext, Failure, classified
from coordinator.features import TargetFeatures
from coordinator.rounds import GenerationStats
from specdec import metrics
from specdec.sampling_params import SamplingParams, sampling_to_proto
from specdec.stopping import StopRule
from specdec.v1 import drafter_pb2

log = logging.getLogger(__name__)


class DraftStream:
    def __init__(self, drafters: BackendPool, calls: CallContext, session_id: str, request_id: str,
                 sampling: SamplingParams, stall_timeout_s: float, features: TargetFeatures, stats: GenerationStats):
        self.drafters, self.calls = drafters, calls
        self.session_id, self.request_id, self.sampling = session_id, request_id, sampling
        self.stall_timeout_s = stall_timeout_s
        self.features, self.stats = features, stats
        self.drafter: Backend | None = None
        self.disabled = False                 # the drafter failed this request in a way retrying cannot fix
        self.sessions: set[str] = set()       # drafters that may hold this request's session
        self.base = 0                         # committed[:base] is known to the drafter's session
        self.hidden_rows = 0                  # target feature rows the drafter's session has
        self.tokens: list[drafter_pb2.DraftToken] = []
        self.epoch = 0
        self.arrived = asyncio.Event()        # set on every token and when a stream ends
        self.call = None
        self.task: asyncio.Task | None = None
        self.exhausted = False                # the stream ended early: wait for new context
        self.failure: tuple[Failure, str] | None = None
        self.progress_at = 0.0                # when the stream started or last sent a token (monotonic)
        self.expected_bonus: int | None = None
        self.intervals: list[tuple[float, float]] = []

    # -- which drafter ------------------------------------------------------------------------------

    def usable(self) -> bool:
        """Whether a drafter can draft for this request, picking a healthy one if needed."""
        if self.disabled or not self.drafters.backends:
            return False
        if self.drafter is None or not self.drafter.healthy:
            self.drafter = self.drafters.pick(self.session_id)
        return self.drafter is not None

    def ready(self) -> bool:
        """Whether the drafter in use is still healthy (no new pick)."""
        return not self.disabled and self.drafter is not None and self.drafter.healthy

    def streaming(self) -> bool:
        return self.task is not None and not self.task.done()

    # -- gathering a block --------------------------------------------------------------------------

    async def gather(self, committed: list[int], want: int, size: int, horizon: int,
                     stop_rule: tuple[StopRule, float], wait_s: float | None,
                     overlapped: bool) -> list[drafter_pb2.DraftToken]:
        """Up to `size` chain tokens once `want` exist, the stream ends, or `wait_s` passes; [] when the
        drafter has nothing to give (then it is marked as the failure says)."""
        self.keep_drafting(committed, horizon, stop_rule)
        wait_until = time.monotonic() + wait_s if wait_s is not None else float("inf")
        while True:
            stream_done = not self.streaming()
            if len(self.tokens) >= want or (stream_done and self.tokens):
                if overlapped:
                    self.keep_drafting(committed, horizon, stop_rule)  # keep drafting while the target verifies
                return self.tokens[:size]
            if stream_done:
                if self.failure is not None:
                    failure, reason = self.failure
                    return self.fail(f"draft stream failed: {reason}", failure)
                return []  # the drafter had nothing to propose: one target-only step
            now = time.monotonic()
            stalled_at = self.progress_at + self.stall_timeout_s
            if now >= stalled_at:
                return self.fail(f"no draft token within {self.stall_timeout_s}s", Failure.TRANSPORT)
            if now >= wait_until:
                # Waiting longer would not pay: verify what exists while the stream keeps drafting.
                self.stats.early_verify_rounds += 1
                return self.tokens[:size]
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), min(stalled_at, wait_until) - now)
            except asyncio.TimeoutError:
                pass

    def keep_drafting(self, committed: list[int], horizon: int, stop_rule: tuple[StopRule, float]) -> None:
        """Starts a stream when none runs and the chain is shorter than `horizon`."""
        if not self.streaming() and not self.exhausted and len(self.tokens) < horizon:
            self._start(committed, horizon - len(self.tokens), stop_rule)

    def _start(self, committed: list[int], max_tokens: int, stop_rule: tuple[StopRule, float]) -> None:
        rule, threshold = stop_rule
        base = self.base
        request = drafter_pb2.DraftRequest(
            session_id=self.session_id, base_len=base, tokens=committed[base:] + [t.token for t in self.tokens],
            max_tokens=max_tokens, sampling=sampling_to_proto(self.sampling), stop_rule=int(rule),
            stop_threshold=threshold, request_id=self.request_id,
            hidden=self.features.since(self.hidden_rows if base else 0), committed_len=len(committed))
        self.failure = None
        self.exhausted = False
        self.progress_at = time.monotonic()
        call = self.drafter.stub.Draft(request, timeout=self.calls.timeout(), metadata=self.calls.metadata)
        self.sessions.add(self.drafter.addr)
        self.call = call
        self.task = asyncio.ensure_future(self._consume(call, self.epoch, len(committed), max_tokens,
                                                        self.features.rows))

    async def _consume(self, call, epoch: int, synced_len: int, requested: int, synced_hidden: int) -> None:
        started = time.perf_counter()
        received = 0
        try:
            async for message in call:
                if epoch != self.epoch:
                    return
                self.progress_at = time.monotonic()
                # Any message proves the drafter synced its session to our context.
                self.base = max(self.base, synced_len)
                self.hidden_rows = max(self.hidden_rows, synced_hidden)
                received += 1
                if self.expected_bonus is not None:
                    bonus, self.expected_bonus = self.expected_bonus, None
                    if message.token == bonus:
                        continue  # the target already committed this very token
                    self.stats.stale_draft_tokens += 1
                    self.reset()
                    return
                if message.drafter_version != self.stats.drafter_version:
                    self.stats.drafter_version = message.drafter_version
                    metrics.set_drafter_version(message.drafter_version)  # follows hot swaps
                self.tokens.append(message)
                self.arrived.set()
            if epoch == self.epoch:
                self.base = max(self.base, synced_len)
                self.exhausted = received < requested
                if self.drafter is not None:
                    self.drafters.mark_up(self.drafter)
        except grpc.aio.AioRpcError as err:
            if epoch != self.epoch or err.code() == grpc.StatusCode.CANCELLED:
                return
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self.calls.deadline_passed():
                return  # the request's own deadline, not the drafter's fault: the next step raises it
            failure = classified("drafter", err, deadline_passed=False)
            if failure is Failure.SESSION_LOST:
                # The drafter lost the session (restart, TTL, hot swap): resend the whole context next time.
                self.base, self.hidden_rows = 0, 0
                self.exhausted = False
                return
            self.failure = (failure, f"{err.code().name} {err.details()}")
        except asyncio.CancelledError:
            pass
        finally:
            self.intervals.append((started, time.perf_counter()))
            if epoch == self.epoch:
                self.task = None
                self.call = None
            self.arrived.set()

    # -- after a verification -----------------------------------------------------------------------

    def advance(self, sent: int, accepted: int, next_token: int) -> None:
        """Keeps the speculative tokens that sit on the committed path, drops the rest."""
        rest = self.tokens[sent:] if accepted == sent else None
        if rest is None:
            self.stats.stale_draft_tokens += len(self.tokens) - accepted
            self.reset()
        elif rest and rest[0].token == next_token:
            self.tokens = rest[1:]
        elif rest:
            self.stats.stale_draft_tokens += len(rest)
            self.reset()
        else:
            self.tokens = []
            if self.streaming() and self.expected_bonus is None:
                self.expected_bonus = next_token  # the stream's next token must match it
            elif self.streaming():
                self.reset()  # two tokens committed past a stream that has sent none: restart it
        self.exhausted = False

    def reset(self) -> None:
        """Drops speculative tokens and stops the stream producing more on top of them."""
        self.epoch += 1
        self.tokens.clear()
        self.expected_bonus = None
        self.exhausted = False
        if self.call is not None:
            self.call.cancel()
        self.call = None
        self.task = None

    def fail(self, reason: str, failure: Failure = Failure.TRANSPORT) -> list:
        """Falls back to the target for this round. A broken drafter (unreachable, stalled, or drafting what
        the verifier refuses) is marked down for everyone; overload marks nothing (another round may find it
        free); a request error or an upstream bug stops drafting for this request only."""
        log.warning("drafter unavailable, falling back to the target", extra={"fields": {
            "addr": self.drafter.addr if self.drafter else "", "reason": reason, "failure": failure.value}})
        if self.drafter is not None and failure is Failure.TRANSPORT:
            self.drafters.mark_down(self.drafter, self.calls.retry_s)
        self.disabled |= failure in (Failure.REQUEST, Failure.INTERNAL)
        self.reset()
        self.drafter, self.base, self.hidden_rows, self.failure = None, 0, 0, None
        self.stats.fallback_steps += 1
        metrics.FALLBACK_STEPS.inc()
        return []

    def close(self) -> None:
        if self.call is not None:
            self.call.cancel()

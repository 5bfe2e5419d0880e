"""The decoding loop: drafter and verifier rounds, sequential or PEARL-overlapped.

One `Generation` per request. Its loop, in numbered steps:
1. open a verifier session (prefill), failing over to another verifier if needed;
2. gather a draft block from the chain of speculative tokens the drafter
   streams; in overlapped mode the stream keeps running while blocks are
   verified (post-verify) and a block may be as short as one token, so the
   verifier starts as soon as the first draft token exists (pre-verify);
3. verify the block; an empty block is a target-only step (drafter down,
   too slow, nothing to propose, or the policy judged speculation not to pay);
4. commit the accepted prefix plus the correction/bonus token, drop draft
   tokens built on a rejected prefix, and cut at stop conditions.

Only tokens returned by the verifier are ever committed, so stale or garbage
drafts can cost time but never change the output.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import grpc
from specdec.v1 import common_pb2, drafter_pb2, verifier_pb2

from coordinator.backends import TRANSPORT_ERRORS, Backend, BackendPool
from coordinator.policies import DraftLengthPolicy, DraftWait, PostVerify
from specdec import metrics
from specdec.sampling_params import SamplingParams, sampling_to_proto

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 1.0


class UpstreamError(Exception):
    """A failure to report to the caller with the upstream status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class DrafterFault(Exception):
    """The verifier refused what the drafter produced (garbage tokens or probabilities)."""


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    policy: DraftLengthPolicy
    mode: str = "overlapped"                    # sequential | overlapped | target_only
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    bild_rollback_threshold: float = 0.0        # > 0: LOSSY, opt-in
    exclude_from_training: bool = False
    deadline: float | None = None               # time.monotonic() deadline


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    fallback_steps: int = 0
    stale_draft_tokens: int = 0
    speculation_off_rounds: int = 0
    early_verify_rounds: int = 0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    hidden_draft_ms: float = 0.0
    lossy: bool = False
    drafter_version: str = ""
    policy: str = ""
    mode: str = ""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per verification round (accepted drafts plus the target's token)."""
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / (self.total_ms / 1e3) if self.total_ms > 0 else 0.0


@dataclass
class VerifiedBlock:
    """What one verification saw; handed to the trace sink."""

    request: GenerationRequest
    context_ids: list[int]            # committed before the block
    draft: list[drafter_pb2.DraftToken]
    response: verifier_pb2.VerifyResponse
    drafter_version: str
    target_version: str


def _overlap_ms(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> float:
    """Total time (ms) covered by both sets of (start, end) intervals."""
    total = 0.0
    for start, end in first:
        for s2, e2 in second:
            if e2 <= start or s2 >= end:
                continue
            total += min(end, e2) - max(start, s2)
    return total * 1e3


class Generation:
    def __init__(self, request: GenerationRequest, verifiers: BackendPool, drafters: BackendPool,
                 metadata: list[tuple[str, str]], drafter_timeout_s: float, drafter_retry_s: float,
                 trace_sink: Callable[[VerifiedBlock], None] | None = None, target_version: str = "",
                 trace_top_k: int = 0, target_hidden: bool = False, draft_wait: DraftWait | None = None,
                 post_verify: PostVerify | bool = True):
        self.req = request
        self.verifiers, self.drafters = verifiers, drafters
        self.metadata = metadata
        self.drafter_timeout_s, self.drafter_retry_s = drafter_timeout_s, drafter_retry_s
        self.trace_sink, self.target_version, self.trace_top_k = trace_sink, target_version, trace_top_k
        self.draft_wait = draft_wait if request.mode == "overlapped" else None
        self.post_verify = post_verify  # overlapped mode: draft past the block being verified (True, False, or measured)
        self.session_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        self.committed: list[int] = list(request.prompt_ids)
        self.stats = GenerationStats(prompt_tokens=len(request.prompt_ids), policy=request.policy.name,
                                     mode=request.mode)
        self.finish_reason = ""
        self.verifier: Backend | None = None
        self.verifier_addrs_used: set[str] = set()
        # Drafter state: the chain of speculative tokens past `committed`.
        self.drafter: Backend | None = None
        self.drafter_sessions: set[str] = set()
        self.drafter_base = 0                 # committed[:drafter_base] is known to the drafter's session
        self.chain: list[drafter_pb2.DraftToken] = []
        self.chain_epoch = 0
        self.chain_event = asyncio.Event()
        self.stream_call = None
        self.stream_task: asyncio.Task | None = None
        self.stream_exhausted = False         # the stream ended early; wait for new context
        self.stream_error: grpc.aio.AioRpcError | None = None
        self.stream_progress_at = 0.0         # when the stream started or last sent a token (monotonic)
        self.expected_bonus: int | None = None
        # The target's features of committed positions (float16 rows), for feature-level drafters.
        self.target_hidden = target_hidden and request.mode != "target_only"
        self.hidden = bytearray()
        self.hidden_size = 0
        self.drafter_hidden = 0               # rows the drafter's session has
        self.draft_intervals: list[tuple[float, float]] = []
        self.verify_intervals: list[tuple[float, float]] = []
        self._started = 0.0

    # -- public -------------------------------------------------------------------------------------

    async def stream(self) -> AsyncIterator[list[int]]:
        """Yields newly committed tokens until a stop condition; cleans up sessions on exit."""
        self._started = time.perf_counter()
        try:
            await self._open_verifier()
            while not self.finish_reason:
                round_started = time.perf_counter()
                block = await self._gather_block()
                response = await self._verify(block)
                round_s = time.perf_counter() - round_started
                self.req.policy.record_round(response.accepted + 1, round_s)
                if block and self._post_verify_matters():
                    self.post_verify.record(response.accepted + 1, round_s)
                new_tokens = self._apply(block, response)
                self._draft_ahead()
                if new_tokens:
                    if not self.stats.ttft_ms:
                        self.stats.ttft_ms = (time.perf_counter() - self._started) * 1e3
                    yield new_tokens
        finally:
            self.stats.total_ms = (time.perf_counter() - self._started) * 1e3
            self._close_draft_interval()
            self.stats.draft_ms = sum(e - s for s, e in self.draft_intervals) * 1e3
            self.stats.verify_ms = sum(e - s for s, e in self.verify_intervals) * 1e3
            self.stats.hidden_draft_ms = _overlap_ms(self.draft_intervals, self.verify_intervals)
            await asyncio.shield(self._release())

    @property
    def generated(self) -> list[int]:
        return self.committed[len(self.req.prompt_ids):]

    # -- step 1: verifier sessions with failover ----------------------------------------------------

    def _timeout(self, cap: float | None = None) -> float | None:
        if self.req.deadline is None:
            return cap
        remaining = self.req.deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request deadline passed")
        return min(remaining, cap) if cap else remaining

    async def _open_verifier(self, exclude: set[str] = frozenset()) -> None:
        last_error = "no verifier is configured"
        tried = set(exclude)
        while True:
            backend = self.verifiers.pick(self.session_id, tried)
            if backend is None:
                raise UpstreamError(grpc.StatusCode.UNAVAILABLE, f"no healthy verifier left: {last_error}")
            remaining = max(self.req.max_new_tokens - len(self.generated), 0)
            # Recorded before the call: a request abandoned mid-Prefill must still release what it opened.
            self.verifier_addrs_used.add(backend.addr)
            try:
                response = await backend.stub.Prefill(verifier_pb2.PrefillRequest(
                    session_id=self.session_id, token_ids=self.committed, sampling=sampling_to_proto(self.req.sampling),
                    max_new_tokens=remaining, request_id=self.req.request_id, return_hidden=self.target_hidden),
                    timeout=self._timeout(), metadata=self.metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() not in TRANSPORT_ERRORS or err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self._deadline_passed():
                    raise UpstreamError(err.code(), err.details() or "verifier refused the prompt") from None
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.verifiers.mark_down(backend, self.drafter_retry_s)
                last_error = f"{backend.addr}: {err.code().name} {err.details()}"
                log.warning("verifier prefill failed", extra={"fields": {"addr": backend.addr, "error": last_error}})
                tried.add(backend.addr)
                continue
            self.verifier = backend
            self._store_hidden(response.hidden)
            return

    def _deadline_passed(self) -> bool:
        return self.req.deadline is not None and time.monotonic() >= self.req.deadline

    # -- step 2: gather a block from the drafter's stream -------------------------------------------

    def _drafter_usable(self) -> bool:
        if self.req.mode == "target_only" or not self.drafters.backends:
            return False
        if self.drafter is None or not self.drafter.healthy:
            self.drafter = self.drafters.pick(self.session_id)
        return self.drafter is not None

    async def _gather_block(self) -> list[drafter_pb2.DraftToken]:
        policy = self.req.policy
        if self.req.mode != "target_only" and policy.block_size() == 0:
            # The policy turned speculation off: stop the drafter competing for compute meanwhile.
            if self.chain or self._streaming():
                self._reset_chain()
            self.stats.speculation_off_rounds += 1
            return []
        if not self._drafter_usable():
            if self.drafters.backends and self.req.mode != "target_only":
                self.stats.fallback_steps += 1
                metrics.FALLBACK_STEPS.inc()
            return []
        overlapped = self.req.mode == "overlapped"
        want, size, horizon = self._block_plan()
        self._keep_drafting(horizon)
        budget = self.draft_wait.budget_s() if self.draft_wait is not None else None
        wait_until = time.monotonic() + budget if budget is not None else float("inf")
        while True:
            stream_done = not self._streaming()
            if len(self.chain) >= want or (stream_done and self.chain):
                if overlapped:
                    self._keep_drafting(horizon)  # keep drafting while the target verifies
                return self.chain[:size]
            if stream_done:
                if self.stream_error is not None:
                    return self._drafter_failed(f"draft stream failed: {self.stream_error.code().name}")
                return []  # the drafter had nothing to propose: one target-only step
            now = time.monotonic()
            stalled_at = self.stream_progress_at + self.drafter_timeout_s
            if now >= stalled_at:
                return self._drafter_failed(f"no draft token within {self.drafter_timeout_s}s")
            if now >= wait_until:
                # Waiting longer would not pay: verify what exists while the stream keeps drafting.
                self.stats.early_verify_rounds += 1
                return self.chain[:size]
            self.chain_event.clear()
            try:
                await asyncio.wait_for(self.chain_event.wait(), min(stalled_at, wait_until) - now)
            except asyncio.TimeoutError:
                pass

    def _block_plan(self) -> tuple[int, int, int]:
        """(draft tokens to wait for, block size, how far past the committed text to draft) this round."""
        policy = self.req.policy
        if self.req.mode != "overlapped":
            want = policy.min_ready(False)
            return want, want, want
        size = policy.block_size()
        post_verify = self.post_verify.enabled if isinstance(self.post_verify, PostVerify) else self.post_verify
        return policy.min_ready(True), size, max(policy.lookahead(), size) if post_verify else size

    def _post_verify_matters(self) -> bool:
        """Whether this request's rounds measure the post-verify choice: overlapped, measured, and a
        policy whose blocks stop short of its lookahead (pearl and adaedl draft whole blocks either way)."""
        policy = self.req.policy
        return (self.req.mode == "overlapped" and isinstance(self.post_verify, PostVerify)
                and policy.lookahead() > policy.block_size())

    def _keep_drafting(self, horizon: int) -> None:
        if not self._streaming() and not self.stream_exhausted and len(self.chain) < horizon:
            self._start_stream(horizon - len(self.chain))

    def _draft_ahead(self) -> None:
        """Starts the next round's draft before the committed tokens go out to the caller, so the
        drafter's work overlaps the coordinator's (detokenising, writing the chunk)."""
        if (self.finish_reason or self.req.mode == "target_only" or self.req.policy.block_size() == 0
                or self.drafter is None or not self.drafter.healthy):
            return
        self._keep_drafting(self._block_plan()[2])

    def _streaming(self) -> bool:
        return self.stream_task is not None and not self.stream_task.done()

    def _drafter_failed(self, reason: str) -> list:
        log.warning("drafter unavailable, falling back to the target", extra={"fields": {
            "addr": self.drafter.addr if self.drafter else "", "reason": reason}})
        if self.drafter is not None:
            self.drafters.mark_down(self.drafter, self.drafter_retry_s)
        self._reset_chain()
        self.drafter, self.drafter_base, self.drafter_hidden, self.stream_error = None, 0, 0, None
        self.stats.fallback_steps += 1
        metrics.FALLBACK_STEPS.inc()
        return []

    def _start_stream(self, max_tokens: int) -> None:
        policy = self.req.policy
        rule, threshold = policy.stop_rule()
        base = self.drafter_base
        hidden_start = self.drafter_hidden if base else 0
        request = drafter_pb2.DraftRequest(
            session_id=self.session_id, base_len=base,
            tokens=self.committed[base:] + [t.token for t in self.chain], max_tokens=max_tokens,
            sampling=sampling_to_proto(self.req.sampling), stop_rule=int(rule), stop_threshold=threshold,
            request_id=self.req.request_id, hidden=self._hidden_from(hidden_start), committed_len=len(self.committed))
        self.stream_error = None
        self.stream_exhausted = False
        self.stream_progress_at = time.monotonic()
        call = self.drafter.stub.Draft(request, timeout=self._timeout(), metadata=self.metadata)
        self.drafter_sessions.add(self.drafter.addr)
        self.stream_call = call
        self.stream_task = asyncio.ensure_future(self._consume(call, self.chain_epoch, len(self.committed), max_tokens,
                                                               self._hidden_rows()))

    def _hidden_rows(self) -> int:
        return len(self.hidden) // (2 * self.hidden_size) if self.hidden_size else 0

    def _hidden_from(self, start: int) -> common_pb2.HiddenStates | None:
        """The stored target features from position `start` on, or None when there are none to send."""
        rows = self._hidden_rows() - start
        if not self.target_hidden or rows <= 0:
            return None
        row_bytes = 2 * self.hidden_size
        return common_pb2.HiddenStates(start=start, rows=rows, size=self.hidden_size,
                                       data=bytes(self.hidden[start * row_bytes:]))

    def _store_hidden(self, message: common_pb2.HiddenStates) -> None:
        """Keeps the verifier's features; a message restating known positions replaces them."""
        if not message.rows:
            return
        row_bytes = 2 * message.size
        if message.size != self.hidden_size:
            self.hidden, self.hidden_size = bytearray(), message.size
        if message.start > self._hidden_rows():
            return  # a gap cannot be filled later: drafting on the drafter's own features past it is still safe
        del self.hidden[message.start * row_bytes:]
        self.hidden += message.data

    async def _consume(self, call, epoch: int, synced_len: int, requested: int, synced_hidden: int) -> None:
        started = time.perf_counter()
        received = 0
        try:
            async for message in call:
                if epoch != self.chain_epoch:
                    return
                self.stream_progress_at = time.monotonic()
                # Any message proves the drafter synced its session to our context.
                self.drafter_base = max(self.drafter_base, synced_len)
                self.drafter_hidden = max(self.drafter_hidden, synced_hidden)
                received += 1
                if self.expected_bonus is not None:
                    bonus, self.expected_bonus = self.expected_bonus, None
                    if message.token == bonus:
                        continue  # the target already committed this very token
                    self.stats.stale_draft_tokens += 1
                    self._reset_chain()
                    return
                if message.drafter_version != self.stats.drafter_version:
                    self.stats.drafter_version = message.drafter_version
                    metrics.set_drafter_version(message.drafter_version)  # follows hot swaps
                self.chain.append(message)
                self.chain_event.set()
            if epoch == self.chain_epoch:
                self.drafter_base = max(self.drafter_base, synced_len)
                self.stream_exhausted = received < requested
                if self.drafter is not None:
                    self.drafters.mark_up(self.drafter)
        except grpc.aio.AioRpcError as err:
            if epoch != self.chain_epoch or err.code() == grpc.StatusCode.CANCELLED:
                return
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self._deadline_passed():
                return  # the request's own deadline, not the drafter's fault: the next step raises it
            if err.code() == grpc.StatusCode.NOT_FOUND:
                # The drafter lost the session (restart, TTL, hot swap): resend the whole context next time.
                self.drafter_base, self.drafter_hidden = 0, 0
                self.stream_exhausted = False
                return
            self.stream_error = err
        except asyncio.CancelledError:
            pass
        finally:
            self.draft_intervals.append((started, time.perf_counter()))
            if epoch == self.chain_epoch:
                self.stream_task = None
                self.stream_call = None
            self.chain_event.set()

    def _reset_chain(self) -> None:
        """Drops speculative tokens and stops the stream producing more on top of them."""
        self.chain_epoch += 1
        self.chain.clear()
        self.expected_bonus = None
        self.stream_exhausted = False
        if self.stream_call is not None:
            self.stream_call.cancel()
        self.stream_call = None
        self.stream_task = None

    def _close_draft_interval(self) -> None:
        if self.stream_call is not None:
            self.stream_call.cancel()

    # -- step 3: verify -----------------------------------------------------------------------------

    async def _verify(self, block: list[drafter_pb2.DraftToken]) -> verifier_pb2.VerifyResponse:
        greedy = self.req.sampling.greedy
        request = verifier_pb2.VerifyRequest(
            session_id=self.session_id, committed_len=len(self.committed), draft_tokens=[t.token for t in block],
            draft_probs=[] if greedy else [t.probs for t in block], return_top_k=self.trace_top_k,
            request_id=self.req.request_id, bild_rollback_threshold=self.req.bild_rollback_threshold,
            return_hidden=self.target_hidden)
        while True:
            started = time.perf_counter()
            try:
                response = await self.verifier.stub.Verify(request, timeout=self._timeout(), metadata=self.metadata)
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT and block:
                    # The drafter produced something the target refuses: drop it, verify without it.
                    self._drafter_failed(f"verifier refused the draft: {err.details()}")
                    block = []
                    request.ClearField("draft_tokens")
                    request.ClearField("draft_probs")
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and self._deadline_passed():
                    raise UpstreamError(code, "the request deadline passed") from None
                if code == grpc.StatusCode.NOT_FOUND or code in TRANSPORT_ERRORS:
                    failed = self.verifier
                    log.warning("verifier lost, re-prefilling elsewhere", extra={"fields": {
                        "addr": failed.addr, "code": code.name}})
                    if code != grpc.StatusCode.NOT_FOUND:
                        self.verifiers.mark_down(failed, self.drafter_retry_s)
                    await self._open_verifier(exclude={failed.addr} if code != grpc.StatusCode.NOT_FOUND else set())
                    continue
                raise UpstreamError(code, err.details() or "verification failed") from None
            finally:
                self.verify_intervals.append((started, time.perf_counter()))
            metrics.VERIFY_LATENCY.observe(time.perf_counter() - started)
            if self.draft_wait is not None and not response.lossy:
                self.draft_wait.record(len(block), response.accepted, time.perf_counter() - started)
            self._store_hidden(response.hidden)
            return response

    # -- step 4: commit -----------------------------------------------------------------------------

    def _apply(self, block: list[drafter_pb2.DraftToken], response: verifier_pb2.VerifyResponse) -> list[int]:
        sent, accepted = len(block), response.accepted
        context_before = list(self.committed)
        self.stats.rounds += 1
        if sent:
            self.stats.drafted_tokens += sent
            self.stats.accepted_tokens += accepted
            self._record_metrics(sent, accepted)
            self.req.policy.update(sent, accepted)
        self.stats.lossy |= response.lossy
        # Keep speculative tokens only if they sit on the committed path.
        rest = self.chain[sent:] if accepted == sent else None
        if rest is None:
            self.stats.stale_draft_tokens += len(self.chain) - accepted
            self._reset_chain()
        elif rest and rest[0].token == response.next_token:
            self.chain = rest[1:]
        elif rest:
            self.stats.stale_draft_tokens += len(rest)
            self._reset_chain()
        else:
            self.chain = []
            if self._streaming() and self.expected_bonus is None:
                self.expected_bonus = response.next_token  # the stream's next token must match it
            elif self._streaming():
                self._reset_chain()  # two tokens committed past a stream that has sent none: restart it
        self.stream_exhausted = False
        new_tokens = [t.token for t in block[:accepted]] + [response.next_token]
        if self.trace_sink is not None and sent and not self.req.exclude_from_training:
            self.trace_sink(VerifiedBlock(self.req, context_before, block, response,
                                          block[0].drafter_version, self.target_version))
        return self._commit(new_tokens)

    def _record_metrics(self, sent: int, accepted: int) -> None:
        policy = self.req.policy.name
        metrics.DRAFT_TOKENS.labels(policy=policy).inc(sent)
        metrics.ACCEPTED_TOKENS.labels(policy=policy).inc(accepted)
        metrics.ACCEPTED_LENGTH.labels(policy=policy).observe(accepted)
        for slot in range(sent):
            metrics.POSITION_DRAFTED.labels(position=str(slot)).inc()
            if slot < accepted:
                metrics.POSITION_ACCEPTED.labels(position=str(slot)).inc()

    def _commit(self, tokens: list[int]) -> list[int]:
        """Appends tokens up to the first stop condition; sets finish_reason when one is met."""
        kept = []
        for token in tokens:
            kept.append(token)
            self.committed.append(token)
            if token in self.req.stop_token_ids:
                self.finish_reason = "eos"
                break
            if len(self.generated) >= self.req.max_new_tokens:
                self.finish_reason = "length"
                break
        self.stats.new_tokens = len(self.generated)
        if self.finish_reason:
            self._reset_chain()
        return kept

    def finish_with_stop_string(self) -> None:
        """Called by the text layer when a stop string appeared in the decoded text."""
        self.finish_reason = "stop"

    async def _release(self) -> None:
        calls = []
        for backend in self.verifiers.backends:  # Release is idempotent: unknown sessions are a no-op
            if backend.addr in self.verifier_addrs_used:
                calls.append(backend.stub.Release(verifier_pb2.ReleaseRequest(session_id=self.session_id),
                                                  timeout=RELEASE_TIMEOUT_S, metadata=self.metadata))
        for backend in self.drafters.backends:
            if backend.addr in self.drafter_sessions:
                calls.append(backend.stub.Release(verifier_pb2.ReleaseRequest(session_id=self.session_id),
                                                  timeout=RELEASE_TIMEOUT_S, metadata=self.metadata))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.info("session release failed", extra={"fields": {"error": str(result)}})

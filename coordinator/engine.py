"""The decoding loop: drafter and verifier rounds, sequential or PEARL-overlapped.

One `Generation` per request wires the parts and runs the loop, in numbered steps:
1. open a verifier session (prefill), failing over to another verifier if needed
   (`VerifierSession`, coordinator/verifier_session.py);
2. gather a draft block: from prompt lookup over the request's own text when it
   matches and the policy takes it (`LookupDrafts`, coordinator/lookup_drafts.py: no
   drafter call), else from the chain of speculative tokens the drafter
   streams (`DraftStream`, coordinator/draft_stream.py); in overlapped mode the
   stream keeps running while blocks are verified (post-verify) and a block may
   be as short as one token, so the verifier starts as soon as the first draft
   token exists (pre-verify); no block reaches past the request's token budget;
3. verify the block; an empty block is a target-only step (drafter down,
   too slow, nothing to propose, or the policy judged speculation not to pay);
   every controller then observes the round's `RoundOutcome` (coordinator/rounds.py);
   a round known to take no draft is sent before the previous round's tokens go out
   to the caller, so the verifier's next pass does not wait for detokenising and writing;
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

from coordinator.backends import BackendPool, CallContext, UpstreamError
from coordinator.draft_stream import DraftStream
from coordinator.features import TargetFeatures
from coordinator.lookup_drafts import LookupDrafts
from coordinator.policies import DraftLengthPolicy, DraftWait, PostVerify
from coordinator.rounds import LOOKUP, MODEL, GenerationStats, RoundMetrics, RoundObserver, RoundOutcome
from coordinator.verifier_session import VerifierSession
from specdec import metrics
from specdec.config import CoordinatorSettings
from specdec.sampling_params import SamplingParams, sampling_to_proto
from specdec.v1 import drafter_pb2, verifier_pb2

log = logging.getLogger(__name__)
CATCH_UP_TOKENS = 8  # a drafter call that syncs more new context than this is not a typical round's cost

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
class VerifiedBlock:
    """What one verification saw; handed to the trace sink."""

    request: GenerationRequest
    context_ids: list[int]            # committed before the block
    draft: list[drafter_pb2.DraftToken]
    response: verifier_pb2.VerifyResponse
    drafter_version: str
    target_version: str


@dataclass(frozen=True)
class GenerationOptions:
    """What every Generation of a coordinator reads: its settings, and what it knows of the target and drafter."""

    drafter_timeout_s: float = 2.0
    drafter_retry_s: float = 5.0
    target_version: str = ""
    trace_top_k: int = 0           # the target's top-k a trace keeps; 0 when nothing is traced
    target_hidden: bool = False    # the drafter reads the target's hidden states
    lookup_tokens: int = 0         # longest prompt-lookup block the coordinator drafts itself; 0: none

    @classmethod
    def from_settings(cls, settings: CoordinatorSettings, target_version: str = "", traced: bool = False,
                      target_hidden: bool = False) -> GenerationOptions:
        return cls(settings.drafter_timeout_s, settings.drafter_retry_s, target_version,
                   settings.trace_top_k if traced else 0, target_hidden, settings.lookup_draft_tokens)


class Generation:
    def __init__(self, request: GenerationRequest, verifiers: BackendPool, drafters: BackendPool,
                 metadata: list[tuple[str, str]], options: GenerationOptions = GenerationOptions(),
                 trace_sink: Callable[[VerifiedBlock], None] | None = None, draft_wait: DraftWait | None = None,
                 post_verify: PostVerify | bool = True):
        self.req = request
        self.trace_sink = trace_sink
        self.target_version, self.trace_top_k = options.target_version, options.trace_top_k
        self.post_verify = post_verify  # overlapped mode: draft past the block being verified (True, False, or measured)
        self.committed: list[int] = list(request.prompt_ids)
        self.stats = GenerationStats(prompt_tokens=len(request.prompt_ids), policy=request.policy.name,
                                     mode=request.mode)
        self.finish_reason = ""
        session_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        self.calls = CallContext(metadata, request.deadline, options.drafter_retry_s)
        self.features = TargetFeatures(enabled=options.target_hidden and request.mode != "target_only")
        self.verifier = VerifierSession(verifiers, self.calls, verifier_pb2.PrefillRequest(
            session_id=session_id, sampling=sampling_to_proto(request.sampling), request_id=request.request_id,
            return_hidden=self.features.enabled), self.features)
        self.drafts = DraftStream(drafters, self.calls, session_id, request.request_id, request.sampling,
                                  options.drafter_timeout_s, self.features, self.stats)
        self.lookup = (LookupDrafts(options.lookup_tokens, request.sampling.greedy)
                       if options.lookup_tokens and request.mode != "target_only" else None)
        self._block_source = ""  # where the block being gathered came from: LOOKUP, MODEL, or ""
        self._lookup_decided: tuple[int, list[int]] = (-1, [])  # (committed length, its lookup block)
        self._drafter_called = self._drafter_caught_up = False
        self.draft_wait = draft_wait if request.mode == "overlapped" else None
        self._ahead: asyncio.Future | None = None  # the next draftless round's Verify, already sent
        self._ahead_sent = 0.0
        self.observers: list[RoundObserver] = [self.stats.observe, RoundMetrics(request.policy.name).observe,
                                               request.policy.observe]
        if self.draft_wait is not None:
            self.observers.append(self.draft_wait.observe)
        if self._measures_post_verify():
            self.observers.append(self.post_verify.observe)
        self._started = 0.0

    # -- public -------------------------------------------------------------------------------------

    async def stream(self) -> AsyncIterator[list[int]]:
        """Yields newly committed tokens until a stop condition; cleans up sessions on exit."""
        self._started = time.perf_counter()
        try:
            await self.verifier.open(self.committed, self._remaining())              # step 1
            while not self.finish_reason:
                round_started = time.perf_counter()
                if self._ahead is not None:
                    ahead, self._ahead, round_started = self._ahead, None, self._ahead_sent
                    block, response, verify_s = await ahead                           # step 3, sent early
                else:
                    block = await self._gather_block()                                # step 2
                    block, response, verify_s = await self._verify(block)             # step 3
                source, drafter_called = (self._block_source if block else ""), self._drafter_called
                caught_up = self._drafter_caught_up
                self._drafter_called = self._drafter_caught_up = False  # a Verify sent ahead asked no drafter
                outcome = RoundOutcome(sent=len(block), accepted=response.accepted, committed=response.accepted + 1,
                                       round_s=time.perf_counter() - round_started, verify_s=verify_s,
                                       lossy=response.lossy, batch_rows=response.timing.batch_rows,
                                       batch_sessions=response.timing.batch_sessions,
                                       step_s=response.timing.compute_ms / 1e3, source=source,
                                       drafter_called=drafter_called, drafter_caught_up=caught_up)
                for observe in self.observers:
                    observe(outcome)
                new_tokens = self._apply(block, response, source)                     # step 4
                self._draft_ahead()
                self._verify_ahead()
                if new_tokens:
                    if not self.stats.ttft_ms:
                        self.stats.ttft_ms = (time.perf_counter() - self._started) * 1e3
                    yield new_tokens
        finally:
            if self._ahead is not None:
                self._ahead.cancel()
                await asyncio.gather(self._ahead, return_exceptions=True)
            self.drafts.close()
            self.stats.add_timings(time.perf_counter() - self._started, self.drafts.intervals,
                                   self.verifier.intervals)
            await asyncio.shield(self._release())

    @property
    def session_id(self) -> str:
        return self.verifier.session_id

    @property
    def generated(self) -> list[int]:
        return self.committed[len(self.req.prompt_ids):]

    def finish_with_stop_string(self) -> None:
        """Called by the text layer when a stop string appeared in the decoded text."""
        self.finish_reason = "stop"

    def _remaining(self) -> int:
        return max(self.req.max_new_tokens - len(self.generated), 0)

    def _measures_post_verify(self) -> bool:
        """Whether this request's rounds measure the post-verify choice: overlapped, measured, and a
        policy whose blocks stop short of its lookahead (pearl and adaedl draft whole blocks either way)."""
        policy = self.req.policy
        return (self.req.mode == "overlapped" and isinstance(self.post_verify, PostVerify)
                and policy.lookahead() > policy.block_size())

    # -- step 2: gather a block from the drafter's stream -------------------------------------------

    async def _gather_block(self) -> list[drafter_pb2.DraftToken]:
        policy = self.req.policy
        self._block_source, self._drafter_called = "", False
        if self.req.mode == "target_only":
            return []
        lookup = self._lookup_tokens()
        if lookup:
            if self.drafts.tokens or self.drafts.streaming():
                self.drafts.reset()  # the drafter's chain was built past other tokens than the block's
            self._block_source = LOOKUP
            return self.lookup.block(lookup)
        if policy.block_size() == 0:
            self._speculation_off_round()
            return []
        want, size, horizon = self._block_plan()
        if size == 0:
            return []  # one token left: the target's own step ends the request
        if not self.drafts.usable():
            if self.drafts.drafters.backends:
                self.stats.fallback_steps += 1
                metrics.FALLBACK_STEPS.inc()
            return []
        if self.features.enabled and self.features.rows < len(self.committed) - 1:
            # Rounds without the drafter left the target's features on the verifier; this round's Verify
            # fetches them (it asks while the policy drafts) and the next round drafts on them.
            self.stats.feature_catch_up_rounds += 1
            return []
        wait_s = self.draft_wait.budget_s() if self.draft_wait is not None else None
        self._block_source, self._drafter_called = MODEL, True
        self._drafter_caught_up = len(self.committed) - self.drafts.base > CATCH_UP_TOKENS
        return await self.drafts.gather(self.committed, want, size, horizon, policy.stop_rule(), wait_s,
                                        overlapped=self.req.mode == "overlapped")

    def _lookup_tokens(self) -> list[int]:
        """This round's prompt-lookup block, as long as the policy takes (none without a match). Asked up to
        three times a round (drafting ahead, verifying ahead, gathering) at the same committed length and
        policy state (the policy observes a round before its tokens are committed), so decided once."""
        if self.lookup is None:
            return []
        if self._lookup_decided[0] != len(self.committed):
            proposal = self.lookup.propose(self.committed, self._remaining() - 1)
            self._lookup_decided = (len(self.committed), proposal[:self.req.policy.lookup_length(len(proposal))])
        return self._lookup_decided[1]

    def _speculation_off_round(self) -> None:
        """The policy turned speculation off: stop the drafter competing for compute meanwhile."""
        if self.drafts.tokens or self.drafts.streaming():
            self.drafts.reset()
        self.stats.speculation_off_rounds += 1

    def _block_plan(self) -> tuple[int, int, int]:
        """(draft tokens to wait for, block size, how far past the committed text to draft) this round,
        none of them past the token budget: a block of k drafts commits up to k + 1 tokens."""
        policy = self.req.policy
        budget = self._remaining() - 1
        if self.req.mode != "overlapped":
            want = min(policy.min_ready(False), budget)
            return want, want, want
        size = min(policy.block_size(), budget)
        post_verify = self.post_verify.enabled if isinstance(self.post_verify, PostVerify) else self.post_verify
        horizon = max(policy.lookahead(), size) if post_verify else size
        return min(policy.min_ready(True), budget), size, min(horizon, budget)

    def _draft_ahead(self) -> None:
        """Starts the next round's draft before the committed tokens go out to the caller, so the
        drafter's work overlaps the coordinator's (detokenising, writing the chunk)."""
        policy = self.req.policy
        if self.finish_reason or self.req.mode == "target_only" or policy.block_size() == 0 or not self.drafts.ready():
            return
        if self._lookup_tokens():
            return  # the next block comes from lookup: drafting would only compete for the cores
        self.drafts.keep_drafting(self.committed, self._block_plan()[2], policy.stop_rule())

    def _verify_ahead(self) -> None:
        """Sends the next round's Verify now when it takes no draft (target-only, or the policy turned speculation
        off): the verifier's next pass then overlaps the coordinator's work on this round's tokens."""
        if self.finish_reason:
            return
        if self.req.mode != "target_only":
            if self.req.policy.block_size() != 0 or self._lookup_tokens():
                return
            self._speculation_off_round()
        self._ahead_sent = time.perf_counter()
        self._ahead = asyncio.ensure_future(self._verify([]))

    # -- step 3: verify -----------------------------------------------------------------------------

    async def _verify(self, block: list[drafter_pb2.DraftToken]
                      ) -> tuple[list[drafter_pb2.DraftToken], verifier_pb2.VerifyResponse, float]:
        """(the block verified, the verifier's answer, seconds of the Verify call)."""
        greedy = self.req.sampling.greedy
        request = verifier_pb2.VerifyRequest(
            session_id=self.session_id, committed_len=len(self.committed), draft_tokens=[t.token for t in block],
            draft_probs=[] if greedy else [t.probs for t in block], return_top_k=self.trace_top_k,
            request_id=self.req.request_id, bild_rollback_threshold=self.req.bild_rollback_threshold,
            # features only while the drafter is in use: the verifier keeps them meanwhile
            return_hidden=self.features.enabled and self.req.policy.block_size() > 0)
        try:
            response, seconds = await self.verifier.verify(request, self.committed, self._remaining())
        except UpstreamError as err:
            if not block or err.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # The drafter is to blame only if the verifier takes the same step without its draft.
            request.ClearField("draft_tokens")
            request.ClearField("draft_probs")
            response, seconds = await self.verifier.verify(request, self.committed, self._remaining())
            self.drafts.fail(f"verifier refused the draft: {err}")
            return [], response, seconds
        return block, response, seconds

    # -- step 4: commit -----------------------------------------------------------------------------

    def _apply(self, block: list[drafter_pb2.DraftToken], response: verifier_pb2.VerifyResponse,
               source: str) -> list[int]:
        accepted = response.accepted
        # A lookup block: the drafter's chain was dropped for it, and copied text teaches the drafter nothing.
        if source != LOOKUP:
            if self.trace_sink is not None and block and not self.req.exclude_from_training:
                self.trace_sink(VerifiedBlock(self.req, list(self.committed), block, response,
                                              block[0].drafter_version, self.target_version))
            self.drafts.advance(len(block), accepted, response.next_token)
        return self._commit([t.token for t in block[:accepted]] + [response.next_token])

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
            self.drafts.reset()
        return kept

    async def _release(self) -> None:
        metadata = self.calls.metadata
        calls = (self.verifier.verifiers.release_calls(self.session_id, self.verifier.addrs_used, metadata)
                 + self.drafts.drafters.release_calls(self.session_id, self.drafts.sessions, metadata))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.info("session release failed", extra={"fields": {"error": str(result)}})

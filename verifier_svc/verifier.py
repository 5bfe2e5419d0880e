"""The verifier core: target-model sessions, prefill and verification.

Transport-free: the gRPC servicer converts messages and delegates here. Calls are queued for the
step scheduler (verifier_svc/scheduler.py), which batches them across sessions.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import torch

from specdec.compute.model_runner import ModelRunner, measure_pass_cost
from specdec.compute.sessions import KVSession, SessionStore
from specdec.errors import ContextExhausted, InvalidRequest, StaleRequest
from specdec.models.loader import LoadedModel
from specdec.sampling import DraftDist, verify_greedy, verify_speculative, warp_logits
from specdec.sampling_params import SamplingParams
from verifier_svc.scheduler import PassStats, PrefillJob, StepScheduler, VerifierOptions, VerifyJob

MAX_DRAFT_TOKENS = 128
UNSENT_FEATURES = "unsent_features"  # session.extra of a session whose caller reads the target's features


@dataclass
class VerifyOutcome:
    accepted: int
    next_token: int
    committed_len: int
    target_top: list[tuple[list[int], list[float]]]  # per slot (ids, probs) of the untempered target
    compute_ms: float
    lossy: bool
    hidden: tuple[int, torch.Tensor] | None = None  # (start, features [n, H]) of the newly committed positions
    batch_rows: int = 0               # rows and sessions of the forward pass that served the call
    batch_sessions: int = 0


class VerifierCore:
    """Validates calls, queues them for the step scheduler, and decides acceptance per session."""

    def __init__(self, loaded: LoadedModel, options: VerifierOptions = VerifierOptions()):
        self.loaded = loaded
        self.runner = ModelRunner(loaded.model, loaded.device, options.small_gemm, loaded.gguf_path)
        self.pass_costs: list[tuple[int, float]] = []
        if options.measure_pass_cost:  # before the step thread starts, so no call shares these passes
            self.pass_costs = measure_pass_cost(self.runner, options.max_step_rows)
        self.sessions = SessionStore(options.max_sessions, options.session_ttl_s)
        self.scheduler = StepScheduler(self.runner, self, options)

    # 1. Prefill: cache all but the last prompt token, a chunk per step.
    def submit_prefill(self, session_id: str, token_ids: list[int], sampling: SamplingParams, max_new_tokens: int,
                       request_id: str = "", return_hidden: bool = False) -> Future:
        """A future of (committed length, (0, features of positions 0 .. len-2) or None)."""
        if not session_id:
            raise InvalidRequest("session_id is required")
        if not token_ids:
            raise InvalidRequest("the prompt is empty: give at least one token")
        self._check_tokens(token_ids, "prompt")
        if len(token_ids) + max(max_new_tokens, 0) > self.loaded.max_context:
            raise ContextExhausted(
                f"prompt of {len(token_ids)} tokens plus max_new_tokens {max_new_tokens} exceeds the context length "
                f"{self.loaded.max_context}")
        session = self.sessions.create(session_id, request_id)
        session.extra["sampling"] = sampling
        prefilled = self.scheduler.submit(PrefillJob(session, list(token_ids[:-1]), token_ids[-1], return_hidden))
        if not return_hidden:
            return prefilled
        # The prompt's features wait on the session, with those of later rounds, for a Verify that asks:
        # a request whose policy never calls the drafter never moves them.
        session.extra[UNSENT_FEATURES] = []  # (start, features [n, H]) not sent yet
        kept: Future = Future()

        def keep(done: Future) -> None:  # on the step thread, before any Verify of the session can run
            if done.cancelled():
                kept.cancel()
                return
            with contextlib.suppress(InvalidStateError):  # the caller may have cancelled `kept` meanwhile
                if done.exception() is not None:
                    kept.set_exception(done.exception())
                    return
                committed, hidden = done.result()
                if hidden is not None:
                    session.extra[UNSENT_FEATURES].append(hidden)
                kept.set_result((committed, None))

        prefilled.add_done_callback(keep)
        kept.add_done_callback(lambda done: done.cancelled() and prefilled.cancel())  # an abandoned prefill
        return kept

    # 2. Verify: one target pass over the uncached tokens plus the draft, shared with other sessions.
    def submit_verify(self, session_id: str, committed_len: int, draft_tokens: list[int],
                      draft_dists: list[DraftDist] | None, return_top_k: int = 0,
                      bild_threshold: float = 0.0, return_hidden: bool = False) -> Future:
        """A future of the VerifyOutcome."""
        session = self.sessions.get(session_id)
        sampling: SamplingParams = session.extra["sampling"]
        if len(draft_tokens) > MAX_DRAFT_TOKENS:
            raise InvalidRequest(f"at most {MAX_DRAFT_TOKENS} draft tokens per call, got {len(draft_tokens)}")
        self._check_tokens(draft_tokens, "draft")
        if not sampling.greedy and len(draft_dists or []) != len(draft_tokens):
            raise InvalidRequest("sampled verification needs one draft distribution per draft token")
        if bild_threshold and not sampling.greedy:
            raise InvalidRequest("BiLD rollback applies to greedy decoding only")
        q = None
        if not sampling.greedy and draft_tokens:
            try:
                q = torch.stack([d.dense(self.loaded.vocab_size) for d in draft_dists])  # [k, V]
            except ValueError as err:
                raise InvalidRequest(str(err)) from None
        payload = _VerifyArgs(sampling, q, return_top_k, bild_threshold, return_hidden)
        keeps_features = UNSENT_FEATURES in session.extra
        return self.scheduler.submit(VerifyJob(session, committed_len, list(draft_tokens), payload,
                                               return_hidden or keeps_features))

    def prefill(self, *args, **kwargs) -> tuple[int, tuple[int, torch.Tensor] | None]:
        return self.submit_prefill(*args, **kwargs).result()

    def verify(self, *args, **kwargs) -> VerifyOutcome:
        return self.submit_verify(*args, **kwargs).result()

    # Called by the scheduler on its thread, in order, so a session's state changes one step at a time.
    def prepare_verify(self, job: VerifyJob) -> None:
        session = job.session
        if job.committed_len != len(session.ids):
            raise StaleRequest(f"session has {len(session.ids)} committed tokens, caller assumed {job.committed_len}")
        if len(session.ids) + len(job.draft_tokens) + 1 > self.loaded.max_context:
            raise ContextExhausted(f"the context length {self.loaded.max_context} is exhausted")
        job.base = len(session.ids)
        session.ids.extend(job.draft_tokens)

    def abort_verify(self, job: VerifyJob) -> None:
        job.session.crop(job.base)

    def finish_verify(self, job: VerifyJob, slot_logits: torch.Tensor, hidden: torch.Tensor | None,
                      step: PassStats) -> VerifyOutcome:
        """slot_logits [k+1, V]; hidden [fed, H] of the rows this session fed, or None."""
        # 3. Decide acceptance, then 4. roll the cache back to the accepted prefix.
        args: _VerifyArgs = job.payload
        session, base, draft_tokens = job.session, job.base, job.draft_tokens
        if args.sampling.greedy:
            decision = verify_greedy(slot_logits, draft_tokens, args.bild_threshold)
        else:
            p = warp_logits(slot_logits, args.sampling)
            decision = verify_speculative(p, draft_tokens, args.q, args.sampling.seed, base)
        committed_features = None
        if job.return_hidden:
            fed_from = len(session.ids) - hidden.shape[0]
            committed_features = self._features_to_send(session, fed_from, hidden[: base + decision.accepted - fed_from],
                                                        args.send_hidden)
        session.crop(base + decision.accepted)
        session.ids.append(decision.next_token)
        target_top = _top_k(slot_logits[: decision.accepted + 1], args.return_top_k)
        return VerifyOutcome(decision.accepted, decision.next_token, len(session.ids), target_top,
                             step.seconds * 1e3, decision.lossy, committed_features, step.rows, step.sessions)

    @staticmethod
    def _features_to_send(session: KVSession, start: int, features: torch.Tensor,
                          send: bool) -> tuple[int, torch.Tensor] | None:
        """This round's committed features [n, H] from position `start`, after those kept from rounds that
        asked for none; or None, keeping them, when this round asks for none either."""
        unsent: list[tuple[int, torch.Tensor]] | None = session.extra.get(UNSENT_FEATURES)
        if unsent is None:
            return (start, features) if send else None
        unsent.append((start, features))
        if not send:
            return None
        session.extra[UNSENT_FEATURES] = []
        return unsent[0][0], torch.cat([part for _, part in unsent])

    def release(self, session_id: str) -> bool:
        self.scheduler.forget(session_id)
        return self.sessions.release(session_id)

    def after_pending(self, callback) -> None:
        """Runs `callback` once the compute queued before now is done."""
        self.scheduler.after_pending(callback)

    def close(self) -> None:
        self.scheduler.close()

    def _check_tokens(self, token_ids: list[int], what: str) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.loaded.vocab_size]
        if bad:
            raise InvalidRequest(f"{what} token ids outside the vocabulary [0, {self.loaded.vocab_size}): {bad[:5]}")


@dataclass(frozen=True)
class _VerifyArgs:
    sampling: SamplingParams
    q: torch.Tensor | None            # [k, V] draft distributions when sampling
    return_top_k: int
    bild_threshold: float
    send_hidden: bool                 # send the committed features now (else keep them for a later call)


def _top_k(logits: torch.Tensor, k: int) -> list[tuple[list[int], list[float]]]:
    """Top-k of the untempered softmax per row of logits [n, V], for training traces."""
    if k <= 0:
        return []
    values, indices = torch.topk(logits.float().softmax(-1), min(k, logits.shape[-1]), dim=-1)
    return [(i.tolist(), v.tolist()) for i, v in zip(indices, values)]

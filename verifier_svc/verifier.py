"""The verifier core: target-model sessions, prefill and verification.

Transport-free: the gRPC servicer converts messages and delegates here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from specdec.errors import InvalidRequest, StaleRequest
from specdec.kv import ModelRunner, SessionStore
from specdec.models import LoadedModel
from specdec.sampling import DraftDist, verify_greedy, verify_speculative, warp_logits
from specdec.sampling_params import SamplingParams

MAX_DRAFT_TOKENS = 128


@dataclass
class VerifyOutcome:
    accepted: int
    next_token: int
    committed_len: int
    target_top: list[tuple[list[int], list[float]]]  # per slot (ids, probs) of the untempered target
    compute_ms: float
    lossy: bool
    hidden: tuple[int, torch.Tensor] | None = None  # (start, features [n, H]) of the newly committed positions


class VerifierCore:
    def __init__(self, loaded: LoadedModel, max_sessions: int = 64, session_ttl_s: float = 300.0,
                 small_gemm: bool = False):
        self.loaded = loaded
        self.runner = ModelRunner(loaded.model, loaded.device, small_gemm, loaded.gguf_path)
        self.sessions = SessionStore(max_sessions, session_ttl_s)
        self._compute = threading.Lock()  # one forward at a time; sessions stay independent

    # 1. Prefill: cache all but the last prompt token.
    def prefill(self, session_id: str, token_ids: list[int], sampling: SamplingParams, max_new_tokens: int,
                request_id: str = "", return_hidden: bool = False) -> tuple[int, tuple[int, torch.Tensor] | None]:
        """Returns the committed length and, with return_hidden, the features of positions 0 .. len-2."""
        if not session_id:
            raise InvalidRequest("session_id is required")
        if not token_ids:
            raise InvalidRequest("the prompt is empty: give at least one token")
        self._check_tokens(token_ids, "prompt")
        if len(token_ids) + max(max_new_tokens, 0) > self.loaded.max_context:
            raise InvalidRequest(
                f"prompt of {len(token_ids)} tokens plus max_new_tokens {max_new_tokens} exceeds the context length "
                f"{self.loaded.max_context}")
        session = self.sessions.create(session_id, request_id)
        session.extra["sampling"] = sampling
        session.ids = list(token_ids)
        hidden = None
        if len(token_ids) > 1:
            session.ids = list(token_ids[:-1])
            with self._compute:
                _, hidden = self.runner.extend([session], output_hidden=return_hidden, keep_logits=1)[0]
            session.ids.append(token_ids[-1])
        return len(session.ids), (0, hidden) if hidden is not None else None

    # 2. Verify: one target pass over the uncached tokens plus the draft.
    def verify(self, session_id: str, committed_len: int, draft_tokens: list[int],
               draft_dists: list[DraftDist] | None, return_top_k: int = 0,
               bild_threshold: float = 0.0, return_hidden: bool = False) -> VerifyOutcome:
        session = self.sessions.get(session_id)
        sampling: SamplingParams = session.extra["sampling"]
        if committed_len != len(session.ids):
            raise StaleRequest(f"session has {len(session.ids)} committed tokens, caller assumed {committed_len}")
        if len(draft_tokens) > MAX_DRAFT_TOKENS:
            raise InvalidRequest(f"at most {MAX_DRAFT_TOKENS} draft tokens per call, got {len(draft_tokens)}")
        self._check_tokens(draft_tokens, "draft")
        if len(session.ids) + len(draft_tokens) + 1 > self.loaded.max_context:
            raise InvalidRequest(f"the context length {self.loaded.max_context} is exhausted")
        if not sampling.greedy and len(draft_dists or []) != len(draft_tokens):
            raise InvalidRequest("sampled verification needs one draft distribution per draft token")
        if bild_threshold and not sampling.greedy:
            raise InvalidRequest("BiLD rollback applies to greedy decoding only")

        started = time.perf_counter()
        base = len(session.ids)
        session.ids.extend(draft_tokens)
        with self._compute:
            slot_logits, hidden = self.runner.extend([session], output_hidden=return_hidden,
                                                     keep_logits=len(draft_tokens) + 1)[0]  # [k+1, V], [fed, H]

        # 3. Decide acceptance, then 4. roll the cache back to the accepted prefix.
        if sampling.greedy:
            decision = verify_greedy(slot_logits, draft_tokens, bild_threshold)
        else:
            try:
                q = torch.stack([d.dense(self.loaded.vocab_size) for d in draft_dists]) if draft_tokens else None
            except ValueError as err:
                session.crop(base)
                raise InvalidRequest(str(err)) from None
            p = warp_logits(slot_logits, sampling)
            decision = verify_speculative(p, draft_tokens, q, sampling.seed, base)
        committed_features = None
        if return_hidden:
            fed_from = len(session.ids) - hidden.shape[0]
            committed_features = (fed_from, hidden[: base + decision.accepted - fed_from])
        session.crop(base + decision.accepted)
        session.ids.append(decision.next_token)
        target_top = _top_k(slot_logits[: decision.accepted + 1], return_top_k)
        return VerifyOutcome(decision.accepted, decision.next_token, len(session.ids), target_top,
                             (time.perf_counter() - started) * 1e3, decision.lossy, committed_features)

    def release(self, session_id: str) -> bool:
        return self.sessions.release(session_id)

    def _check_tokens(self, token_ids: list[int], what: str) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.loaded.vocab_size]
        if bad:
            raise InvalidRequest(f"{what} token ids outside the vocabulary [0, {self.loaded.vocab_size}): {bad[:5]}")


def _top_k(logits: torch.Tensor, k: int) -> list[tuple[list[int], list[float]]]:
    """Top-k of the untempered softmax per row of logits [n, V], for training traces."""
    if k <= 0:
        return []
    values, indices = torch.topk(logits.float().softmax(-1), min(k, logits.shape[-1]), dim=-1)
    return [(i.tolist(), v.tolist()) for i, v in zip(indices, values)]

"""Sampling and speculative-verification math, as pure functions.

Randomness is a pure function of (seed, absolute position, purpose). That makes
a seeded request reproducible even when overlapped drafting throws work away
at timing-dependent moments, and keeps the drafter's and the verifier's draws
independent. Each committed position consumes each purpose's draw at most once,
so reusing a position's draw for a redrafted (previously discarded) token keeps
every committed decision driven by fresh randomness.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

from specdec.sampling_params import SamplingParams

DRAFT = b"draft"
ACCEPT = b"accept"
RESAMPLE = b"resample"


def uniform(seed: int, position: int, purpose: bytes) -> float:
    """A uniform draw in [0, 1) fixed by (seed, position, purpose)."""
    digest = hashlib.blake2b(struct.pack("<QQ", seed & (2**64 - 1), position) + purpose, digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * (1.0 / (1 << 53))


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Target/draft distribution under `params`, in the order HF's sampling applies them.

    logits: [N, V]. Returns probs [N, V] (float32). Greedy gives a one-hot argmax.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p  # keep the smallest prefix reaching top_p; the first always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample_index(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from probs [V] with the uniform u."""
    cdf = probs.double().cumsum(0)
    index = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True)[0])
    return min(index, probs.shape[0] - 1)


def truncate_support(probs: torch.Tensor, support: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact distribution a drafter samples from, as (indices [S], probs [S]).

    probs: [V]. Keeping only the top `support` entries (0: all non-zero) is
    lossless for speculative sampling: the verifier corrects for any q.
    """
    nonzero = int((probs > 0).sum())
    keep = nonzero if support <= 0 else min(support, nonzero)
    values, indices = torch.topk(probs, keep)
    return indices, values / values.sum()


def entropy(probs: torch.Tensor) -> float:
    """Shannon entropy in nats of probs [V] (entr(0) = 0: no masking pass over the vocabulary)."""
    return float(torch.special.entr(probs).sum())


@dataclass(frozen=True)
class VerifyDecision:
    accepted: int      # length of the accepted draft prefix
    next_token: int    # correction (on rejection) or bonus (on full acceptance)
    lossy: bool = False


def verify_greedy(target_logits: torch.Tensor, draft_tokens: list[int], bild_threshold: float = 0.0) -> VerifyDecision:
    """Greedy verification: accept while the draft equals the target argmax.

    target_logits: [k+1, V]; row j scores draft slot j, row k the bonus slot.
    bild_threshold > 0 enables BiLD's LOSSY rollback rule: a draft token whose
    target log-probability is within the threshold of the argmax's is kept.
    """
    argmax = target_logits.argmax(-1).tolist()
    logprobs = target_logits.float().log_softmax(-1) if bild_threshold > 0 else None
    lossy = False
    for slot, token in enumerate(draft_tokens):
        if token == argmax[slot]:
            continue
        if logprobs is not None and float(logprobs[slot, argmax[slot]] - logprobs[slot, token]) <= bild_threshold:
            lossy = True
            continue
        return VerifyDecision(slot, argmax[slot], lossy)
    return VerifyDecision(len(draft_tokens), argmax[len(draft_tokens)], lossy)


def verify_speculative(target_probs: torch.Tensor, draft_tokens: list[int], draft_probs: torch.Tensor,
                       seed: int, first_position: int) -> VerifyDecision:
    """Exact speculative sampling (Leviathan et al.; Chen et al.).

    target_probs: [k+1, V], the warped target distribution per slot.
    draft_probs:  [k, V], the exact distribution each draft token was drawn from.
    first_position: absolute position of draft slot 0, which fixes the draws.
    """
    for slot, token in enumerate(draft_tokens):
        p, q = target_probs[slot], draft_probs[slot]
        position = first_position + slot
        # Accept with probability min(1, p/q); written as u*q < p to avoid dividing by zero.
        if uniform(seed, position, ACCEPT) * float(q[token]) < float(p[token]):
            continue
        residual = (p - q).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: rejection had probability ~0
            residual = p
        return VerifyDecision(slot, sample_index(residual, uniform(seed, position, RESAMPLE)))
    bonus_slot = len(draft_tokens)
    return VerifyDecision(bonus_slot, sample_index(target_probs[bonus_slot], uniform(seed, first_position + bonus_slot, RESAMPLE)))


@dataclass(frozen=True)
class DraftDist:
    """The exact distribution one draft token came from: dense [V] or sparse support."""

    probs: torch.Tensor                 # [V] when indices is None, else [S]
    indices: torch.Tensor | None = None  # [S] token ids

    def dense(self, vocab_size: int) -> torch.Tensor:
        """probs as [V] float32."""
        if self.indices is None:
            if self.probs.shape[0] != vocab_size:
                raise ValueError(f"dense draft probabilities have {self.probs.shape[0]} entries, vocabulary has {vocab_size}")
            return self.probs.float()
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= vocab_size):
            raise ValueError("draft probability support lies outside the vocabulary")
        return torch.zeros(vocab_size).index_put_((self.indices.long(),), self.probs.float(), accumulate=True)

"""Distillation losses between the target's sparse top-k and the drafter's logits.

Traces keep only the target's top-k probabilities per position, so every
divergence here is computed on a coarsened vocabulary of K + 1 buckets: the
K recorded tokens plus one "other" bucket holding everything else. The
target's other-bucket mass is what its top-k leaves (1 - sum, clamped at 0;
the top-k is renormalised when float16 rounding makes it sum above 1); the
drafter's is the softmax mass outside the same K ids. Coarsening can only
lose information, so each value is a lower bound on the divergence over the
full vocabulary (data-processing inequality) and is exact when the drafter
matches the target's shape among the unrecorded tokens. Reverse KL needs
log p in the other bucket, where p may be 0: it is floored at `RKL_FLOOR`.

All functions take
    drafter_logits: [N, V] float  the drafter's logits at N draft slots
    top_ids:        [N, K] long   target top-k token ids, -1 marks padding
    top_probs:      [N, K] float  target probabilities of those ids
and return per-slot values [N] (reduce with `weighted_mean`).
"""

from __future__ import annotations

from typing import Callable

import torch

RKL_FLOOR = 1e-6
_LOG_MIN = -69.0  # log(1e-30): keeps empty buckets finite so 0 * log 0 terms stay 0


def coarse_target(top_ids: torch.Tensor, top_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """top_ids, top_probs: [N, K] -> (p_top [N, K], p_other [N]); padding slots get 0."""
    valid = top_ids >= 0
    p_top = torch.where(valid, top_probs.float().clamp(min=0.0), torch.zeros_like(top_probs, dtype=torch.float32))
    mass = p_top.sum(-1, keepdim=True)  # [N, 1]
    p_top = torch.where(mass > 1.0, p_top / mass, p_top)
    p_other = (1.0 - p_top.sum(-1)).clamp(min=0.0)
    return p_top, p_other


def coarse_drafter_logprobs(drafter_logits: torch.Tensor, top_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafter_logits: [N, V]; top_ids: [N, K] -> (log q_top [N, K], log q_other [N])."""
    logits = drafter_logits.float()
    valid = top_ids >= 0
    safe_ids = top_ids.clamp(min=0)
    log_z = torch.logsumexp(logits, dim=-1)  # [N]
    log_q_top = (logits.gather(-1, safe_ids) - log_z.unsqueeze(-1)).clamp(min=_LOG_MIN)  # [N, K]
    # scatter_add (not scatter) so a padding slot mapped to id 0 never unmarks a real token 0.
    hits = torch.zeros_like(logits).scatter_add_(-1, safe_ids, valid.float())  # [N, V]
    outside = logits.masked_fill(hits > 0, torch.finfo(logits.dtype).min)
    log_q_other = (torch.logsumexp(outside, dim=-1) - log_z).clamp(min=_LOG_MIN)  # [N]
    log_q_top = torch.where(valid, log_q_top, torch.full_like(log_q_top, _LOG_MIN))
    return log_q_top, log_q_other


def _buckets(drafter_logits, top_ids, top_probs):
    """-> p [N, K+1], log_q [N, K+1], bucket mask [N, K+1] (padding buckets False)."""
    p_top, p_other = coarse_target(top_ids, top_probs)
    log_q_top, log_q_other = coarse_drafter_logprobs(drafter_logits, top_ids)
    p = torch.cat([p_top, p_other.unsqueeze(-1)], dim=-1)
    log_q = torch.cat([log_q_top, log_q_other.unsqueeze(-1)], dim=-1)
    mask = torch.cat([top_ids >= 0, torch.ones_like(top_ids[:, :1], dtype=torch.bool)], dim=-1)
    return p, log_q, mask


def forward_kl(drafter_logits: torch.Tensor, top_ids: torch.Tensor, top_probs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per slot [N]: mass-covering, the standard distillation objective."""
    p, log_q, mask = _buckets(drafter_logits, top_ids, top_probs)
    log_p = torch.log(p.clamp(min=1e-30))
    terms = torch.where(mask & (p > 0), p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def reverse_kl(drafter_logits: torch.Tensor, top_ids: torch.Tensor, top_probs: torch.Tensor) -> torch.Tensor:
    """KL(q || p) per slot [N]: mode-seeking; target mass floored at RKL_FLOOR."""
    p, log_q, mask = _buckets(drafter_logits, top_ids, top_probs)
    q = log_q.exp()
    log_p = torch.log(p.clamp(min=RKL_FLOOR))
    terms = torch.where(mask, q * (log_q - log_p), torch.zeros_like(q))
    return terms.sum(-1)


def jensen_shannon(drafter_logits: torch.Tensor, top_ids: torch.Tensor, top_probs: torch.Tensor) -> torch.Tensor:
    """JSD(p, q) per slot [N], in nats (at most ln 2)."""
    p, log_q, mask = _buckets(drafter_logits, top_ids, top_probs)
    q = log_q.exp()
    m = 0.5 * (p + q)
    log_m = torch.log(m.clamp(min=1e-30))
    kl_pm = torch.where(mask & (p > 0), p * (torch.log(p.clamp(min=1e-30)) - log_m), torch.zeros_like(p))
    kl_qm = torch.where(mask, q * (log_q - log_m), torch.zeros_like(q))
    return 0.5 * (kl_pm.sum(-1) + kl_qm.sum(-1))


def total_variation(drafter_logits: torch.Tensor, top_ids: torch.Tensor, top_probs: torch.Tensor) -> torch.Tensor:
    """TV(p, q) per slot [N]. 1 - TV is the acceptance probability of a sampled draft token."""
    p, log_q, mask = _buckets(drafter_logits, top_ids, top_probs)
    diff = torch.where(mask, (p - log_q.exp()).abs(), torch.zeros_like(p))
    return 0.5 * diff.sum(-1)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": jensen_shannon,
    "tvd": total_variation,
}


def target_argmax(top_ids: torch.Tensor, top_probs: torch.Tensor) -> torch.Tensor:
    """top_ids, top_probs: [N, K] -> the target's most likely recorded token [N]."""
    scores = torch.where(top_ids >= 0, top_probs.float(), torch.full_like(top_probs, -1.0, dtype=torch.float32))
    return top_ids.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1)


@torch.no_grad()
def mismatch_weights(drafter_logits: torch.Tensor, top_ids: torch.Tensor, top_probs: torch.Tensor,
                     boost: float = 1.0) -> torch.Tensor:
    """Per-slot weights [N]: 1 + boost where the drafter's argmax differs from the
    target's, so the step spends its gradient where drafts get rejected."""
    wrong = drafter_logits.argmax(-1) != target_argmax(top_ids, top_probs)
    return 1.0 + boost * wrong.float()


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values, weights: [N] -> scalar."""
    return (values * weights).sum() / weights.sum().clamp(min=1e-12)

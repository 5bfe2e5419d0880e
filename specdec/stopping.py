"""Draft-stopping rules, evaluated by the drafter after each token it drafts."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class StopRule(enum.IntEnum):  # mirrors specdec.v1.StopRule
    NONE = 0
    ENTROPY = 1          # AdaEDL
    CONFIDENCE = 2       # SpecDec++
    MIN_CONFIDENCE = 3   # BiLD fallback: hand over to the target when the drafter is unsure


ADAEDL_GAMMA = 0.6  # AdaEDL's scale on entropy; the paper tunes it once per drafter family


def adaedl_acceptance_lower_bound(entropy_nats: float, gamma: float = ADAEDL_GAMMA) -> float:
    """AdaEDL's entropy-based lower bound on the probability the token is accepted."""
    return 1.0 - math.sqrt(max(gamma * entropy_nats, 0.0))


def entropy_with_acceptance_bound(acceptance: float, gamma: float = ADAEDL_GAMMA) -> float:
    """The entropy (nats) whose AdaEDL bound is `acceptance`: how a drafter that knows its
    acceptance rate another way (prompt lookup) speaks to the entropy stop rule."""
    return (1.0 - min(max(acceptance, 0.0), 1.0)) ** 2 / gamma


def probability_some_rejected(accept_probs: list[float]) -> float:
    """SpecDec++: P(at least one of the drafted tokens is rejected), tokens treated independently."""
    keep = 1.0
    for p in accept_probs:
        keep *= min(max(p, 0.0), 1.0)
    return 1.0 - keep


@dataclass(frozen=True)
class DraftStep:
    token: int
    confidence: float    # drafter probability of its own token
    entropy: float       # nats
    accept_prob: float   # acceptance head output, or the confidence as a proxy


def should_stop(rule: StopRule, threshold: float, steps: list[DraftStep]) -> bool:
    """True when drafting should end after `steps` (never before the first token)."""
    if not steps or rule == StopRule.NONE:
        return False
    last = steps[-1]
    if rule == StopRule.ENTROPY:
        return adaedl_acceptance_lower_bound(last.entropy) < threshold
    if rule == StopRule.CONFIDENCE:
        return probability_some_rejected([s.accept_prob for s in steps]) > threshold
    if rule == StopRule.MIN_CONFIDENCE:
        return last.confidence < threshold
    raise ValueError(f"unknown stop rule {rule}")

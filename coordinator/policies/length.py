"""Draft-length policies that learn from the request's own blocks: fixed, scheduled, PEARL's, and those
that end a block by a stop rule the drafter applies (AdaEDL, SpecDec++, BiLD)."""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.policies.evidence import GoodputMemory
from coordinator.rounds import RoundOutcome
from specdec.stopping import StopRule


@dataclass
class DraftLengthPolicy:
    length: int          # current draft length
    max_length: int
    name: str = "static"
    threshold: float = 0.0

    @classmethod
    def create(cls, length: int, max_length: int, shared: GoodputMemory | None) -> DraftLengthPolicy:
        """A new request's policy; `shared` is what earlier requests alike in cost measured (most policies ignore it)."""
        return cls(length=length, max_length=max_length)

    def block_size(self) -> int:
        return self.length

    def min_ready(self, overlapped: bool) -> int:
        return self.length

    def lookup_length(self, available: int) -> int:
        """How many of the `available` tokens the coordinator's prompt lookup proposes to verify this round
        (then the drafter is not asked): as many as a drafter block may hold."""
        return min(available, self.block_size())

    def lookahead(self) -> int:
        """How far past the committed text the drafter may run (overlapped mode): a whole next block
        past this one and the target's bonus token, which post-verify drafts must first match."""
        return min(2 * self.length + 1, self.max_length * 2)

    def stop_rule(self) -> tuple[StopRule, float]:
        return StopRule.NONE, 0.0

    def observe(self, outcome: RoundOutcome) -> None:
        self.record_round(outcome.committed, outcome.round_s)
        if outcome.drafted:
            self.update(outcome.sent, outcome.accepted)

    def update(self, sent: int, accepted: int) -> None:
        """Static: nothing to learn."""

    def record_round(self, committed: int, seconds: float) -> None:
        """Wall-clock outcome of one round (target-only rounds too); most policies ignore it."""


@dataclass
class HeuristicPolicy(DraftLengthPolicy):
    """Hugging Face's assisted-generation schedule: +2 after full acceptance, -1 otherwise."""

    name: str = "heuristic"

    def update(self, sent: int, accepted: int) -> None:
        if sent == 0:
            return
        self.length = min(self.length + 2, self.max_length) if accepted == sent else max(self.length - 1, 1)


@dataclass
class PearlPolicy(DraftLengthPolicy):
    """PEARL: verify as soon as one token exists (pre-verify) and keep drafting while the
    target verifies (post-verify), so the draft length becomes whatever the drafter
    produced during the last verification, capped at max_length."""

    name: str = "pearl"
    accepted_ema: float = field(default=0.0)

    def block_size(self) -> int:
        return self.max_length

    def min_ready(self, overlapped: bool) -> int:
        # Sequential mode has no verification to overlap with: draft the adaptive length.
        return 1 if overlapped else self.length

    def lookahead(self) -> int:
        return self.max_length

    def update(self, sent: int, accepted: int) -> None:
        if sent == 0:
            return
        self.accepted_ema = 0.7 * self.accepted_ema + 0.3 * accepted
        self.length = max(1, min(self.max_length, round(self.accepted_ema) + 1))


@dataclass
class AdaEdlPolicy(DraftLengthPolicy):
    """AdaEDL: draft until the entropy-based lower bound on acceptance drops below the threshold."""

    name: str = "adaedl"
    threshold: float = 0.3

    def block_size(self) -> int:
        return self.max_length

    def lookahead(self) -> int:
        return self.max_length

    def min_ready(self, overlapped: bool) -> int:
        return self.max_length  # the stop rule, not a count, ends the block

    def stop_rule(self) -> tuple[StopRule, float]:
        return StopRule.ENTROPY, self.threshold


@dataclass
class SpecDecPPPolicy(AdaEdlPolicy):
    """SpecDec++: stop once P(some drafted token is rejected) exceeds the threshold, using the
    drafter's acceptance head when it has one and its own confidence otherwise."""

    name: str = "specdecpp"
    threshold: float = 0.7

    def stop_rule(self) -> tuple[StopRule, float]:
        return StopRule.CONFIDENCE, self.threshold


@dataclass
class BildPolicy(AdaEdlPolicy):
    """BiLD fallback: hand over to the target as soon as the drafter's confidence in its token is low."""

    name: str = "bild"
    threshold: float = 0.4

    def stop_rule(self) -> tuple[StopRule, float]:
        return StopRule.MIN_CONFIDENCE, self.threshold



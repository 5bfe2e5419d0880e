"""Per-request speculation: each round, for each draft source, the block that raises the batch's goodput.

SmartSpec decides from one acceptance that every request shares. Here a request weighs its own: what
its last blocks from prompt lookup and from the drafter accepted (decayed, smoothed towards what the
coordinator has seen), against what more rows cost the verifier's whole pass, read off the verifier's
measured pass-cost curve (PassCost). A request that copies its prompt keeps drafting long lookup
blocks while free-text requests in the same pass stop, and a request that drafts nothing costs what
a target-only round costs: the engine then calls no drafter at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from coordinator.policies.evidence import BatchCost, GoodputMemory, PassCost
from coordinator.policies.goodput import expected_committed
from coordinator.policies.length import DraftLengthPolicy
from coordinator.rounds import LOOKUP, RoundOutcome


def best_block(acceptance: float, max_length: int, pass_s: Callable[[float], float], other_rows: float,
               other_tokens: float, round_s: float, draft_call_s: float, per_draft_s: float, margin: float) -> int:
    """The block length that maximises the batch's committed tokens per second: this request's 1 + k rows
    join `other_rows` rows of sessions committing `other_tokens`, in a pass of pass_s(rows) seconds plus
    `round_s` of round overhead, and a block of k > 0 adds `draft_call_s` + k * `per_draft_s` of drafting.
    0 unless the best length beats a target-only round by `margin` (the estimates are noisy, and a round
    that loses is worse than none)."""

    def goodput(k: int) -> float:
        seconds = pass_s(other_rows + 1 + k) + round_s + (draft_call_s + per_draft_s * k if k else 0.0)
        return (other_tokens + expected_committed(acceptance, k)) / seconds if seconds > 0 else 0.0

    best = max(range(max_length + 1), key=lambda k: (goodput(k), -k))
    return best if goodput(best) > goodput(0) * (1 + margin) else 0


@dataclass
class SourceAcceptance:
    """One request's per-token acceptance of one draft source, over decayed blocks."""

    accepted: float = 0.0
    rejections: float = 0.0
    decay: float = 0.8  # per block: a copy span that ends stops counting within a few blocks

    def observe(self, sent: int, accepted: int) -> None:
        self.accepted = self.decay * self.accepted + accepted
        self.rejections = self.decay * self.rejections + (accepted < sent)

    def estimate(self, prior: float, prior_blocks: float) -> float:
        return (self.accepted + prior * prior_blocks) / (self.accepted + self.rejections + prior_blocks)


@dataclass
class MarginalPolicy(DraftLengthPolicy):
    name: str = "marginal"
    cost: BatchCost = field(default_factory=BatchCost)
    pass_cost: PassCost = field(default_factory=PassCost)
    prior_blocks: float = 2.0      # how many blocks the coordinator's acceptance counts as
    margin: float = 0.03
    lookup: SourceAcceptance = field(default_factory=SourceAcceptance)
    model: SourceAcceptance = field(default_factory=SourceAcceptance)
    other_rows: float = 0.0
    other_tokens: float = 0.0
    sessions: int = 1              # in the last pass that served this request
    rounds: int = 0
    probing: bool = False          # this request's next round re-measures the drafter for the coordinator

    @classmethod
    def create(cls, length: int, max_length: int, shared: GoodputMemory | None) -> MarginalPolicy:
        if shared is None:
            return cls(length=length, max_length=max_length)
        return cls(length=length, max_length=max_length, cost=shared.batch, pass_cost=shared.pass_cost)

    def block_size(self) -> int:
        """The drafter's block this round."""
        drafting = self.cost.drafting_s()
        if self.pass_cost.seconds(1) is None or drafting is None:
            return self.length if self.rounds % 2 == 0 else 0  # measure a drafted round and an undrafted one
        best = self._best(self.model.estimate(self.cost.acceptance, self.prior_blocks), self.max_length, *drafting)
        return best or (self.length if self.probing else 0)

    def lookup_length(self, available: int) -> int:
        if available == 0:
            return 0
        if self.pass_cost.seconds(1) is None:
            return min(available, self.length)
        return self._best(self.lookup.estimate(self.cost.lookup_acceptance, self.prior_blocks), available, 0.0, 0.0)

    def min_ready(self, overlapped: bool) -> int:
        return self.block_size()

    def lookahead(self) -> int:
        return min(2 * self.block_size() + 1, self.max_length * 2)

    def _best(self, acceptance: float, max_length: int, draft_call_s: float, per_draft_s: float) -> int:
        # A round's time outside the pass keeps the verifier idle only when nobody else has work for it: with
        # S sessions sharing it, others' passes fill that time, so a batch round bears 1/S of it.
        overhead_s = (self.cost.round_overhead_s or 0.0) / self.sessions
        return best_block(acceptance, max_length, self.pass_cost.seconds, self.other_rows, self.other_tokens,
                          overhead_s, draft_call_s, per_draft_s, self.margin)

    def observe(self, outcome: RoundOutcome) -> None:
        self.rounds += 1
        self.cost.observe(outcome)
        if outcome.batch_rows:
            self.pass_cost.observe(outcome.batch_rows, outcome.step_s)
            self.other_rows = max(0.0, outcome.batch_rows - (outcome.sent + 1))
            self.other_tokens = (outcome.batch_sessions - 1) * self.cost.committed_per_round
            self.sessions = max(1, outcome.batch_sessions)
        if outcome.drafted and not outcome.lossy:
            (self.lookup if outcome.source == LOOKUP else self.model).observe(outcome.sent, outcome.accepted)
        elif outcome.drafter_called and not outcome.drafted:
            self.model.observe(1, 0)  # the drafter had nothing to propose: as good as a rejected token
        self._schedule_probe(outcome)

    def _schedule_probe(self, outcome: RoundOutcome) -> None:
        """A drafter judged not to pay is measured no more, so its cost and acceptance would stay as they
        were judged (a slow first call, a bad stretch) forever. The coordinator's requests share one probe
        schedule (DrafterProbes): after enough of their rounds without the drafter, one request drafts one
        round, and the wait doubles each time such a probe does not win the drafter back."""
        probes = self.cost.probes
        if not outcome.drafter_called:
            self.probing = probes.idle_round()
            return
        if self.probing:
            self.probing = False
            probes.probed(won=self.block_size() > 0)
        else:
            probes.drafted()

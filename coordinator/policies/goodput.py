"""Policies that decide by measured goodput (committed tokens per second): GoodputPolicy turns
speculation on or off per request, SmartSpecPolicy picks each round's draft length from the batch's
step cost. Both learn across requests through what they share (GoodputMemory, BatchCost)."""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.policies.evidence import BatchCost, GoodputMemory, decayed_add, speculation_pays, tokens_per_second
from coordinator.policies.length import DraftLengthPolicy, HeuristicPolicy
from coordinator.rounds import RoundOutcome


@dataclass
class GoodputPolicy(HeuristicPolicy):
    """SmartSpec-style goodput control: committed tokens per second of wall time, measured
    per request with speculation (on the heuristic schedule) and without, decides whether
    speculating pays at all. A weak drafter, or drafter and target contending for the same
    cores under load, turns speculation off for the request; the losing choice is re-probed
    for `probe_rounds` after every exploit phase, whose length doubles (up to
    `max_exploit_rounds`) while the same choice keeps winning. With a `memory` shared across
    requests, a request starts where earlier ones left off and feeds its rounds back."""

    name: str = "goodput"
    speculating: bool = True
    probing: bool = False
    phase_rounds: int = 0
    exploit_rounds: int = 8
    min_exploit_rounds: int = 8
    max_exploit_rounds: int = 64
    probe_rounds: int = 4
    decay: float = 0.8  # per round of the same choice: older rounds fade
    # [tokens, seconds, rounds] with and without speculation, exponentially decayed
    observed: dict = field(default_factory=lambda: {True: [0.0, 0.0, 0.0], False: [0.0, 0.0, 0.0]})
    memory: GoodputMemory | None = None

    @classmethod
    def create(cls, length: int, max_length: int, shared: GoodputMemory | None) -> GoodputPolicy:
        return cls(length=length, max_length=max_length, memory=shared)

    def __post_init__(self) -> None:
        favoured = self.memory.favoured() if self.memory is not None else None
        if favoured is not None:
            self.speculating, self.exploit_rounds = favoured, self.memory.exploit_rounds

    def block_size(self) -> int:
        return self.length if self.speculating else 0

    def goodput(self, speculating: bool) -> float:
        return tokens_per_second(self.observed[speculating])

    def speculation_pays(self) -> bool:
        return speculation_pays(self.observed)

    def record_round(self, committed: int, seconds: float) -> None:
        decayed_add(self.observed[self.speculating], self.decay, committed, seconds)
        if self.memory is not None:
            self.memory.record(self.speculating, committed, seconds)
        self.phase_rounds += 1
        if self.phase_rounds < (self.probe_rounds if self.probing else self.exploit_rounds):
            return
        self.phase_rounds = 0
        if not self.probing:
            self.probing, self.speculating = True, not self.speculating
            return
        winner = self.speculation_pays()
        same = winner == (not self.speculating)  # the choice exploited before this probe won again
        self.exploit_rounds = (min(2 * self.exploit_rounds, self.max_exploit_rounds) if same
                               else self.min_exploit_rounds)
        self.probing, self.speculating = False, winner
        if self.memory is not None:
            self.memory.exploit_rounds = self.exploit_rounds


def expected_committed(acceptance: float, length: int) -> float:
    """Tokens a block of `length` drafts commits when each is accepted with probability `acceptance` until
    the first rejection: 1 + a + a^2 + ... + a^length (the target's own token included)."""
    return sum(acceptance ** i for i in range(length + 1))


def best_draft_length(acceptance: float, max_length: int, step: tuple[float, float], exposed: tuple[float, float],
                      other_rows: float, other_tokens: float) -> int:
    """The draft length that maximises the batch's goodput: committed tokens of every session in the pass
    over the pass's time, this request adding 1 + k rows beside `other_rows` of the other sessions, which
    commit `other_tokens`. 0 means a target-only round."""
    (step_base, step_per_row), (exposed_base, exposed_per_draft) = step, exposed

    def goodput(k: int) -> float:
        seconds = step_base + step_per_row * (other_rows + 1 + k) + exposed_base + exposed_per_draft * k
        return (other_tokens + expected_committed(acceptance, k)) / seconds if seconds > 0 else 0.0

    return max(range(max_length + 1), key=lambda k: (goodput(k), -k))


@dataclass
class SmartSpecPolicy(DraftLengthPolicy):
    """SmartSpec (Liu et al. 2024): every round, the draft length that maximises the verifier batch's
    goodput, from the step cost measured online as a line in the pass's rows, the time drafting adds,
    and this request's own acceptance (smoothed towards what the coordinator has seen). Under load a
    pass is compute-bound and extra rows cost as much as they could commit, so speculation switches off
    by itself; it comes back when the load drops. Until both lines are known it alternates between
    `length` drafts and none, which measures them."""

    name: str = "smartspec"
    cost: BatchCost | None = None
    prior_rounds: float = 4.0        # how many blocks the coordinator's acceptance counts as
    accepted: float = 0.0
    rejections: float = 0.0
    other_rows: float = 0.0
    other_tokens: float = 0.0
    rounds: int = 0

    @classmethod
    def create(cls, length: int, max_length: int, shared: GoodputMemory | None) -> SmartSpecPolicy:
        return cls(length=length, max_length=max_length, cost=shared.batch if shared is not None else None)

    def __post_init__(self) -> None:
        self.cost = self.cost or BatchCost()

    def block_size(self) -> int:
        step, exposed = self.cost.step.line(), self.cost.exposed.line()
        if step is None or exposed is None:
            return self.length if self.rounds % 2 == 0 else 0
        return best_draft_length(self.own_acceptance(), self.max_length, step, exposed, self.other_rows,
                                 self.other_tokens)

    def min_ready(self, overlapped: bool) -> int:
        return self.block_size()

    def lookahead(self) -> int:
        return min(2 * self.block_size() + 1, self.max_length * 2)

    def own_acceptance(self) -> float:
        prior = self.cost.acceptance * self.prior_rounds
        return (self.accepted + prior) / (self.accepted + self.rejections + self.prior_rounds)

    def observe(self, outcome: RoundOutcome) -> None:
        self.rounds += 1
        self.cost.observe(outcome)
        if outcome.drafted and not outcome.lossy:
            self.accepted += outcome.accepted
            self.rejections += outcome.accepted < outcome.sent
        if outcome.batch_sessions:
            own_rows = outcome.sent + 1
            self.other_rows = max(0.0, outcome.batch_rows - own_rows)
            self.other_tokens = (outcome.batch_sessions - 1) * self.cost.committed_per_round



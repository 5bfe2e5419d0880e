"""Draft-length policies, one small class each, selectable per request.

A policy answers three questions every round:
- `block_size`: how many draft tokens to send to one verification;
- `min_ready`: how many must be drafted before the verifier may start (the
  overlapped pipeline verifies as soon as this many exist);
- `stop_rule`: which rule the drafter applies to end a draft stream early.
After each verification every controller observes the round's `RoundOutcome`
(coordinator/rounds.py): a policy's `update` sees how many were sent and accepted,
and `record_round` how many tokens the round committed in how much wall time.
A block size of 0 means a target-only round. In overlapped mode `DraftWait` caps how long
the verifier waits for `min_ready`: past that budget it verifies what exists, and
`PostVerify` decides whether drafting runs on past the block while it is verified.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.rounds import RoundOutcome
from specdec.stopping import StopRule


@dataclass
class DraftLengthPolicy:
    length: int          # current draft length
    max_length: int
    name: str = "static"
    threshold: float = 0.0

    def block_size(self) -> int:
        return self.length

    def min_ready(self, overlapped: bool) -> int:
        return self.length

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


def _decayed_add(totals: list[float], decay: float, committed: int, seconds: float) -> None:
    """totals [tokens, seconds, rounds] fade by `decay` per round recorded, then take this round."""
    totals[0] = decay * totals[0] + committed
    totals[1] = decay * totals[1] + seconds
    totals[2] = decay * totals[2] + 1


def _goodput(totals: list[float]) -> float:
    return totals[0] / totals[1] if totals[1] > 0 else 0.0


def _speculation_pays(observed: dict) -> bool:
    """A round whose drafts were all rejected commits only the target's own token, at the cost of
    a target-only round plus drafting, so speculation must commit more than one token per round
    to win; only then does the (noisy) timing comparison decide."""
    tokens, _, rounds = observed[True]
    return tokens > rounds and _goodput(observed[True]) >= _goodput(observed[False])


@dataclass
class GoodputMemory:
    """What goodput policies have measured across requests, one per coordinator and pipeline mode.

    Whether speculation pays depends mostly on the drafter, the target and the load, not on one
    request, and a short request spends much of its life probing. A new request starts with the
    choice this memory favours, and with its current exploit length, instead of re-learning it."""

    decay: float = 0.98  # per round, across requests: the last few hundred rounds count
    min_rounds: float = 3.0  # (decayed) rounds measured on each side before it decides anything
    exploit_rounds: int = 8
    observed: dict = field(default_factory=lambda: {True: [0.0, 0.0, 0.0], False: [0.0, 0.0, 0.0]})
    batch: BatchCost = field(default_factory=lambda: BatchCost())  # what smartspec requests share

    def record(self, speculating: bool, committed: int, seconds: float) -> None:
        _decayed_add(self.observed[speculating], self.decay, committed, seconds)

    def favoured(self) -> bool | None:
        """Whether to start speculating; None until both choices have been measured."""
        if min(self.observed[True][2], self.observed[False][2]) < self.min_rounds:
            return None
        return _speculation_pays(self.observed)


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

    def __post_init__(self) -> None:
        favoured = self.memory.favoured() if self.memory is not None else None
        if favoured is not None:
            self.speculating, self.exploit_rounds = favoured, self.memory.exploit_rounds

    def block_size(self) -> int:
        return self.length if self.speculating else 0

    def goodput(self, speculating: bool) -> float:
        return _goodput(self.observed[speculating])

    def speculation_pays(self) -> bool:
        return _speculation_pays(self.observed)

    def record_round(self, committed: int, seconds: float) -> None:
        _decayed_add(self.observed[self.speculating], self.decay, committed, seconds)
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


@dataclass
class LineFit:
    """y ~ intercept + slope * x by least squares over exponentially decayed samples."""

    decay: float = 0.995
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # weight, x, y, xx, xy

    def add(self, x: float, y: float) -> None:
        self.sums = [self.decay * s + v for s, v in zip(self.sums, (1.0, x, y, x * x, x * y))]

    def line(self) -> tuple[float, float] | None:
        """(intercept, slope >= 0), or None before two distinct x have been seen."""
        w, sx, sy, sxx, sxy = self.sums
        spread = w * sxx - sx * sx
        if w < 2 or spread <= 1e-9 * max(w * sxx, 1e-12):
            return None
        slope = max(0.0, (w * sxy - sx * sy) / spread)
        return (sy - slope * sx) / w, slope


@dataclass
class BatchCost:
    """What SmartSpec requests share, one per coordinator and pipeline mode: the verifier's step time as a
    line in the rows of its batched pass, the round time the verify does not cover (drafting, the
    coordinator) as a line in the draft tokens sent, tokens committed per session-round, and acceptance."""

    step: LineFit = field(default_factory=LineFit)
    exposed: LineFit = field(default_factory=LineFit)
    committed_per_round: float = 1.0
    acceptance: float = 0.5   # per draft token, before any is measured
    decay: float = 0.98

    def observe(self, outcome: RoundOutcome) -> None:
        if outcome.batch_rows:
            self.step.add(outcome.batch_rows, outcome.step_s)
        self.exposed.add(outcome.sent, max(0.0, outcome.round_s - outcome.verify_s))
        self.committed_per_round = self.decay * self.committed_per_round + (1 - self.decay) * outcome.committed
        if outcome.drafted and not outcome.lossy:
            self.acceptance = (self.decay * self.acceptance
                               + (1 - self.decay) * _acceptance_estimate(outcome.sent, outcome.accepted))


def _acceptance_estimate(sent: int, accepted: int) -> float:
    """Per-token acceptance from one block of sent > 0: accepted successes, then a rejection if any."""
    return accepted / (accepted + (accepted < sent))


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


@dataclass
class DraftWait:
    """How long the overlapped pipeline may hold an idle verifier for the drafter's first token.

    A block with one draft costs `per_draft_s` more to verify than a target-only step
    (`step_s`) and commits `acceptance` more tokens on average; a target-only step commits
    one token per `step_s`, and meanwhile the drafter keeps drafting for the next block.
    Waiting w for a draft therefore pays while acceptance * step_s > per_draft_s + w, and
    the budget is acceptance * step_s - per_draft_s. One per coordinator for greedy requests and
    one for sampled ones (only overlapped requests use it): the costs belong to the target, the
    drafter and the load, not to one request."""

    decay: float = 0.9        # per recorded round: the last few dozen rounds count
    acceptance: float = 0.5   # first-draft acceptance, before any is measured
    step_s: float | None = None
    per_draft_s: float | None = None

    def budget_s(self) -> float | None:
        """Seconds to wait; None: wait as the policy asks (not measured yet, so measure that side)."""
        if self.step_s is None:
            return 0.0  # one target-only step measures it
        if self.per_draft_s is None:
            return None
        return max(0.0, self.acceptance * self.step_s - self.per_draft_s)

    def observe(self, outcome: RoundOutcome) -> None:
        if not outcome.lossy:  # a lossy rollback accepts what the lossless rule would not
            self.record(outcome.sent, outcome.accepted, outcome.verify_s)

    def record(self, drafted: int, accepted: int, verify_s: float) -> None:
        """One verification: `drafted` draft tokens sent, `accepted` of them kept, in `verify_s`."""
        if drafted == 0:
            self.step_s = verify_s if self.step_s is None else self._blend(self.step_s, verify_s)
            return
        self.acceptance = self._blend(self.acceptance, float(accepted > 0))
        if self.step_s is not None:
            per_draft = max(0.0, verify_s - self.step_s) / drafted
            self.per_draft_s = per_draft if self.per_draft_s is None else self._blend(self.per_draft_s, per_draft)

    def _blend(self, old: float, new: float) -> float:
        return self.decay * old + (1 - self.decay) * new


@dataclass
class PostVerify:
    """Whether overlapped requests keep drafting past the block being verified (PEARL's post-verify),
    decided by measured goodput, one per coordinator.

    Post-verify drafts are used only when the whole block is accepted and the next draft is the
    target's bonus token; meanwhile the drafter works beside the verifier, which is free on its own
    accelerator but slows the verify where both share cores and memory bandwidth. Rounds run in
    phases of `phase_rounds` with it on or off; committed tokens per second of each (decayed across
    phases) pick the next phase's choice, and every `probe_every`-th phase re-measures the loser."""

    decay: float = 0.98        # per round recorded: the last few hundred rounds count
    phase_rounds: int = 16
    probe_every: int = 4
    enabled: bool = True
    rounds_in_phase: int = 0
    phases: int = 0
    observed: dict = field(default_factory=lambda: {True: [0.0, 0.0, 0.0], False: [0.0, 0.0, 0.0]})

    def observe(self, outcome: RoundOutcome) -> None:
        if outcome.drafted:  # target-only rounds cost the same either way
            self.record(outcome.committed, outcome.round_s)

    def record(self, committed: int, seconds: float) -> None:
        """One overlapped round, run with the current choice."""
        _decayed_add(self.observed[self.enabled], self.decay, committed, seconds)
        self.rounds_in_phase += 1
        if self.rounds_in_phase < self.phase_rounds:
            return
        self.rounds_in_phase = 0
        self.phases += 1
        if self.observed[not self.enabled][2] == 0:
            self.enabled = not self.enabled  # the other choice is still unmeasured
            return
        better = _goodput(self.observed[True]) >= _goodput(self.observed[False])
        self.enabled = (not better) if self.phases % self.probe_every == 0 else better


POLICIES: dict[str, type[DraftLengthPolicy]] = {
    "static": DraftLengthPolicy,
    "heuristic": HeuristicPolicy,
    "pearl": PearlPolicy,
    "adaedl": AdaEdlPolicy,
    "specdecpp": SpecDecPPPolicy,
    "bild": BildPolicy,
    "goodput": GoodputPolicy,
    "smartspec": SmartSpecPolicy,
}


def make_policy(name: str, length: int, max_length: int, threshold: float = 0.0,
                goodput_memory: GoodputMemory | None = None) -> DraftLengthPolicy:
    extra = {}
    if goodput_memory is not None and POLICIES[name] is GoodputPolicy:
        extra = {"memory": goodput_memory}
    elif goodput_memory is not None and POLICIES[name] is SmartSpecPolicy:
        extra = {"cost": goodput_memory.batch}
    policy = POLICIES[name](length=length, max_length=max_length, **extra)
    if threshold > 0:
        policy.threshold = threshold
    return policy

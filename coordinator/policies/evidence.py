"""The goodput model requests share: committed tokens and seconds with and without speculation
(GoodputMemory), and the verifier batch's step cost as lines in rows and drafts (BatchCost), both
decayed so the last few hundred rounds count."""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.rounds import LOOKUP, RoundOutcome


def decayed_add(totals: list[float], decay: float, committed: int, seconds: float) -> None:
    """totals [tokens, seconds, rounds] fade by `decay` per round recorded, then take this round."""
    totals[0] = decay * totals[0] + committed
    totals[1] = decay * totals[1] + seconds
    totals[2] = decay * totals[2] + 1


def tokens_per_second(totals: list[float]) -> float:
    return totals[0] / totals[1] if totals[1] > 0 else 0.0


def speculation_pays(observed: dict) -> bool:
    """A round whose drafts were all rejected commits only the target's own token, at the cost of
    a target-only round plus drafting, so speculation must commit more than one token per round
    to win; only then does the (noisy) timing comparison decide."""
    tokens, _, rounds = observed[True]
    return tokens > rounds and tokens_per_second(observed[True]) >= tokens_per_second(observed[False])


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
    pass_cost: PassCost = field(default_factory=lambda: PassCost())  # what marginal requests read

    def record(self, speculating: bool, committed: int, seconds: float) -> None:
        decayed_add(self.observed[speculating], self.decay, committed, seconds)

    def favoured(self) -> bool | None:
        """Whether to start speculating; None until both choices have been measured."""
        if min(self.observed[True][2], self.observed[False][2]) < self.min_rounds:
            return None
        return speculation_pays(self.observed)


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
    acceptance: float = 0.5   # per draft token of the drafter, before any is measured
    lookup_acceptance: float = 0.5  # per draft token of prompt lookup
    round_overhead_s: float | None = None  # a draftless round's time outside the verifier's pass
    # what drafting adds to a round, by draft tokens; the last few calls count (the load changes it)
    draft_cost: LineFit = field(default_factory=lambda: LineFit(decay=0.8))
    probes: DrafterProbes = field(default_factory=lambda: DrafterProbes())
    decay: float = 0.98

    def observe(self, outcome: RoundOutcome) -> None:
        if outcome.batch_rows:
            self.step.add(outcome.batch_rows, outcome.step_s)
        if outcome.source != LOOKUP:  # a lookup block costs no drafting
            self.exposed.add(outcome.sent, max(0.0, outcome.round_s - outcome.verify_s))
        self.committed_per_round = self.decay * self.committed_per_round + (1 - self.decay) * outcome.committed
        outside = max(0.0, outcome.round_s - outcome.step_s)
        if not outcome.drafter_called:
            self.round_overhead_s = blend(self.round_overhead_s, outside, 0.9)
        elif self.round_overhead_s is not None and not outcome.drafter_caught_up:  # an empty reply costs the call too
            self.draft_cost.add(outcome.sent, max(0.0, outside - self.round_overhead_s))
        if outcome.drafted and not outcome.lossy:
            estimate = acceptance_estimate(outcome.sent, outcome.accepted)
            if outcome.source == LOOKUP:
                self.lookup_acceptance = self.decay * self.lookup_acceptance + (1 - self.decay) * estimate
            else:
                self.acceptance = self.decay * self.acceptance + (1 - self.decay) * estimate


    def drafting_s(self) -> tuple[float, float] | None:
        """(seconds a drafter call adds to its round, seconds each draft token adds); None before one is
        measured. Until blocks of two lengths are, the whole cost is taken as the call's."""
        line = self.draft_cost.line()
        if line is not None:
            return max(0.0, line[0]), line[1]
        weight, _, total = self.draft_cost.sums[:3]
        return (total / weight, 0.0) if weight > 0 else None


@dataclass
class DrafterProbes:
    """When a drafter nobody calls is tried again: after `wait` session-rounds without a drafter call (all
    requests' rounds count), the next request to ask claims one probe; a probe that loses doubles the wait
    (to `max_wait`), one that wins, or any drafting by choice, resets it. A claim whose request ended before
    probing lapses after another `wait`."""

    min_wait: int = 64
    max_wait: int = 4096
    wait: int = 64
    idle: int = 0
    claimed: bool = False

    def idle_round(self) -> bool:
        """One round without the drafter; True when this request should probe on its next round."""
        self.idle += 1
        if self.idle >= self.wait and (not self.claimed or self.idle >= 2 * self.wait):
            self.claimed = True
            self.idle = 0
            return True
        return False

    def probed(self, won: bool) -> None:
        self.claimed, self.idle = False, 0
        self.wait = self.min_wait if won else min(2 * self.wait, self.max_wait)

    def drafted(self) -> None:
        self.idle, self.wait = 0, self.min_wait


def blend(old: float | None, new: float, decay: float) -> float:
    """An exponential moving average's next value; the first sample when there is none yet."""
    return new if old is None else decay * old + (1 - decay) * new


def acceptance_estimate(sent: int, accepted: int) -> float:
    """Per-token acceptance from one block of sent > 0: accepted successes, then a rejection if any."""
    return accepted / (accepted + (accepted < sent))


@dataclass
class PassCost:
    """Seconds of one verifier pass by the rows in it: the verifier's own start-up measurement
    (ModelInfo.pass_costs), scaled by how the passes measured now compare with it (load, a drafter on
    the same cores); without one, a line fitted to the passes measured."""

    calibrated: tuple[tuple[int, float], ...] = ()  # (rows, seconds), fewest rows first
    scale: float = 1.0
    decay: float = 0.95
    fit: LineFit = field(default_factory=LineFit)

    def observe(self, rows: int, seconds: float) -> None:
        self.fit.add(rows, seconds)
        if self.calibrated and rows > 0 and seconds > 0:
            ratio = min(max(seconds / self._curve(rows), 0.2), 5.0)
            self.scale = self.decay * self.scale + (1 - self.decay) * ratio

    def seconds(self, rows: float) -> float | None:
        """A pass of `rows` rows; None while nothing is known."""
        if self.calibrated:
            return self.scale * self._curve(rows)
        line = self.fit.line()
        return None if line is None else line[0] + line[1] * rows

    def _curve(self, rows: float) -> float:
        points = self.calibrated
        if rows <= points[0][0] or len(points) == 1:
            return points[0][1] if rows <= points[0][0] else points[0][1] * rows / points[0][0]
        for (r0, s0), (r1, s1) in zip(points, points[1:]):
            if rows <= r1:
                return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)
        (r0, s0), (r1, s1) = points[-2], points[-1]
        return s1 + max(0.0, (s1 - s0) / (r1 - r0)) * (rows - r1)

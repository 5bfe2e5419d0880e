"""The goodput model requests share: committed tokens and seconds with and without speculation
(GoodputMemory), and the verifier batch's step cost as lines in rows and drafts (BatchCost), both
decayed so the last few hundred rounds count."""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.rounds import RoundOutcome


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
    acceptance: float = 0.5   # per draft token, before any is measured
    decay: float = 0.98

    def observe(self, outcome: RoundOutcome) -> None:
        if outcome.batch_rows:
            self.step.add(outcome.batch_rows, outcome.step_s)
        self.exposed.add(outcome.sent, max(0.0, outcome.round_s - outcome.verify_s))
        self.committed_per_round = self.decay * self.committed_per_round + (1 - self.decay) * outcome.committed
        if outcome.drafted and not outcome.lossy:
            self.acceptance = (self.decay * self.acceptance
                               + (1 - self.decay) * acceptance_estimate(outcome.sent, outcome.accepted))


def acceptance_estimate(sent: int, accepted: int) -> float:
    """Per-token acceptance from one block of sent > 0: accepted successes, then a rejection if any."""
    return accepted / (accepted + (accepted < sent))

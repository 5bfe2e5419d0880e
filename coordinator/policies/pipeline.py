"""Overlapped-pipeline controls, one per coordinator: how long an idle verifier waits for a first draft
(DraftWait), and whether drafting runs on past the block being verified (PostVerify)."""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.policies.evidence import blend, decayed_add, tokens_per_second
from coordinator.rounds import RoundOutcome


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
            self.step_s = blend(self.step_s, verify_s, self.decay)
            return
        self.acceptance = blend(self.acceptance, float(accepted > 0), self.decay)
        if self.step_s is not None:
            per_draft = max(0.0, verify_s - self.step_s) / drafted
            self.per_draft_s = blend(self.per_draft_s, per_draft, self.decay)


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
        decayed_add(self.observed[self.enabled], self.decay, committed, seconds)
        self.rounds_in_phase += 1
        if self.rounds_in_phase < self.phase_rounds:
            return
        self.rounds_in_phase = 0
        self.phases += 1
        if self.observed[not self.enabled][2] == 0:
            self.enabled = not self.enabled  # the other choice is still unmeasured
            return
        better = tokens_per_second(self.observed[True]) >= tokens_per_second(self.observed[False])
        self.enabled = (not better) if self.phases % self.probe_every == 0 else better



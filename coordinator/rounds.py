"""What one verification round did (`RoundOutcome`), and the per-request statistics built from rounds.

Every controller that learns from rounds (the draft-length policy, DraftWait, PostVerify, the
metrics, the request's statistics) observes the same `RoundOutcome` through one observer list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from specdec import metrics


LOOKUP, MODEL = "lookup", "model"  # where a round's draft block came from


@dataclass(frozen=True)
class RoundOutcome:
    sent: int              # draft tokens verified
    accepted: int          # of them, accepted
    committed: int         # tokens the verifier committed: the accepted drafts plus its own token
    round_s: float         # wall time of the round, gathering the block included
    verify_s: float        # the Verify call that answered
    lossy: bool = False    # the verifier applied the lossy BiLD rollback rule
    batch_rows: int = 0    # the verifier's forward pass that served the round: its rows and sessions,
    batch_sessions: int = 0  # all sessions' together, and its compute time
    step_s: float = 0.0
    source: str = ""       # LOOKUP (the coordinator's prompt lookup) or MODEL (the drafter); "" when no draft
    drafter_called: bool = False  # the round asked the drafter (which may have had nothing to propose)
    drafter_caught_up: bool = False  # ... and sent it more context than a round commits (a new or idle session)

    @property
    def drafted(self) -> bool:
        return self.sent > 0


RoundObserver = Callable[[RoundOutcome], None]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    fallback_steps: int = 0
    stale_draft_tokens: int = 0
    speculation_off_rounds: int = 0
    early_verify_rounds: int = 0
    drafted_rounds: int = 0
    lookup_rounds: int = 0
    lookup_drafted_tokens: int = 0
    lookup_accepted_tokens: int = 0
    feature_catch_up_rounds: int = 0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    hidden_draft_ms: float = 0.0
    lossy: bool = False
    drafter_version: str = ""
    policy: str = ""
    mode: str = ""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per verification round (accepted drafts plus the target's token)."""
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def mean_block_length(self) -> float:
        """Draft tokens per round that verified a draft: what the policy chose for this request."""
        return self.drafted_tokens / self.drafted_rounds if self.drafted_rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / (self.total_ms / 1e3) if self.total_ms > 0 else 0.0

    def observe(self, outcome: RoundOutcome) -> None:
        self.rounds += 1
        self.drafted_tokens += outcome.sent
        self.accepted_tokens += outcome.accepted
        self.drafted_rounds += outcome.drafted
        if outcome.source == LOOKUP:
            self.lookup_rounds += 1
            self.lookup_drafted_tokens += outcome.sent
            self.lookup_accepted_tokens += outcome.accepted
        self.lossy |= outcome.lossy

    def add_timings(self, total_s: float, draft_intervals: list[tuple[float, float]],
                    verify_intervals: list[tuple[float, float]]) -> None:
        """The request's wall time, and how much drafting ran while the target verified."""
        self.total_ms = total_s * 1e3
        self.draft_ms = sum(e - s for s, e in draft_intervals) * 1e3
        self.verify_ms = sum(e - s for s, e in verify_intervals) * 1e3
        self.hidden_draft_ms = overlap_ms(draft_intervals, verify_intervals)


@dataclass
class RoundMetrics:
    """Prometheus counters of drafted and accepted tokens, by policy and by draft slot."""

    policy: str

    def observe(self, outcome: RoundOutcome) -> None:
        if not outcome.drafted:
            return
        metrics.DRAFT_TOKENS.labels(policy=self.policy).inc(outcome.sent)
        metrics.ACCEPTED_TOKENS.labels(policy=self.policy).inc(outcome.accepted)
        metrics.ACCEPTED_LENGTH.labels(policy=self.policy).observe(outcome.accepted)
        for slot in range(outcome.sent):
            metrics.POSITION_DRAFTED.labels(position=str(slot)).inc()
            if slot < outcome.accepted:
                metrics.POSITION_ACCEPTED.labels(position=str(slot)).inc()


def overlap_ms(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> float:
    """Total time (ms) covered by both sets of (start, end) intervals."""
    total = 0.0
    for start, end in first:
        for s2, e2 in second:
            if e2 <= start or s2 >= end:
                continue
            total += min(end, e2) - max(start, s2)
    return total * 1e3

"""Greedy acceptance of a drafter on recorded traces, and the promotion gate.

Under greedy verification a draft token is accepted iff it equals the
target's argmax, so a drafter's expected accepted length on a trace is the
number of leading draft slots where its argmax matches the target's. A slot
can only be judged while the trace's own prefix follows the target's greedy
path: after the first slot where the recorded draft token differs from the
target's argmax, the drafter would be conditioned on text the target never
produces. Distillation traces follow the target everywhere, and may be whole
continuations, so on them a draft is scored from every start position.

Held-out traces can carry weights: the gate weighs recent traffic more, so
that after a domain shift a candidate is judged on the traffic it will serve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from specdec.traces import TEACHER_DRAFTER_VERSION, TraceRecord
from trainer.batching import build_batch, slot_forward
from trainer.losses import target_argmax


@dataclass
class AcceptanceReport:
    mean_accepted_length: float  # leading agreeing slots per block, weighted mean (the gate metric);
    # for teacher traces, the mean agreeing run from every position (TEACHER_DRAFT_WINDOW at most)
    agreement_rate: float  # drafter argmax == target argmax over judged slots, weighted
    blocks: int  # traces with at least one judged slot
    judged_slots: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateDecision:
    promote: bool
    reason: str
    metrics: dict


def judged_slots(draft_tokens: list[int], target_best: list[int | None]) -> int:
    """How many leading draft slots lie on the target's greedy path (slot i needs
    the target's argmax at i, and draft slots before i equal to the target's)."""
    count = 0
    for i in range(len(draft_tokens)):
        if i >= len(target_best) or target_best[i] is None:
            break
        count += 1
        if draft_tokens[i] != target_best[i]:
            break
    return count


def greedy_accepted_length(drafter_best: list[int], target_best: list[int | None], draft_tokens: list[int]) -> tuple[int, int]:
    """-> (accepted length, judged slots) for one block under greedy verification."""
    judged = judged_slots(draft_tokens, target_best)
    accepted = 0
    while accepted < judged and drafter_best[accepted] == target_best[accepted]:
        accepted += 1
    return accepted, judged


# Teacher traces are whole continuations: the gate scores a draft of up to this many tokens
# started at every position of them, as the drafter would be used, not only the run from slot 0.
TEACHER_DRAFT_WINDOW = 8


def windowed_accepted_length(drafter_best: list[int], target_best: list[int], window: int) -> float:
    """Mean over start positions p of the agreeing run from p, capped at `window`; only starts
    with a whole window left count (a block of at most `window` slots: p = 0 only). All slots judged."""
    n = min(len(drafter_best), len(target_best))
    if n == 0:
        return 0.0
    runs = [0] * (n + 1)
    for p in range(n - 1, -1, -1):  # runs[p] = 1 + runs[p + 1] where the argmaxes agree
        runs[p] = runs[p + 1] + 1 if drafter_best[p] == target_best[p] else 0
    starts = max(1, n - window + 1)
    return sum(min(runs[p], window) for p in range(starts)) / starts


# Traces older than this many half-lives weigh under 5% and are not evaluated.
RECENCY_HORIZON_HALF_LIVES = math.log2(20)


def recency_weights(count: int, half_life: int) -> list[float]:
    """Weights of `count` traces, oldest first: 1 for the newest, halving every `half_life` (0: all 1)."""
    if half_life <= 0:
        return [1.0] * count
    return [0.5 ** ((count - 1 - i) / half_life) for i in range(count)]


def recent_holdout(records: list[TraceRecord], half_life: int) -> tuple[list[TraceRecord], list[float]]:
    """-> (the held-out traces worth evaluating, their recency weights); `records` oldest first."""
    if half_life > 0:
        records = records[-math.ceil(half_life * RECENCY_HORIZON_HALF_LIVES):]
    return records, recency_weights(len(records), half_life)


@dataclass(frozen=True)
class TraceScore:
    """One held-out trace scored for one model."""
    accepted: float  # the gate metric: leading agreeing slots (teacher traces: windowed mean)
    judged: int
    agreed: int


def trace_key(record: TraceRecord) -> tuple:
    """Identifies a trace's content: a request's committed prefix of a given length never changes, and the
    target's top-k follows from it and the draft, so equal keys score alike under any one model."""
    return record.request_id, len(record.context_ids), tuple(record.draft_tokens)


@torch.no_grad()
def score_traces(model, records: list[TraceRecord], batch_size: int = 16,
                 max_context: int = 256) -> list[TraceScore | None]:
    """Teacher-forces `model` on each trace and scores its greedy draft; None where no slot can be judged."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[TraceScore | None] = [None] * len(records)
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            batch = build_batch(chunk, max_context=max_context)
            if batch is None:
                continue
            batch = batch.to(device)
            logits, _hidden = slot_forward(model, batch.input_ids, batch.attention_mask, batch.slot_row, batch.slot_pos)
            drafter_best = logits.argmax(-1).tolist()
            target_best = target_argmax(batch.top_ids, batch.top_probs).tolist()
            per_record: dict[int, tuple[dict[int, int], dict[int, int]]] = {}
            for s, record_number in enumerate(batch.record_index.tolist()):
                mine, theirs = per_record.setdefault(record_number, ({}, {}))
                slot = int(batch.slot_index[s])
                mine[slot] = drafter_best[s]
                theirs[slot] = target_best[s]
            for record_number, (mine, theirs) in per_record.items():
                draft = chunk[record_number].draft_tokens
                target_row = [theirs.get(i) for i in range(len(draft))]
                drafter_row = [mine.get(i, -1) for i in range(len(draft))]
                accepted, judged = greedy_accepted_length(drafter_row, target_row, draft)
                if judged == 0:
                    continue
                if chunk[record_number].drafter_version == TEACHER_DRAFTER_VERSION:
                    accepted = windowed_accepted_length(drafter_row[:judged], target_row[:judged],
                                                        TEACHER_DRAFT_WINDOW)
                agreed = sum(drafter_row[i] == target_row[i] for i in range(judged))
                scores[start + record_number] = TraceScore(accepted, judged, agreed)
    finally:
        model.train(was_training)
    return scores


def summarize(scores: list[TraceScore | None], weights: list[float] | None = None) -> AcceptanceReport:
    """Weighted means over the scored traces (weights: one per score, default 1)."""
    if weights is not None and len(weights) != len(scores):
        raise ValueError(f"{len(weights)} weights for {len(scores)} records")
    total_accepted = total_agree = total_weight = total_judged_weight = 0.0
    blocks = judged = 0
    for i, score in enumerate(scores):
        if score is None:
            continue
        weight = 1.0 if weights is None else weights[i]
        blocks += 1
        judged += score.judged
        total_weight += weight
        total_accepted += weight * score.accepted
        total_judged_weight += weight * score.judged
        total_agree += weight * score.agreed
    return AcceptanceReport(
        mean_accepted_length=total_accepted / total_weight if total_weight else 0.0,
        agreement_rate=total_agree / total_judged_weight if total_judged_weight else 0.0,
        blocks=blocks,
        judged_slots=judged,
    )


def evaluate_acceptance(model, records: list[TraceRecord], weights: list[float] | None = None,
                        batch_size: int = 16, max_context: int = 256) -> AcceptanceReport:
    """`model`'s greedy acceptance on held-out traces; the report's means are weighted by `weights`."""
    return summarize(score_traces(model, records, batch_size, max_context), weights)


class ScoreCache:
    """Per-trace scores of one fixed model. The gate's reference changes only on a promotion, so each
    gate scores it on the held-out traces that arrived since the last one, not on all of them again."""

    def __init__(self, model, max_context: int = 256):
        self.model = model
        self.max_context = max_context
        self.scores: dict[tuple, TraceScore | None] = {}

    def seed(self, records: list[TraceRecord], scores: list[TraceScore | None]) -> None:
        """Scores computed elsewhere for this very model (a candidate that was just promoted)."""
        self.scores.update(zip(map(trace_key, records), scores))

    def report(self, records: list[TraceRecord], weights: list[float] | None = None) -> AcceptanceReport:
        keys = [trace_key(r) for r in records]
        missing = list({k: r for k, r in zip(keys, records) if k not in self.scores}.values())
        if missing:
            self.seed(missing, score_traces(self.model, missing, max_context=self.max_context))
        self.scores = {k: self.scores[k] for k in keys}  # forget traces that left the held-out set
        return summarize([self.scores[k] for k in keys], weights)


def gate(candidate: AcceptanceReport, current: AcceptanceReport, min_blocks: int = 1) -> GateDecision:
    """Promote only when the candidate's accepted length is strictly better on the same traces."""
    metrics = {"candidate": candidate.as_dict(), "current": current.as_dict()}
    if candidate.blocks < min_blocks:
        return GateDecision(False, f"only {candidate.blocks} held-out blocks (need {min_blocks})", metrics)
    if candidate.mean_accepted_length > current.mean_accepted_length:
        return GateDecision(True, (f"accepted length {candidate.mean_accepted_length:.3f} > "
                                   f"{current.mean_accepted_length:.3f} on {candidate.blocks} held-out blocks"), metrics)
    return GateDecision(False, (f"accepted length {candidate.mean_accepted_length:.3f} <= "
                                f"{current.mean_accepted_length:.3f} on {candidate.blocks} held-out blocks"), metrics)

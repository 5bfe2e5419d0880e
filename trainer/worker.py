"""The online-distillation loop: traces in, better drafter checkpoints out.

`TrainerWorker` owns what every kind of drafter shares: the consumer group,
kill safety, the held-out split, the promotion gate and the checkpoint store.
A strategy owns the drafter and how traces train it:
  `TokenDistillation`   a token drafter, one optimisation step per batch;
  `trainer.eagle.FeatureRefinement`  a feature (EAGLE) drafter, one
                        fine-tuning round on a window of recent traces.

One `TrainerWorker.step`:
  0. skip undelivered traces older than `max_trace_age_s` when the worker has
     fallen behind the traffic,
  1. fetch a batch from the consumer group (stale entries of dead workers first),
  2. hold out ~1/10 of requests (by request-id hash, so all blocks of a request
     land on the same side),
  3. hand the batch to the strategy,
  4. XACK only once the traces are used: at once for a strategy that trains per
     batch, after the next gate for one that keeps a window (its entries stay
     pending, kept fresh so no live peer claims them), so a crash at any point
     leaves them for another worker to reclaim.
When the strategy says a candidate is due, the worker publishes it and gates
it: the candidate and the current drafter are scored on the same held-out
traffic and the candidate is promoted only if strictly better
(trainer.evaluation.gate). Every decision is logged in the store.

Several workers (Ray actors) each train their own replica; after a rejected
candidate a token worker adopts the current checkpoint if that scored better
and another worker promoted it (or its own candidates keep losing), so
replicas follow the best promoted model rather than averaging gradients.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import redis
import torch
from prometheus_client import REGISTRY, CollectorRegistry

from specdec.config import TrainerSettings
from specdec.models.accept_head import AcceptHead, accept_head_loss
from specdec.models.checkpoints import CheckpointError, CheckpointStore, version_name
from specdec.models.vocab_head import drop_excluded, head_token_ids
from specdec.traces import TraceRecord, sample_fraction
from trainer.batching import build_batch, slot_forward, usable
from trainer.consumer import TraceConsumer
from trainer.evaluation import (
    AcceptanceReport,
    GateDecision,
    ScoreCache,
    gate,
    recent_holdout,
    score_traces,
    summarize,
)
from trainer.losses import LOSSES, mismatch_weights, weighted_mean
from trainer.metrics import trainer_metrics

log = logging.getLogger(__name__)

STALE_LOG_INTERVAL_S = 60.0


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Lineage:
    """What a token drafter's checkpoints record about the models it serves with."""
    target_version: str = ""
    tokenizer_fingerprint: str = ""


@dataclass
class StepResult:
    entry_ids: list[str]
    request_ids: list[str]  # of decodable traces, trained on or held out
    trained: int
    held_out: int
    bad: int
    claimed: int
    acked: int = 0  # entries this step's XACK removed from the group's pending list
    loss: float | None = None
    accept_loss: float | None = None
    error: str = ""
    decision: GateDecision | None = None


@dataclass
class GateReference:
    """What a candidate must beat, with that model's per-trace held-out scores."""
    version: int | None  # None: the worker's starting weights
    model: torch.nn.Module
    accept_head: AcceptHead | None
    name: str
    scores: ScoreCache | None = None


@dataclass
class RunSummary:
    steps: int
    traces: int
    decisions: list[dict]


@dataclass
class Candidate:
    """A strategy's weights to publish, with what its checkpoint records."""
    model: torch.nn.Module
    accept_head: AcceptHead | None
    meta: dict


@dataclass
class Judgement:
    """A candidate and the model it must beat, scored on the same held-out traffic."""
    candidate: AcceptanceReport
    reference: AcceptanceReport
    reference_name: str
    holdout_traces: int


class Strategy(Protocol):
    """How a kind of drafter learns from the traces a TrainerWorker hands it."""
    holds_traces: bool  # True: traces stay pending until the next gate has used them
    steps: int  # optimisation steps (a strategy training in rounds: rounds)
    vocab_size: int  # traces with token ids outside it are skipped

    def take(self, train: list[TraceRecord], holdout: list[TraceRecord]) -> tuple[float | None, float | None]:
        """Uses a batch; returns (loss, acceptance-head loss) of a step it took, else Nones."""

    def due(self, idle: bool) -> bool:
        """Whether a candidate is ready for the gate (`idle`: the stream has nothing new)."""

    def candidate(self) -> Candidate: ...

    def judge(self, current_version: int | None) -> Judgement: ...

    def decided(self, promoted: bool, candidate_version: int, current_version: int | None,
                judgement: Judgement) -> None: ...


class TokenDistillation:
    """A token drafter (and its acceptance head) trained one step per batch: teacher-forced on
    context + draft tokens, its prediction at every draft slot matched to the target's top-k
    (weighted towards slots it got wrong); every `publish_every` steps a candidate is due."""

    holds_traces = False

    def __init__(self, drafter: torch.nn.Module, store: CheckpointStore, settings: TrainerSettings,
                 lineage: Lineage = Lineage(), accept_head: AcceptHead | None = None,
                 base_version: int | None = None):
        if settings.loss not in LOSSES:
            raise ValueError(f"unknown loss {settings.loss!r}; choose from {sorted(LOSSES)}")
        self.settings, self.tuning, self.lineage = settings, settings.tuning, lineage
        self.drafter = drafter
        self.device = next(drafter.parameters()).device
        self.store = store
        hidden_size = drafter.get_output_embeddings().weight.shape[1]
        if accept_head is None and self.tuning.train_accept_head:
            accept_head = AcceptHead(hidden_size)
        self.accept_head = accept_head.to(self.device) if accept_head is not None else None
        self.vocab_size = int(drafter.config.vocab_size)
        self.base_version = base_version
        # The weights we started from: the gate's reference until a checkpoint is current.
        self._baseline = copy.deepcopy(drafter).eval()
        # Online batches are small and noisy: the averaged weights make steadier candidates.
        self._averaged = copy.deepcopy(drafter).eval() if settings.ema_decay > 0 else None
        self.holdout: deque[TraceRecord] = deque(maxlen=self.tuning.holdout_size)
        self.steps = 0
        self._due = False
        self._rejects_in_row = 0
        self._reference_cached: GateReference | None = None
        self._holdout_scores: tuple[list[TraceRecord], list[float], list] | None = None
        self._make_optimizers()

    def _make_optimizers(self) -> None:
        self.optimizer = torch.optim.AdamW(self.drafter.parameters(), lr=self.settings.lr, weight_decay=0.0)
        self.head_optimizer = (torch.optim.AdamW(self.accept_head.parameters(), lr=self.tuning.accept_head_lr)
                               if self.accept_head is not None else None)

    def take(self, train: list[TraceRecord], holdout: list[TraceRecord]) -> tuple[float | None, float | None]:
        self._due = False
        self.holdout.extend(holdout)
        if not train:
            return None, None
        loss, head_loss = self.train_on(train)
        if loss is not None:
            self.steps += 1
            self._due = self.steps % self.settings.publish_every == 0
        return loss, head_loss

    def due(self, idle: bool) -> bool:
        return self._due and not idle

    def train_on(self, records: list[TraceRecord]) -> tuple[float | None, float | None]:
        """One optimisation step of the drafter (and the acceptance head) on `records`."""
        batch = build_batch(records, max_context=self.tuning.max_context, merge_requests=True)
        if batch is None:
            return None, None
        batch = batch.to(self.device)
        self.drafter.train()
        logits, hidden = slot_forward(self.drafter, batch.input_ids, batch.attention_mask, batch.slot_row,
                                      batch.slot_pos)  # [S, V], [S, H]
        top_ids = drop_excluded(batch.top_ids, head_token_ids(self.drafter), self.vocab_size)  # [S, K]
        per_slot = LOSSES[self.settings.loss](logits, top_ids, batch.top_probs)  # [S]
        weights = (mismatch_weights(logits, top_ids, batch.top_probs, self.tuning.mismatch_boost)
                   if self.tuning.mismatch_boost > 0 else torch.ones_like(per_slot))
        loss = weighted_mean(per_slot, weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.tuning.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.tuning.grad_clip)
        self.optimizer.step()
        self._update_average()
        head_loss = self._train_accept_head(batch, logits.detach(), hidden.detach())
        return float(loss.detach()), head_loss

    @torch.no_grad()
    def _update_average(self) -> None:
        if self._averaged is None:
            return
        for averaged, trained in zip(self._averaged.parameters(), self.drafter.parameters()):
            averaged.lerp_(trained, 1.0 - self.settings.ema_decay)

    @property
    def weights(self) -> torch.nn.Module:
        """The weights the next gate publishes and judges."""
        return self._averaged if self._averaged is not None else self.drafter

    def _train_accept_head(self, batch, logits: torch.Tensor, hidden: torch.Tensor) -> float | None:
        """logits: [S, V], hidden: [S, H], both from the forward that produced the drafts' predictions."""
        if self.accept_head is None:
            return None
        labels = batch.accept_label.clone()
        mask = batch.accept_mask.clone()
        # Teacher traces carry the target's tokens: the drafter's draft there would be
        # accepted (greedy) exactly when its argmax equals that token.
        teacher = batch.teacher_slot
        labels[teacher] = (logits.argmax(-1)[teacher] == batch.draft_token[teacher]).float()
        mask |= teacher
        if not bool(mask.any()):
            return None
        self.accept_head.train()
        head_loss = accept_head_loss(self.accept_head.logits(hidden.to(next(self.accept_head.parameters()).dtype)), labels, mask)
        self.head_optimizer.zero_grad(set_to_none=True)
        head_loss.backward()
        self.head_optimizer.step()
        return float(head_loss.detach())

    # -- the gate's questions ----------------------------------------------

    def candidate(self) -> Candidate:
        self._due = False
        return Candidate(self.weights, self.accept_head, {
            "parent_version": self.base_version, "loss": self.settings.loss, "lr": self.settings.lr,
            "target_version": self.lineage.target_version,
            "tokenizer_fingerprint": self.lineage.tokenizer_fingerprint})

    def judge(self, current_version: int | None) -> Judgement:
        holdout, weights = recent_holdout(list(self.holdout), self.settings.holdout_half_life)
        reference = self._reference(current_version)
        candidate_scores = score_traces(self.weights, holdout, max_context=self.tuning.max_context)
        self._holdout_scores = (holdout, weights, candidate_scores)
        return Judgement(summarize(candidate_scores, weights), reference.scores.report(holdout, weights),
                         reference.name, len(holdout))

    def decided(self, promoted: bool, candidate_version: int, current_version: int | None,
                judgement: Judgement) -> None:
        holdout, _weights, candidate_scores = self._holdout_scores
        if promoted:
            self.base_version = candidate_version
            # The promoted candidate is the next reference, and its held-out scores are already known.
            self._reference(candidate_version).scores.seed(holdout, candidate_scores)
            self._rejects_in_row = 0
            return
        self._rejects_in_row += 1
        reference = self._reference(current_version)
        if (self.tuning.resync_on_reject and current_version is not None
                and judgement.reference.mean_accepted_length > judgement.candidate.mean_accepted_length
                and self._should_resync(current_version)):
            self._adopt(reference.model, reference.accept_head, current_version)

    def _reference(self, current_version: int | None) -> GateReference:
        """The model the candidate must beat: the current checkpoint, else our starting weights;
        loaded and scored again only when it changes."""
        if self._reference_cached is not None and self._reference_cached.version == current_version:
            return self._reference_cached
        reference = None
        if current_version is not None:
            try:
                loaded = self.store.load(current_version, device=str(self.device))
                reference = GateReference(current_version, loaded.model, loaded.accept_head,
                                          version_name(current_version))
            except CheckpointError as err:
                log.error("current checkpoint %s is unusable, gating against the starting weights: %s",
                          version_name(current_version), err)
        if reference is None:
            reference = GateReference(None, self._baseline, None, "starting weights")
        reference.scores = ScoreCache(reference.model, self.tuning.max_context)
        self._reference_cached = reference
        return reference

    def _should_resync(self, current_version: int) -> bool:
        """Follow a better current checkpoint another worker (or a person) promoted at once. Our own
        promoted checkpoint is an ancestor of our weights: a few rejections mean "not better yet"
        (after a traffic shift, progress takes more than one publish interval), so keep training."""
        try:
            ours = self.store.meta(current_version).get("consumer") == self.settings.consumer_name
        except CheckpointError:
            ours = False
        return not ours or self._rejects_in_row >= self.tuning.resync_after_rejects

    def _adopt(self, model: torch.nn.Module, head: AcceptHead | None, version: int) -> None:
        ours, theirs = self.drafter.state_dict(), model.state_dict()
        if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
            # Another architecture (checked first: load_state_dict would copy part, then raise).
            log.warning("cannot adopt %s: its architecture differs from ours", version_name(version))
            return
        log.info("adopting %s, which beat our candidate", version_name(version))
        self.drafter.load_state_dict(theirs)
        if self._averaged is not None:
            self._averaged.load_state_dict(theirs)
        if head is not None and self.accept_head is not None and head.spec() == self.accept_head.spec():
            self.accept_head.load_state_dict(head.state_dict())
        self.base_version = version
        self._rejects_in_row = 0
        self._make_optimizers()


class TrainerWorker:
    """One member of the trainers' consumer group, training a drafter with `strategy`."""

    def __init__(self, strategy: Strategy, store: CheckpointStore, client: redis.Redis, settings: TrainerSettings,
                 registry: CollectorRegistry = REGISTRY):
        if not settings.consumer_name:
            settings = settings.model_copy(update={"consumer_name": default_consumer_name()})
        self.strategy, self.store, self.settings = strategy, store, settings
        self.consumer = TraceConsumer(client, settings.trace_stream, settings.consumer_group, settings.consumer_name,
                                      settings.claim_idle_ms)
        self.traces_seen = 0
        self.decisions: list[dict] = []
        self._held: list[str] = []  # entry ids the strategy keeps until the next gate, unacked
        self._stale_unlogged, self._stale_logged_at = 0, -STALE_LOG_INTERVAL_S
        self.metrics = trainer_metrics(registry)

    @property
    def steps(self) -> int:
        return self.strategy.steps

    def is_holdout(self, request_id: str) -> bool:
        return sample_fraction("holdout:" + request_id) < self.settings.holdout_fraction

    # -- one step ----------------------------------------------------------

    def step(self, block_ms: int | None = None) -> StepResult | None:
        """Fetches, hands the batch to the strategy, acks; gates when a candidate is due.
        None when no trace arrived within block_ms."""
        self._skip_stale()
        self.consumer.keep_alive(self._held)
        steps_before = self.steps
        entries = self.consumer.fetch(self.settings.batch_size,
                                      self.settings.tuning.block_ms if block_ms is None else block_ms)
        self._update_lag()
        if not entries:
            if self.strategy.due(idle=True):
                self._gate_and_release()
                self.metrics.steps.inc(self.steps - steps_before)
            return None
        train, holdout, bad = [], [], []
        for entry in entries:
            if entry.record is None or not usable(entry.record, self.strategy.vocab_size):
                bad.append(entry)
                log.warning("skipping trace %s: %s", entry.entry_id, entry.error or "token ids outside the drafter vocabulary")
            elif self.is_holdout(entry.record.request_id):
                holdout.append(entry.record)
            else:
                train.append(entry.record)
        result = StepResult(entry_ids=[e.entry_id for e in entries],
                            request_ids=[r.request_id for r in (*train, *holdout)], trained=len(train),
                            held_out=len(holdout), bad=len(bad), claimed=sum(e.claimed for e in entries))
        try:
            result.loss, result.accept_loss = self.strategy.take(train, holdout)
        except Exception as err:  # noqa: BLE001 - a poison batch must not be redelivered forever
            log.exception("training step failed; dropping %d traces", len(train))
            result.error = repr(err)
        if self.strategy.holds_traces and not result.error:
            self._held.extend(result.entry_ids)
        else:
            result.acked = self.consumer.ack(result.entry_ids)  # only now: the batch has been used
        self.traces_seen += len(entries)
        self.metrics.traces.labels(use="train").inc(len(train))
        self.metrics.traces.labels(use="holdout").inc(len(holdout))
        self.metrics.traces.labels(use="bad").inc(len(bad))
        if result.loss is not None:
            self.metrics.loss.set(result.loss)
        if self.strategy.due(idle=False):
            result.decision, released = self._gate_and_release()
            result.acked += released
        self.metrics.steps.inc(self.steps - steps_before)
        return result

    def _skip_stale(self) -> None:
        skipped = self.consumer.skip_older_than(self.settings.max_trace_age_s)
        if not skipped:
            return
        self.metrics.traces.labels(use="stale").inc(skipped)
        self._stale_unlogged += skipped
        now = time.monotonic()
        if now - self._stale_logged_at >= STALE_LOG_INTERVAL_S:  # a slow trainer skips every step: log a summary
            log.warning("trainer behind the traffic: skipped %d traces older than %.0f s", self._stale_unlogged,
                        self.settings.max_trace_age_s)
            self._stale_unlogged, self._stale_logged_at = 0, now

    def _gate_and_release(self) -> tuple[GateDecision, int]:
        """Gates the due candidate, then acks the traces it was made from."""
        decision = self.publish_and_gate()
        released = self.consumer.ack(self._held)
        self._held = []
        return decision, released

    # -- publishing and the gate -------------------------------------------

    def publish_and_gate(self) -> GateDecision:
        """Publishes the strategy's candidate, then promotes or rejects it (logged in the store)."""
        candidate = self.strategy.candidate()
        meta = {**candidate.meta, "consumer": self.settings.consumer_name, "steps": self.steps,
                "traces_seen": self.traces_seen}
        candidate_version = self.store.publish(candidate.model, meta, accept_head=candidate.accept_head)
        current_version = self.store.current()
        judgement = self.strategy.judge(current_version)
        decision = gate(judgement.candidate, judgement.reference, min_blocks=self.settings.tuning.min_holdout_blocks)
        decision.metrics.update({"candidate_version": candidate_version, "reference": judgement.reference_name,
                                 "steps": self.steps, "holdout_traces": judgement.holdout_traces})
        if decision.promote:
            self.store.promote(candidate_version, decision.reason, decision.metrics)
        else:
            self.store.reject(candidate_version, decision.reason, decision.metrics)
        self.strategy.decided(decision.promote, candidate_version, current_version, judgement)
        self.metrics.decisions.labels(action="promote" if decision.promote else "reject").inc()
        self.metrics.holdout_accepted_length.labels(model="candidate").set(judgement.candidate.mean_accepted_length)
        self.metrics.holdout_accepted_length.labels(model="current").set(judgement.reference.mean_accepted_length)
        self.decisions.append({"version": candidate_version, "promote": decision.promote, "reason": decision.reason})
        self._prune()
        return decision

    def _prune(self) -> None:
        rejected = [v for v, action in sorted(self.store.statuses().items()) if action == "reject"]
        for version in rejected[: max(0, len(rejected) - self.settings.tuning.keep_rejected)]:
            self.store.remove(version)

    def _update_lag(self) -> None:
        try:
            self.metrics.stream_lag.set(self.consumer.lag())
        except redis.RedisError:
            pass

    # -- loops -------------------------------------------------------------

    def run(self, max_steps: int | None = None, idle_exit_s: float | None = None,
            stop: threading.Event | None = None) -> RunSummary:
        """Steps until `max_steps` more strategy steps, `idle_exit_s` without traces, or `stop` is set."""
        idle_since = time.monotonic()
        start_steps = self.steps
        while not (stop is not None and stop.is_set()):
            try:
                result = self.step()
            except redis.RedisError as err:
                log.warning("Redis error, retrying in 1 s: %s", err)
                time.sleep(1.0)
                continue
            if max_steps is not None and self.steps - start_steps >= max_steps:
                break
            now = time.monotonic()
            if result is not None:
                idle_since = now
            elif idle_exit_s is not None and now - idle_since >= idle_exit_s:
                break
        return RunSummary(steps=self.steps, traces=self.traces_seen, decisions=list(self.decisions))

    def drain(self) -> RunSummary:
        """Consumes everything currently in the stream, then returns."""
        return self.run(idle_exit_s=0.0)


def token_worker(drafter: torch.nn.Module, store: CheckpointStore, client: redis.Redis, settings: TrainerSettings,
                 lineage: Lineage = Lineage(), accept_head: AcceptHead | None = None,
                 base_version: int | None = None, registry: CollectorRegistry = REGISTRY) -> TrainerWorker:
    """A worker training a token drafter (TokenDistillation)."""
    if not settings.consumer_name:
        settings = settings.model_copy(update={"consumer_name": default_consumer_name()})
    strategy = TokenDistillation(drafter, store, settings, lineage, accept_head, base_version)
    return TrainerWorker(strategy, store, client, settings, registry)

"""The online-distillation loop: traces in, better drafter checkpoints out.

One `TrainerWorker.step`:
  0. skip undelivered traces older than `max_trace_age_s` when the worker has
     fallen behind the traffic,
  1. fetch a batch from the consumer group (stale entries of dead workers first),
  2. hold out ~1/10 of requests (by request-id hash, so all blocks of a request
     land on the same side) into a bounded buffer for the promotion gate,
  3. teacher-force the drafter on context + draft tokens, match its prediction
     at every draft slot to the target's top-k (weighted towards slots it got
     wrong), and fit the acceptance head on the same forward's detached
     hidden states,
  4. XACK only then, so a crash before this point leaves the traces pending
     for another worker to reclaim.
Every `publish_every` steps it publishes a checkpoint and runs the gate: the
candidate and the current drafter are scored on the same held-out traces,
newer ones weighing more so that a traffic shift is judged on the new traffic,
and the candidate is promoted only if strictly better. Every decision is
logged in the store.

Several workers (Ray actors) each train their own replica; after a rejected
candidate a worker adopts the current checkpoint if that scored better and
another worker promoted it (or its own candidates keep losing), so replicas
follow the best promoted model rather than averaging gradients.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import redis
import torch
from prometheus_client import REGISTRY, CollectorRegistry

from specdec.accept_head import AcceptHead, accept_head_loss
from specdec.checkpoints import CheckpointError, CheckpointStore, version_name
from specdec.traces import DEFAULT_STREAM, TraceRecord, sample_fraction
from specdec.vocab_head import drop_excluded, head_token_ids
from trainer.batching import build_batch, slot_forward, usable
from trainer.consumer import TraceConsumer
from trainer.evaluation import GateDecision, ScoreCache, gate, recent_holdout, score_traces, summarize
from trainer.losses import LOSSES, mismatch_weights, weighted_mean
from trainer.metrics import trainer_metrics

log = logging.getLogger(__name__)

STALE_LOG_INTERVAL_S = 60.0


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class WorkerOptions:
    stream: str = DEFAULT_STREAM
    group: str = "specd-trainers"
    consumer: str = field(default_factory=default_consumer_name)
    batch_size: int = 32
    lr: float = 1e-4
    loss: str = "fkl"
    publish_every: int = 20
    claim_idle_ms: int = 30_000
    holdout_fraction: float = 0.1  # share of requests kept out of training for the gate
    holdout_size: int = 512  # most recent held-out traces kept
    holdout_half_life: int = 128  # gate weight halves per this many newer held-out traces (0: uniform)
    max_trace_age_s: float = 300.0  # undelivered traces older than this are skipped, not trained on (0: never)
    min_holdout_blocks: int = 8  # fewer judged blocks than this: the gate rejects
    mismatch_boost: float = 1.0  # extra weight of slots where drafter argmax != target argmax (0: off)
    max_context: int = 256  # context tokens the drafter sees per trace
    accept_head_lr: float = 1e-3
    train_accept_head: bool = True
    block_ms: int = 500  # keep below the Redis socket timeout
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # candidates are this exponential moving average of the trained weights (0: the weights)
    resync_on_reject: bool = True
    resync_after_rejects: int = 5  # own candidates rejected this often in a row: restart from the current one
    keep_rejected: int = 5  # rejected checkpoints kept on disk
    target_version: str = ""
    tokenizer_fingerprint: str = ""

    @classmethod
    def from_settings(cls, settings, **extra) -> "WorkerOptions":
        """From specdec.config.TrainerSettings; `extra` sets fields the schema does not have."""
        return cls(stream=settings.trace_stream, group=settings.consumer_group,
                   consumer=settings.consumer_name or default_consumer_name(), batch_size=settings.batch_size,
                   lr=settings.lr, loss=settings.loss, publish_every=settings.publish_every,
                   claim_idle_ms=settings.claim_idle_ms, holdout_fraction=settings.holdout_fraction,
                   holdout_half_life=settings.holdout_half_life, max_trace_age_s=settings.max_trace_age_s,
                   ema_decay=settings.ema_decay, **extra)


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


class TrainerWorker:
    def __init__(self, drafter: torch.nn.Module, store: CheckpointStore, client: redis.Redis,
                 options: WorkerOptions | None = None, accept_head: AcceptHead | None = None,
                 base_version: int | None = None, registry: CollectorRegistry = REGISTRY):
        self.options = options or WorkerOptions()
        if self.options.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.options.loss!r}; choose from {sorted(LOSSES)}")
        self.drafter = drafter
        self.device = next(drafter.parameters()).device
        self.store = store
        self.consumer = TraceConsumer(client, self.options.stream, self.options.group, self.options.consumer,
                                      self.options.claim_idle_ms)
        hidden_size = drafter.get_output_embeddings().weight.shape[1]
        if accept_head is None and self.options.train_accept_head:
            accept_head = AcceptHead(hidden_size)
        self.accept_head = accept_head.to(self.device) if accept_head is not None else None
        self.vocab_size = int(drafter.config.vocab_size)
        self.base_version = base_version
        # The weights we started from: the gate's reference until a checkpoint is current.
        self._baseline = copy.deepcopy(drafter).eval()
        # Online batches are small and noisy: the averaged weights make steadier candidates.
        self._averaged = copy.deepcopy(drafter).eval() if self.options.ema_decay > 0 else None
        self.holdout: deque[TraceRecord] = deque(maxlen=self.options.holdout_size)
        self.steps = 0
        self.traces_seen = 0
        self.decisions: list[dict] = []
        self._stale_unlogged, self._stale_logged_at = 0, -STALE_LOG_INTERVAL_S
        self._rejects_in_row = 0
        self._reference_cached: GateReference | None = None
        self.metrics = trainer_metrics(registry)
        self._make_optimizers()

    def _make_optimizers(self) -> None:
        self.optimizer = torch.optim.AdamW(self.drafter.parameters(), lr=self.options.lr, weight_decay=0.0)
        self.head_optimizer = (torch.optim.AdamW(self.accept_head.parameters(), lr=self.options.accept_head_lr)
                               if self.accept_head is not None else None)

    def is_holdout(self, request_id: str) -> bool:
        return sample_fraction("holdout:" + request_id) < self.options.holdout_fraction

    # -- one step ----------------------------------------------------------

    def step(self, block_ms: int | None = None) -> StepResult | None:
        """Fetches, trains, acks; None when no trace arrived within block_ms."""
        self._skip_stale()
        entries = self.consumer.fetch(self.options.batch_size,
                                      self.options.block_ms if block_ms is None else block_ms)
        self._update_lag()
        if not entries:
            return None
        train, holdout, bad = [], [], []
        for entry in entries:
            if entry.record is None or not usable(entry.record, self.vocab_size):
                bad.append(entry)
                log.warning("skipping trace %s: %s", entry.entry_id, entry.error or "token ids outside the drafter vocabulary")
            elif self.is_holdout(entry.record.request_id):
                holdout.append(entry.record)
            else:
                train.append(entry.record)
        self.holdout.extend(holdout)
        result = StepResult(entry_ids=[e.entry_id for e in entries],
                            request_ids=[r.request_id for r in (*train, *holdout)], trained=len(train),
                            held_out=len(holdout), bad=len(bad), claimed=sum(e.claimed for e in entries))
        if train:
            try:
                result.loss, result.accept_loss = self.train_on(train)
            except Exception as err:  # noqa: BLE001 - a poison batch must not be redelivered forever
                log.exception("training step failed; dropping %d traces", len(train))
                result.error = repr(err)
        result.acked = self.consumer.ack(result.entry_ids)  # only now: the batch has been used
        self.traces_seen += len(entries)
        self.metrics.traces.labels(use="train").inc(len(train))
        self.metrics.traces.labels(use="holdout").inc(len(holdout))
        self.metrics.traces.labels(use="bad").inc(len(bad))
        if result.loss is not None:
            self.steps += 1
            self.metrics.steps.inc()
            self.metrics.loss.set(result.loss)
            if self.steps % self.options.publish_every == 0:
                result.decision = self.publish_and_gate()
        return result

    def _skip_stale(self) -> None:
        skipped = self.consumer.skip_older_than(self.options.max_trace_age_s)
        if not skipped:
            return
        self.metrics.traces.labels(use="stale").inc(skipped)
        self._stale_unlogged += skipped
        now = time.monotonic()
        if now - self._stale_logged_at >= STALE_LOG_INTERVAL_S:  # a slow trainer skips every step: log a summary
            log.warning("trainer behind the traffic: skipped %d traces older than %.0f s", self._stale_unlogged,
                        self.options.max_trace_age_s)
            self._stale_unlogged, self._stale_logged_at = 0, now

    def train_on(self, records: list[TraceRecord]) -> tuple[float | None, float | None]:
        """One optimisation step of the drafter (and the acceptance head) on `records`."""
        batch = build_batch(records, max_context=self.options.max_context, merge_requests=True)
        if batch is None:
            return None, None
        batch = batch.to(self.device)
        self.drafter.train()
        logits, hidden = slot_forward(self.drafter, batch.input_ids, batch.attention_mask, batch.slot_row,
                                      batch.slot_pos)  # [S, V], [S, H]
        top_ids = drop_excluded(batch.top_ids, head_token_ids(self.drafter), self.vocab_size)  # [S, K]
        per_slot = LOSSES[self.options.loss](logits, top_ids, batch.top_probs)  # [S]
        weights = (mismatch_weights(logits, top_ids, batch.top_probs, self.options.mismatch_boost)
                   if self.options.mismatch_boost > 0 else torch.ones_like(per_slot))
        loss = weighted_mean(per_slot, weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.options.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.options.grad_clip)
        self.optimizer.step()
        self._update_average()
        head_loss = self._train_accept_head(batch, logits.detach(), hidden.detach())
        return float(loss.detach()), head_loss

    @torch.no_grad()
    def _update_average(self) -> None:
        if self._averaged is None:
            return
        for averaged, trained in zip(self._averaged.parameters(), self.drafter.parameters()):
            averaged.lerp_(trained, 1.0 - self.options.ema_decay)

    @property
    def candidate(self) -> torch.nn.Module:
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

    # -- publishing and the gate -------------------------------------------

    def publish_and_gate(self) -> GateDecision:
        """Publishes the current weights, then promotes or rejects them (logged in the store)."""
        holdout, weights = recent_holdout(list(self.holdout), self.options.holdout_half_life)
        meta = {"parent_version": self.base_version, "steps": self.steps, "traces_seen": self.traces_seen,
                "loss": self.options.loss, "lr": self.options.lr, "consumer": self.options.consumer,
                "target_version": self.options.target_version,
                "tokenizer_fingerprint": self.options.tokenizer_fingerprint}
        candidate_version = self.store.publish(self.candidate, meta, accept_head=self.accept_head)
        current_version = self.store.current()
        reference = self._reference(current_version)
        candidate_scores = score_traces(self.candidate, holdout, max_context=self.options.max_context)
        candidate_report = summarize(candidate_scores, weights)
        reference_report = reference.scores.report(holdout, weights)
        decision = gate(candidate_report, reference_report, min_blocks=self.options.min_holdout_blocks)
        decision.metrics.update({"candidate_version": candidate_version, "reference": reference.name,
                                 "steps": self.steps, "holdout_traces": len(holdout)})
        if decision.promote:
            self.store.promote(candidate_version, decision.reason, decision.metrics)
            self.base_version = candidate_version
            # The promoted candidate is the next reference, and its held-out scores are already known.
            self._reference(candidate_version).scores.seed(holdout, candidate_scores)
            self._rejects_in_row = 0
        else:
            self.store.reject(candidate_version, decision.reason, decision.metrics)
            self._rejects_in_row += 1
            if (self.options.resync_on_reject and current_version is not None
                    and reference_report.mean_accepted_length > candidate_report.mean_accepted_length
                    and self._should_resync(current_version)):
                self._adopt(reference.model, reference.accept_head, current_version)
        self.metrics.decisions.labels(action="promote" if decision.promote else "reject").inc()
        self.metrics.holdout_accepted_length.labels(model="candidate").set(candidate_report.mean_accepted_length)
        self.metrics.holdout_accepted_length.labels(model="current").set(reference_report.mean_accepted_length)
        self.decisions.append({"version": candidate_version, "promote": decision.promote, "reason": decision.reason})
        self._prune()
        return decision

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
        reference.scores = ScoreCache(reference.model, self.options.max_context)
        self._reference_cached = reference
        return reference

    def _should_resync(self, current_version: int) -> bool:
        """Follow a better current checkpoint another worker (or a person) promoted at once. Our own
        promoted checkpoint is an ancestor of our weights: a few rejections mean "not better yet"
        (after a traffic shift, progress takes more than one publish interval), so keep training."""
        try:
            ours = self.store.meta(current_version).get("consumer") == self.options.consumer
        except CheckpointError:
            ours = False
        return not ours or self._rejects_in_row >= self.options.resync_after_rejects

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

    def _prune(self) -> None:
        rejected = [v for v, action in sorted(self.store.statuses().items()) if action == "reject"]
        for version in rejected[: max(0, len(rejected) - self.options.keep_rejected)]:
            self.store.remove(version)

    def _update_lag(self) -> None:
        try:
            self.metrics.stream_lag.set(self.consumer.lag())
        except redis.RedisError:
            pass

    # -- loops -------------------------------------------------------------

    def run(self, max_steps: int | None = None, idle_exit_s: float | None = None,
            stop: threading.Event | None = None) -> RunSummary:
        """Steps until `max_steps`, `idle_exit_s` without traces, or `stop` is set."""
        idle_since = time.monotonic()
        start_steps = self.steps
        while not (stop is not None and stop.is_set()):
            try:
                result = self.step()
            except redis.RedisError as err:
                log.warning("Redis error, retrying in 1 s: %s", err)
                time.sleep(1.0)
                continue
            now = time.monotonic()
            if result is None:
                if idle_exit_s is not None and now - idle_since >= idle_exit_s:
                    break
                continue
            idle_since = now
            if max_steps is not None and self.steps - start_steps >= max_steps:
                break
        return RunSummary(steps=self.steps, traces=self.traces_seen, decisions=list(self.decisions))

    def drain(self) -> RunSummary:
        """Consumes everything currently in the stream, then returns."""
        return self.run(idle_exit_s=0.0)

"""Prometheus metrics of the trainer, created once per registry so several
workers in one process (tests, threads) share them instead of failing to
register twice."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from specdec.metrics import register


@dataclass
class TrainerMetrics:
    loss: Gauge
    steps: Counter
    stream_lag: Gauge
    traces: Counter  # labelled by use: train, holdout, bad
    decisions: Counter  # labelled by action: promote, reject
    holdout_accepted_length: Gauge  # labelled by model: candidate, current


_by_registry: "weakref.WeakKeyDictionary[CollectorRegistry, TrainerMetrics]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def trainer_metrics(registry: CollectorRegistry) -> TrainerMetrics:
    with _lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = TrainerMetrics(
                loss=register(registry, Gauge, "specd_trainer_loss", "Distillation loss of the last step."),
                steps=register(registry, Counter, "specd_trainer_steps_total", "Optimisation steps taken."),
                stream_lag=register(registry, Gauge, "specd_trace_stream_lag",
                                    "Traces in the stream not yet delivered to the trainer group."),
                traces=register(registry, Counter, "specd_trainer_traces_total", "Traces consumed, by use.",
                                ("use",)),
                decisions=register(registry, Counter, "specd_trainer_checkpoint_decisions_total",
                                   "Promotion gate decisions.", ("action",)),
                holdout_accepted_length=register(registry, Gauge, "specd_trainer_holdout_accepted_length",
                                                 "Greedy accepted length on held-out traces at the last gate.",
                                                 ("model",)),
            )
            _by_registry[registry] = metrics
        return metrics

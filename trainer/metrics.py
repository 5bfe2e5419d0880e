"""Prometheus metrics of the trainer; several workers in one process (tests,
threads) share one set per registry instead of failing to register twice."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from specdec.metrics import register


@dataclass
class TrainerMetrics:
    loss: Gauge
    steps: Counter
    stream_lag: Gauge
    traces: Counter  # labelled by use: train, holdout, bad, stale (skipped: too old)
    decisions: Counter  # labelled by action: promote, reject
    holdout_accepted_length: Gauge  # labelled by model: candidate, current


def trainer_metrics(registry: CollectorRegistry) -> TrainerMetrics:
    return TrainerMetrics(
        loss=register(registry, Gauge, "specd_trainer_loss", "Distillation loss of the last step."),
        steps=register(registry, Counter, "specd_trainer_steps_total", "Optimisation steps taken."),
        stream_lag=register(registry, Gauge, "specd_trace_stream_lag",
                            "Traces in the stream not yet delivered to the trainer group."),
        traces=register(registry, Counter, "specd_trainer_traces_total", "Traces consumed, by use.", ("use",)),
        decisions=register(registry, Counter, "specd_trainer_checkpoint_decisions_total",
                           "Promotion gate decisions.", ("action",)),
        holdout_accepted_length=register(registry, Gauge, "specd_trainer_holdout_accepted_length",
                                         "Greedy accepted length on held-out traces at the last gate.", ("model",)),
    )

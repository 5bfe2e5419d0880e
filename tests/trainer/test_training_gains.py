"""What online training buys: a worker trained on teacher traces raises acceptance on prompts it never saw,
and its acceptance head learns to predict which draft slots the target accepts."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from conftest import shutdown_redis
from trainer_world import STREAM, make_worker, same_weights, tiny_llama
from trainer_world import world  # noqa: F401 - a fixture

from specdec import redisutil
from specdec.models.accept_head import AcceptHead, accept_head_loss
from specdec.models.checkpoints import CheckpointStore
from specdec.traces import append_traces
from trainer.batching import build_batch, slot_forward
from trainer.evaluation import evaluate_acceptance
from trainer.worker import TrainerWorker


@dataclass
class TrainingRun:
    worker: TrainerWorker
    store: CheckpointStore
    losses: list[float]
    initial_head: AcceptHead
    before: object  # AcceptanceReport on held-out prompts
    after: object
    decision: object


@pytest.fixture(scope="module")
def training_run(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("training")
    client = redisutil.connect("embedded", state_directory=tmp / "state")
    store = CheckpointStore(tmp / "ck", redis_client=client)
    drafter = tiny_llama(seed=101)  # same shape as the target, unrelated weights
    before = evaluate_acceptance(drafter, world.held)
    # A higher head learning rate than the default: this run is 60 steps, not thousands.
    worker = make_worker(drafter, store, client, batch_size=32, lr=3e-3, accept_head_lr=1e-2)
    initial_head = copy.deepcopy(worker.strategy.accept_head)
    losses = []
    for _epoch in range(2):
        append_traces(client, world.train, stream=STREAM)
        while (result := worker.step()) is not None:
            losses.append(result.loss)
    decision = worker.publish_and_gate()
    after = evaluate_acceptance(drafter, world.held)
    yield TrainingRun(worker, store, losses, initial_head, before, after, decision)
    shutdown_redis(client)


def test_training_raises_acceptance_on_held_out_prompts(training_run):
    run = training_run
    assert len(run.losses) >= 50
    assert sum(run.losses[-5:]) < 0.6 * sum(run.losses[:5]), run.losses[::8]
    # Held-out prompts the worker never saw: greedy agreement and accepted length per 4-token block.
    assert run.before.agreement_rate < 0.1 and run.after.agreement_rate > run.before.agreement_rate + 0.3
    assert run.after.mean_accepted_length > run.before.mean_accepted_length + 0.5
    # The gate (on the worker's own 10% hold-out) promoted the trained weights, and they load back.
    assert run.decision.promote, run.decision.reason
    loaded = run.store.load()
    assert loaded.version == run.decision.metrics["candidate_version"] == run.store.current()
    assert same_weights(loaded.model, run.worker.strategy.drafter)


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    positive, negative = scores[labels == 1], scores[labels == 0]
    return float((positive[:, None] > negative[None, :]).float().mean())


def _head_data(model, records):
    """-> hidden [S, H] and greedy-acceptance labels [S] of every draft slot."""
    batch = build_batch(records)
    with torch.no_grad():
        logits, hidden = slot_forward(model.eval(), batch.input_ids, batch.attention_mask, batch.slot_row,
                                      batch.slot_pos)
    slots = batch.teacher_slot
    return hidden[slots], (logits.argmax(-1) == batch.draft_token)[slots].float()


def test_accept_head_learns_to_predict_acceptance(training_run, world):
    run = training_run
    hidden, labels = _head_data(run.worker.strategy.drafter, world.held)
    assert 0.2 < float(labels.mean()) < 0.9  # both outcomes occur
    everything = torch.ones_like(labels, dtype=torch.bool)
    with torch.no_grad():
        trained_loss = float(accept_head_loss(run.worker.strategy.accept_head.logits(hidden), labels, everything))
        initial_loss = float(accept_head_loss(run.initial_head.logits(hidden), labels, everything))
        online = run.worker.strategy.accept_head(hidden)
    # Trained online next to a moving drafter, on prompts it never saw: better than where it started,
    # and it ranks accepted slots above rejected ones more often than chance.
    assert trained_loss < initial_loss
    assert _auc(online, labels) > 0.6
    assert float(torch.corrcoef(torch.stack([online, labels]))[0, 1]) > 0.15
    # The checkpoint carries the head, and it predicts the same.
    torch.testing.assert_close(run.store.load().accept_head(hidden), online)

    # For a fixed drafter the head fits its acceptance pattern well beyond the base rate.
    train_hidden, train_labels = _head_data(run.worker.strategy.drafter, world.train[::2])
    torch.manual_seed(0)
    head = AcceptHead(hidden.shape[-1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    train_mask = torch.ones_like(train_labels, dtype=torch.bool)
    fit = []
    for _ in range(200):
        loss = accept_head_loss(head.logits(train_hidden), train_labels, train_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        fit.append(float(loss.detach()))
    assert fit[-1] < fit[0] - 0.1
    with torch.no_grad():
        held_loss = float(accept_head_loss(head.logits(hidden), labels, everything))
        auc = _auc(head(hidden), labels)
    rate = float(labels.mean())
    prior = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))  # BCE of always predicting the base rate
    assert held_loss < prior and auc > 0.7

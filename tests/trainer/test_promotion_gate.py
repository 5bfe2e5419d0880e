"""The promotion gate: a candidate checkpoint is promoted only when it beats the current one on held-out
traces (recent ones weighed more), with the reference scored once per trace, averaged weights when asked,
and a worker's own lineage kept through a few rejections."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import perturbed
from trainer_world import STREAM, make_worker, random_prompts, same_weights, tiny_llama, traces_for
from trainer_world import world  # noqa: F401 - a fixture

from specdec.models.checkpoints import CheckpointStore, read_redis_pointer
from specdec.traces import append_traces


def test_gate_rejects_a_worse_checkpoint_and_promotes_a_better_one(world, tmp_path, redis_client):
    store = CheckpointStore(tmp_path / "ck", redis_client=redis_client)
    current = perturbed(world.target, 0.5, seed=2)
    first = store.publish(current)
    store.promote(first, "bootstrap")
    append_traces(redis_client, world.held, stream=STREAM)

    # Every trace goes to the gate's hold-out; each worker reads the stream in its own group.
    worse = make_worker(perturbed(world.target, 4.0, seed=3), store, redis_client, consumer_group="gate-worse",
                        holdout_fraction=1.0)
    worse.drain()
    assert len(worse.strategy.holdout) == len(world.held) and worse.steps == 0
    decision = worse.publish_and_gate()
    candidate, reference = decision.metrics["candidate"], decision.metrics["current"]
    assert not decision.promote and decision.metrics["reference"] == "v1"
    assert candidate["mean_accepted_length"] < reference["mean_accepted_length"]
    assert store.current() == first and read_redis_pointer(redis_client) == first
    assert store.status(2) == "reject"
    # The losing replica continues from the better current checkpoint.
    assert same_weights(worse.strategy.drafter, store.load(first).model) and worse.strategy.base_version == first

    better = make_worker(copy.deepcopy(world.target), store, redis_client, consumer_group="gate-better", holdout_fraction=1.0)
    better.drain()
    decision = better.publish_and_gate()
    assert decision.promote, decision.reason
    assert decision.metrics["candidate"]["mean_accepted_length"] == pytest.approx(4.0)
    assert store.current() == 3 and read_redis_pointer(redis_client) == 3

    logged = store.decisions()
    assert [(d["action"], d["version"]) for d in logged] == [("promote", 1), ("reject", 2), ("promote", 3)]
    assert logged[1]["metrics"]["candidate"] == candidate and logged[1]["metrics"]["current"] == reference
    assert "<=" in logged[1]["reason"] and ">" in logged[2]["reason"]

    # Without enough held-out evidence nothing is promoted, however good the candidate.
    blind = make_worker(copy.deepcopy(world.target), store, redis_client, consumer_group="gate-blind")
    decision = blind.publish_and_gate()
    assert not decision.promote and "held-out blocks" in decision.reason and store.current() == 3


def test_gate_scores_its_reference_once_per_held_out_trace(world, tmp_path, redis_client, monkeypatch):
    """The reference only changes on a promotion: each gate scores it on the traces new since the last
    gate, with the same verdicts as scoring everything; a promoted candidate's scores are reused."""
    import trainer.evaluation as evaluation

    scored = []
    real_score = evaluation.score_traces
    monkeypatch.setattr(evaluation, "score_traces",  # what the reference's cache scores
                        lambda model, records, *a, **k: scored.append(len(records)) or real_score(model, records, *a, **k))
    store = CheckpointStore(tmp_path / "ck", redis_client=redis_client)
    current = perturbed(world.target, 0.5, seed=2)
    store.promote(store.publish(current), "bootstrap")
    worker = make_worker(perturbed(world.target, 4.0, seed=3), store, redis_client, consumer_group="gate-cache",
                         holdout_fraction=1.0, holdout_half_life=0, resync_on_reject=False)
    half = len(world.held) // 2
    for part in (world.held[:half], world.held[half:]):
        append_traces(redis_client, part, stream=STREAM)
        worker.drain()
        decision = worker.publish_and_gate()
        assert not decision.promote
        uncached = evaluation.summarize(real_score(current, list(worker.strategy.holdout)))
        assert decision.metrics["current"] == uncached.as_dict()
    assert scored == [half, len(world.held) - half]

    worker.strategy.drafter.load_state_dict(world.target.state_dict())  # now a better candidate
    assert worker.publish_and_gate().promote
    scored.clear()
    decision = worker.publish_and_gate()  # same weights against themselves: scored once, reused
    assert scored == [] and not decision.promote
    assert decision.metrics["current"] == decision.metrics["candidate"]


def test_candidates_average_the_trained_weights_when_asked(world, tmp_path, redis_client):
    """With ema_decay the gate publishes and judges the moving average of the weights after each step;
    training goes on from the weights themselves, and adopting a checkpoint resets both."""
    store = CheckpointStore(tmp_path / "ck", redis_client=redis_client)
    append_traces(redis_client, world.train[:40], stream=STREAM)
    decay = 0.6
    worker = make_worker(perturbed(world.target, 1.0, seed=5), store, redis_client, consumer_group="ema", batch_size=8,
                         lr=1e-2, ema_decay=decay, holdout_fraction=0.0, min_holdout_blocks=0)
    expected = {k: v.clone() for k, v in worker.strategy.drafter.state_dict().items()}
    for _ in range(4):
        assert worker.step(block_ms=100).loss is not None
        for key, value in worker.strategy.drafter.state_dict().items():
            expected[key] = decay * expected[key] + (1 - decay) * value
    version = worker.publish_and_gate().metrics["candidate_version"]
    published = store.load(version).model.state_dict()
    trained = worker.strategy.drafter.state_dict()
    changed = [k for k in published if not torch.equal(trained[k], expected[k])]
    assert changed, "training did not move the weights"
    for key in published:
        torch.testing.assert_close(published[key], expected[key], rtol=1e-5, atol=1e-6)

    other = copy.deepcopy(world.target)
    worker.strategy._adopt(other, None, version)
    assert same_weights(worker.strategy.drafter, other) and same_weights(worker.strategy.weights, other)


def test_gate_judges_a_domain_shift_on_the_new_traffic(world, tmp_path, redis_client):
    """Held-out traffic shifts from the current drafter's domain to a new one: a candidate that
    learned the new domain loses on all held-out traces equally weighted, and wins when the gate
    weighs recent traces more."""
    new_target = tiny_llama(seed=7)
    old_domain, new_domain = world.train[:192], traces_for(new_target, random_prompts(12, seed=3), "new")
    store = CheckpointStore(tmp_path / "ck", redis_client=redis_client)
    store.promote(store.publish(copy.deepcopy(world.target)), "serves the old domain")
    append_traces(redis_client, old_domain + new_domain, stream=STREAM)

    def gate_with(half_life: int):
        worker = make_worker(copy.deepcopy(new_target), store, redis_client, consumer_group=f"shift-{half_life}",
                             holdout_fraction=1.0, holdout_half_life=half_life, resync_on_reject=False)
        worker.drain()
        assert len(worker.strategy.holdout) == len(old_domain) + len(new_domain) == 240
        return worker.publish_and_gate()

    uniform = gate_with(0)
    assert not uniform.promote, uniform.reason
    recent = gate_with(16)
    assert recent.promote, recent.reason
    # Only the recent window was judged, and the old domain's traces at its start still count a little.
    assert recent.metrics["holdout_traces"] == 70 and recent.metrics["candidate"]["blocks"] == 70
    assert 3.0 < recent.metrics["candidate"]["mean_accepted_length"] < 4.0


def test_a_worker_keeps_its_own_lineage_through_a_few_rejections(world, tmp_path, redis_client):
    """Its own promoted checkpoint is an ancestor of its weights: a rejection means "not better yet",
    so it keeps training them, and restarts from the checkpoint only after repeated rejections."""
    store = CheckpointStore(tmp_path / "ck", redis_client=redis_client)
    store.promote(store.publish(copy.deepcopy(world.target), {"consumer": "test-worker"}), "our earlier candidate")
    append_traces(redis_client, world.held, stream=STREAM)
    worker = make_worker(perturbed(world.target, 4.0, seed=3), store, redis_client, consumer_group="lineage",
                         holdout_fraction=1.0, resync_after_rejects=2)
    own = copy.deepcopy(worker.strategy.drafter)
    worker.drain()
    assert not worker.publish_and_gate().promote
    assert same_weights(worker.strategy.drafter, own) and worker.strategy.base_version is None
    assert not worker.publish_and_gate().promote
    assert same_weights(worker.strategy.drafter, store.load(1).model) and worker.strategy.base_version == 1

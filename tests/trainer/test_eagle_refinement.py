"""The EAGLE strategy in the same trainer worker: rounds read the consumer group and pass the worker's gate,
and traces stay pending until a round uses them, for a peer to reclaim after a kill."""

from __future__ import annotations

import time

import torch
from prometheus_client import CollectorRegistry
from trainer_world import STREAM, trainer_settings

from specdec.models.checkpoints import CheckpointStore
from specdec.traces import TraceRecord, append_traces
from trainer.bootstrap import greedy_with_features
from trainer.worker import TrainerWorker


def eagle_worker(target, store, client, **options) -> TrainerWorker:
    from trainer.eagle import FeatureRefinement

    settings = trainer_settings(**options)
    return TrainerWorker(FeatureRefinement(target, store, settings.eagle), store, client, settings,
                         registry=CollectorRegistry())


def repeated_traffic(target, texts: int, requests: int, prefix: str) -> list[TraceRecord]:
    """Teacher traces of `requests` requests cycling over `texts` greedy continuations: the tiny target is
    chaotic, so traffic repeats itself (new request ids, the same texts), as a domain does."""
    from specdec.traces import TEACHER_DRAFTER_VERSION

    torch.manual_seed(0)
    prompts = [torch.randint(0, 256, (6,)).tolist() for _ in range(texts)]
    continuations = [s.continuation for s in greedy_with_features(target, prompts, 24, pad_id=0, eos_ids=set())]
    return [TraceRecord(request_id=f"{prefix}{i}", drafter_version=TEACHER_DRAFTER_VERSION,
                        context_ids=prompts[i % texts], draft_tokens=continuations[i % texts], accepted=24)
            for i in range(requests)]


def eagle_store(target, path) -> CheckpointStore:
    from trainer.eagle import init_from_target

    store = CheckpointStore(path)
    store.promote(store.publish(init_from_target(target), meta={"kind": "eagle"}), "base")
    return store


def test_eagle_rounds_read_the_consumer_group_and_pass_the_workers_gate(tiny_dirs, tmp_path, redis_client,
                                                                        monkeypatch):
    from specdec.models.eagle import is_feature_drafter
    from specdec.models.loader import load_model

    target = load_model(tiny_dirs["llama"]["target"]).model
    records = repeated_traffic(target, texts=12, requests=36, prefix="r")
    store = eagle_store(target, tmp_path / "store")
    append_traces(redis_client, records, stream=STREAM)
    worker = eagle_worker(target, store, redis_client, holdout_fraction=0.25, min_holdout_blocks=1,
                          eagle={"epochs": 150, "lr": 3e-3, "round_traces": 10**6})
    held = {r.request_id for r in records if worker.is_holdout(r.request_id)}
    assert 0 < len(held) < len(records)

    summary = worker.drain()  # the stream goes idle: one round on everything read
    assert summary.traces == 36 and summary.steps == 1 and [d["promote"] for d in summary.decisions] == [True]
    version = store.current()
    meta = store.meta(version)
    assert meta["parent_version"] == 1 and meta["kind"] == "eagle" and meta["features_computed"] == 36
    assert meta["holdout_requests"] == len(held) and meta["consumer"] == "test-worker"
    assert is_feature_drafter(store.load().model)
    assert redis_client.xpending(STREAM, "specd-trainers")["pending"] == 0  # acked once the round was gated

    def spoil(drafter, data, **_):  # a round whose training goes wrong
        with torch.no_grad():
            for param in drafter.model.layers.parameters():
                param.mul_(-3.0)
        return {"steps": 1}

    monkeypatch.setattr("trainer.eagle.train_feature_drafter", spoil)
    append_traces(redis_client, repeated_traffic(target, texts=12, requests=6, prefix="s"), stream=STREAM)
    worker.drain()
    spoiled = store.versions()[-1]
    assert store.status(spoiled) == "reject" and store.current() == version
    assert store.meta(spoiled)["features_computed"] == 6  # the target ran only over the new requests


def test_eagle_traces_stay_pending_until_used_and_a_peer_reclaims_them_after_a_kill(tiny_dirs, tmp_path,
                                                                                    redis_client):
    from specdec.models.loader import load_model

    target = load_model(tiny_dirs["llama"]["target"]).model
    store = eagle_store(target, tmp_path / "store")
    ids = set(append_traces(redis_client, repeated_traffic(target, 4, 12, "k"), stream=STREAM))
    # No held-out requests: no round can be gated, so the traces stay pending.
    first, second = (eagle_worker(target, store, redis_client, consumer_name=name, holdout_fraction=0.0,
                                  claim_idle_ms=1000) for name in ("first", "second"))
    assert first.step().entry_ids and first.step() is None
    time.sleep(1.5)
    assert first.step(block_ms=10) is None  # alive: it keeps its pending traces fresh
    assert second.step(block_ms=10) is None
    pending = redis_client.xpending_range(STREAM, "specd-trainers", min="-", max="+", count=100)
    assert {p["message_id"].decode() for p in pending} == ids and {p["consumer"] for p in pending} == {b"first"}
    time.sleep(1.5)  # `first` is gone (killed): nothing keeps its traces fresh
    taken = second.step(block_ms=10)
    assert taken.claimed == 12 and set(taken.entry_ids) == ids and taken.acked == 0
    pending = redis_client.xpending_range(STREAM, "specd-trainers", min="-", max="+", count=100)
    assert {p["consumer"] for p in pending} == {b"second"}

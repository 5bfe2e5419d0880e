"""Bootstrapping a drafter from prompts: distillation from token prompts and its epochs, `specd distill`,
self-written prompts feeding `specd distill-eagle` and `specd refine-eagle`, and training prompt files
that never repeat a benchmark prompt."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import save, shutdown_redis
from trainer_world import REPO, STREAM, VOCAB, make_worker, random_prompts, tiny_llama
from trainer_world import world  # noqa: F401 - a fixture

from specdec import redisutil
from specdec.models.checkpoints import CheckpointStore, read_redis_pointer
from trainer.bootstrap import distill_from_prompts, init_drafter_from_target
from trainer.evaluation import evaluate_acceptance


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

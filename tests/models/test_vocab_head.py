"""Subset LM heads (FR-Spec style): exact logits on the kept tokens, nothing elsewhere, safe
round trips through both loaders, token ranking from traces, and training a pruned drafter."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from conftest import perturbed, save, tiny_model
from prometheus_client import CollectorRegistry

from specdec import redisutil
from specdec.config import load_settings
from specdec.models.checkpoints import CheckpointStore
from specdec.models.loader import load_model
from specdec.models.vocab_head import (
    CONFIG_KEY,
    EXCLUDED_LOGIT,
    drop_excluded,
    head_token_ids,
    install_subset_head,
    rank_tokens,
)
from specdec.traces import append_traces
from trainer.bootstrap import teacher_traces
from trainer.prune_head import emitted_token_counts, prune_checkpoint, recent_traces
from trainer.worker import token_worker

VOCAB = 256
KEPT = torch.tensor([0, 3, 5, 17, 64, 100, 200, 255])


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]  # [T, V]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("tied", [False, True])
def test_subset_head_matches_the_full_head_on_kept_tokens_and_excludes_the_rest(arch, tied):
    full = tiny_model(arch, seed=4)
    if tied:
        full.config.tie_word_embeddings = True
        full.tie_weights()
    ids = [1, 7, 9, 200, 31]
    reference = _logits(full, ids)
    pruned = install_subset_head(copy.deepcopy(full), KEPT)
    logits = _logits(pruned, ids)  # [T, V]
    assert logits.shape == reference.shape
    assert torch.allclose(logits[:, KEPT], reference[:, KEPT], atol=1e-5)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[KEPT] = False
    assert bool((logits[:, outside] == EXCLUDED_LOGIT).all())
    probs = logits.softmax(-1)
    assert bool((probs[:, outside] == 0).all()) and torch.allclose(probs.sum(-1), torch.ones(len(ids)))
    assert getattr(pruned.config, CONFIG_KEY) == len(KEPT) and not pruned.config.tie_word_embeddings
    # The input embeddings are untouched (the head's rows are a copy, not a view).
    assert torch.equal(pruned.get_input_embeddings().weight, full.get_input_embeddings().weight)


def test_install_refuses_bad_token_ids_and_double_pruning():
    model = tiny_model("llama")
    with pytest.raises(ValueError):
        install_subset_head(copy.deepcopy(model), torch.tensor([0, VOCAB]))
    with pytest.raises(ValueError):
        install_subset_head(copy.deepcopy(model), torch.tensor([], dtype=torch.long))
    pruned = install_subset_head(model, KEPT)
    with pytest.raises(ValueError):
        install_subset_head(pruned, KEPT)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_pruned_drafter_round_trips_through_the_store_and_load_model(arch, tmp_path):
    pruned = install_subset_head(tiny_model(arch, seed=5), KEPT)
    ids = [4, 8, 15, 16, 23, 42]
    reference = _logits(pruned, ids)
    store = CheckpointStore(tmp_path / "store")
    version = store.publish(pruned, {"tokenizer_fingerprint": "t"})
    loaded = store.load(version).model
    assert torch.equal(head_token_ids(loaded), KEPT)
    assert torch.allclose(_logits(loaded, ids), reference, atol=1e-6)
    for directory in (store.path(version), save(pruned, tmp_path / "exported")):
        model = load_model(str(directory)).model
        assert torch.equal(head_token_ids(model), KEPT)
        assert torch.allclose(_logits(model, ids), reference, atol=1e-6)


def test_rank_tokens_takes_the_most_frequent_then_the_lowest_ids():
    counts = Counter({9: 5, 4: 5, 200: 7, 3: 1, 999: 50, -1: 9})  # out-of-range ids are ignored
    assert rank_tokens(counts, VOCAB, 3).tolist() == [4, 9, 200]  # 200 first, then the tie in id order
    assert rank_tokens(counts, VOCAB, 6).tolist() == [0, 1, 3, 4, 9, 200]  # topped up with 0 and 1
    assert rank_tokens(Counter(), VOCAB, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        rank_tokens(counts, VOCAB, VOCAB + 1)


def test_drop_excluded_turns_unproposable_ids_into_padding():
    top_ids = torch.tensor([[3, 4, -1], [255, 5, 6]])
    assert drop_excluded(top_ids, KEPT, VOCAB).tolist() == [[3, -1, -1], [255, 5, -1]]
    assert drop_excluded(top_ids, None, VOCAB) is top_ids


def test_prune_checkpoint_ranks_the_target_tokens_and_a_pruned_drafter_trains(tmp_path, redis_client):
    target = tiny_model("llama", seed=1)
    prompts = [[(7 * i + j) % VOCAB for j in range(5)] for i in range(24)]
    records = teacher_traces(target, prompts, [f"r{i}" for i in range(len(prompts))], max_new_tokens=12,
                             block_size=4, top_k=8)
    append_traces(redis_client, records)
    read = recent_traces(redis_client, "specd:traces", 10_000)
    assert [r.request_id for r in read] == [r.request_id for r in records]  # oldest first
    store = CheckpointStore(tmp_path / "store")
    source = store.publish(perturbed(target, 0.3, seed=2), {"tokenizer_fingerprint": "t", "steps": 7})
    store.promote(source, "start", {})
    counts = emitted_token_counts(read)
    most_common = [token for token, _ in counts.most_common(5)]

    report = prune_checkpoint(store, source, 32, read, promote=True)
    assert store.current() == report["version"] != source
    meta = store.meta(report["version"])
    assert meta["parent_version"] == source and meta["head_vocab"] == 32 and meta["steps"] == 7
    # Both models are scored on the same recent traces (pruning can move agreement either way).
    assert report["eval_traces"] == len(read)
    assert report["source"]["judged_slots"] == report["pruned"]["judged_slots"] > 0
    pruned = store.load().model
    kept = set(head_token_ids(pruned).tolist())
    assert len(kept) == 32 and set(most_common) <= kept

    # The trainer fine-tunes it without chasing logits it cannot move.
    settings = load_settings("trainer", {"consumer_name": "t", "lr": 1e-2, "publish_every": 10**6}, environ={})
    worker = token_worker(pruned, store, redis_client, settings, registry=CollectorRegistry()).strategy
    batch = read[:16]
    first, _ = worker.train_on(batch)
    for _ in range(5):
        last, _ = worker.train_on(batch)
    assert torch.isfinite(torch.tensor(first)) and last < first
    assert torch.equal(head_token_ids(worker.drafter), head_token_ids(pruned))


def test_specd_prune_head_cli_publishes_without_promoting(tmp_path, redis_client):
    import json
    import subprocess
    import sys
    from pathlib import Path

    target = tiny_model("qwen2", seed=1)
    prompts = [[(5 * i + j) % VOCAB for j in range(4)] for i in range(8)]
    append_traces(redis_client, teacher_traces(target, prompts, [f"q{i}" for i in range(8)], max_new_tokens=8,
                                               block_size=8, top_k=4))
    store = CheckpointStore(tmp_path / "store")
    source = store.publish(perturbed(target, 0.3, seed=2), {"tokenizer_fingerprint": "t"})
    store.promote(source, "start", {})
    result = subprocess.run(
        [sys.executable, "-m", "specd.cli", "prune-head", "--checkpoint-dir", str(store.root), "--head-vocab", "48",
         "--redis-url", redisutil.url_of(redis_client)],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["version"] == source + 1 and not report["promoted"] and store.current() == source
    assert head_token_ids(store.load(report["version"]).model).numel() == 48
    assert report["eval_traces"] == 8 and report["pruned"]["blocks"] == 8
    bad = subprocess.run([sys.executable, "-m", "specd.cli", "prune-head", "--checkpoint-dir", str(store.root),
                          "--head-vocab", str(VOCAB + 1), "--redis-url", redisutil.url_of(redis_client)],
                         cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "head vocabulary size" in bad.stderr

"""Checkpoint store: versioning, refusal of damaged or pickle checkpoints, CLI rollback with Redis notification."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model

from specdec import redisutil
from specdec.models.accept_head import AcceptHead
from specdec.models.checkpoints import (
    MODEL_FILE,
    REDIS_CURRENT_KEY,
    REDIS_EVENTS_STREAM,
    CheckpointError,
    CheckpointStore,
    read_redis_pointer,
)

REPO = Path(__file__).resolve().parents[2]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_publish_and_load_round_trip_with_accept_head(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    model = tiny_model("qwen2", seed=4)
    head = AcceptHead(32)
    v1 = store.publish(model, {"steps": 7, "tokenizer_fingerprint": "fp"}, accept_head=head)
    v2 = store.publish(tiny_model("qwen2", seed=5))
    assert (v1, v2) == (1, 2) and store.versions() == [1, 2]
    assert store.current() is None and store.statuses() == {1: "new", 2: "new"}
    with pytest.raises(CheckpointError, match="no CURRENT"):
        store.load()

    store.promote(v1, "first")
    loaded = store.load()
    assert loaded.version == 1 and loaded.meta["steps"] == 7 and loaded.meta["tokenizer_fingerprint"] == "fp"
    assert same_weights(loaded.model, model) and not loaded.model.training
    assert loaded.accept_head is not None and same_weights(loaded.accept_head, head)
    assert store.load(v2).accept_head is None
    assert store.meta(v2)["parent_version"] is None
    assert store.meta(store.publish(model))["parent_version"] == 1  # published while v1 was current
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)

    # A bfloat16 drafter (GPU serving) still gets a float32 head, which reads float hidden states.
    half = store.load(v1, dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    hidden = half.model(ids, output_hidden_states=True).hidden_states[-1]
    assert half.accept_head(hidden.float()).dtype == torch.float32


def test_tied_embeddings_survive_safetensors(tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    store = CheckpointStore(tmp_path)
    loaded = store.load(store.publish(model)).model
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    store = CheckpointStore(tmp_path)
    model = tiny_model("gpt2")
    versions: list[int] = []
    threads = [threading.Thread(target=lambda: versions.append(CheckpointStore(tmp_path).publish(model)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == [1, 2, 3, 4] and store.versions() == [1, 2, 3, 4]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


class _Spy:
    """Records every call to the unpickling entry points instead of running them."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
            monkeypatch.setattr(owner, name, self._recorder(f"{owner.__name__}.{name}"))
        calls = self.calls

        class RecordingUnpickler(pickle.Unpickler):  # a class still, so subclassing it keeps working
            def __init__(self, *args, **kwargs):
                calls.append("pickle.Unpickler")
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(pickle, "Unpickler", RecordingUnpickler)

    def _recorder(self, label):
        def record(*args, **kwargs):
            self.calls.append(label)
            raise RuntimeError(f"{label} must never be called")
        return record


def test_corrupted_checkpoint_is_refused_without_unpickling(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    version = store.publish(tiny_model("llama"))
    weights = store.path(version) / MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte deep inside a tensor
    weights.write_bytes(bytes(data))
    spy = _Spy(monkeypatch)
    with pytest.raises(CheckpointError, match="sha256"):
        store.load(version)
    with pytest.raises(CheckpointError, match="sha256"):
        store.verify(version)
    assert spy.calls == []


def test_pickle_weights_are_refused_even_with_a_matching_hash(tmp_path, monkeypatch):
    from specdec.file_cache import sha256_file

    store = CheckpointStore(tmp_path)
    model = tiny_model("llama")
    version = store.publish(model)
    directory = store.path(version)
    # A torch.save (zip + pickle) file under the safetensors name, with meta rewritten to
    # match it, as a careless operator or an attacker with write access would leave it.
    torch.save(model.state_dict(), directory / MODEL_FILE)
    meta = json.loads((directory / "meta.json").read_text())
    meta["files"][MODEL_FILE] = sha256_file(directory / MODEL_FILE)
    (directory / "meta.json").write_text(json.dumps(meta))
    spy = _Spy(monkeypatch)
    with pytest.raises(CheckpointError, match="weights do not load"):
        store.load(version)
    assert spy.calls == []

    # A pickle file next to valid weights is refused outright.
    other = store.publish(model)
    (store.path(other) / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(CheckpointError, match="unexpected files"):
        store.load(other)
    assert spy.calls == []


def test_missing_meta_or_unlisted_config_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    first, second = store.publish(tiny_model("gpt2")), store.publish(tiny_model("gpt2"))
    (store.path(first) / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="no meta.json"):
        store.load(first)
    meta_path = store.path(second) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]["config.json"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lists no config.json"):
        store.load(second)
    with pytest.raises(CheckpointError, match="no checkpoint v9"):
        store.load(9)


def test_promote_notifies_redis_and_remove_protects_current(tmp_path, redis_client):
    store = CheckpointStore(tmp_path, redis_client=redis_client)
    model = tiny_model("gpt2")
    first, second = store.publish(model), store.publish(model)
    assert read_redis_pointer(redis_client) is None
    store.promote(first, "good")
    store.reject(second, "worse", {"candidate": 0.1})
    assert read_redis_pointer(redis_client) == first
    events = redis_client.xrange(REDIS_EVENTS_STREAM)
    assert [(e[b"action"], e[b"name"]) for _, e in events] == [(b"promote", b"v1")]  # rejects are not announced
    assert store.statuses() == {1: "promote", 2: "reject"}
    with pytest.raises(CheckpointError, match="is current"):
        store.remove(first)
    store.remove(second)
    assert store.versions() == [1] and store.decisions()[-1]["action"] == "reject"


def test_redis_outage_does_not_block_promotion(tmp_path):
    import redis

    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2, socket_timeout=0.2)
    store = CheckpointStore(tmp_path, redis_client=dead)
    store.promote(store.publish(tiny_model("gpt2")), "redis is down")
    assert store.current() == 1 and store.decisions()[0]["action"] == "promote"


def test_cli_rollback_moves_current_back_and_notifies_redis(tmp_path, redis_client, capsys):
    store = CheckpointStore(tmp_path / "ck", redis_client=redis_client)
    model = tiny_model("gpt2")
    for version in (store.publish(model), store.publish(model), store.publish(model)):
        store.promote(version, f"gate passed for v{version}")
    assert store.current() == 3 and read_redis_pointer(redis_client) == 3
    url = redisutil.url_of(redis_client)

    # `specd checkpoints rollback` as operators run it: a separate process.
    result = subprocess.run([sys.executable, "-m", "specd.cli", "checkpoints", "rollback",
                             "--checkpoint-dir", str(tmp_path / "ck"), "--version", "v1",
                             "--reason", "v3 regressed in production", "--redis-url", url],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "CURRENT = v1" in result.stdout
    assert store.current() == 1
    assert read_redis_pointer(redis_client) == 1 and redis_client.get(REDIS_CURRENT_KEY) == b"1"
    last_event = redis_client.xrevrange(REDIS_EVENTS_STREAM, count=1)[0][1]
    assert last_event[b"action"] == b"rollback" and last_event[b"version"] == b"1"
    decision = store.decisions()[-1]
    assert decision["action"] == "rollback" and decision["version"] == 1
    assert decision["reason"] == "v3 regressed in production" and decision["metrics"]["previous"] == 3

    # In-process from here: the same parser and handler, without another interpreter start.
    from specd.cli import main

    assert main(["checkpoints", "list", "--checkpoint-dir", str(tmp_path / "ck"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["current"], r["status"]) for r in rows] == [
        ("v1", True, "rollback"), ("v2", False, "promote"), ("v3", False, "promote")]

    # A damaged checkpoint is never made current.
    (store.path(2) / MODEL_FILE).write_bytes(b"not weights")
    assert main(["checkpoints", "rollback", "--checkpoint-dir", str(tmp_path / "ck"), "--version", "2",
                 "--redis-url", url]) == 1
    assert "sha256" in capsys.readouterr().err
    assert store.current() == 1 and read_redis_pointer(redis_client) == 1
    assert main(["checkpoints", "promote", "--checkpoint-dir", str(tmp_path / "ck"), "--version", "v3",
                 "--redis-url", url]) == 0
    assert store.current() == 3 and read_redis_pointer(redis_client) == 3
    assert store.decisions()[-1]["reason"] == "manual promotion"


def test_published_files_are_readable_by_other_users(tmp_path):
    store = CheckpointStore(tmp_path)
    version = store.publish(tiny_model("gpt2"), accept_head=AcceptHead(32))
    store.promote(version, "readable")
    directory = store.path(version)
    assert directory.stat().st_mode & 0o777 == 0o755
    for path in [*directory.iterdir(), tmp_path / "CURRENT"]:
        assert path.stat().st_mode & 0o044 == 0o044, path  # group and others may read


def test_compact_export_leaves_out_the_targets_tensors_and_loads_only_with_that_target(tmp_path, tiny_dirs):
    from safetensors.torch import load_file, save_file

    from specdec.models.loader import load_model
    from specdec.models.sources import ModelLoadError
    from specdec.models.vocab_head import install_subset_head
    from trainer.eagle import init_from_target

    target_dir = Path(tiny_dirs["llama"]["target"])
    drafter = init_from_target(load_model(str(target_dir)).model)
    install_subset_head(drafter, torch.arange(0, 256, 2))
    with torch.no_grad():
        drafter.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # "trained": no longer the target's
    store = CheckpointStore(tmp_path / "ck")
    version = store.publish(drafter, {"kind": "eagle"})
    out = tmp_path / "compact"
    run = subprocess.run([sys.executable, "-m", "specd.cli", "checkpoints", "export", "--checkpoint-dir",
                          str(tmp_path / "ck"), "--version", str(version), "--target", str(target_dir),
                          "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(report["shared"])
    assert "model.layers.0.mlp.up_proj.weight" in report["kept"]
    assert set(load_file(str(out / MODEL_FILE))) == set(report["kept"])
    loaded = load_model(str(out)).model.state_dict()
    for name, tensor in drafter.state_dict().items():
        expected = tensor if name in report["shared"] or not tensor.is_floating_point() else tensor.half().float()
        assert torch.equal(loaded[name], expected), name
    # Against a target whose embeddings differ, the compact drafter refuses to load.
    other = tmp_path / "other-target"
    other.mkdir()
    for name in ("config.json", "generation_config.json"):
        if (target_dir / name).exists():
            (other / name).write_text((target_dir / name).read_text())
    weights = load_file(str(target_dir / MODEL_FILE))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] + 1e-3
    save_file(weights, str(other / MODEL_FILE))
    config = json.loads((out / "config.json").read_text())
    config["shared_with_target"]["target"] = str(other)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="differs"):
        load_model(str(out))

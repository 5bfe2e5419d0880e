"""GGUF conversion into the cache: services that start together convert the same file once, and safely."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

VOCAB = 257  # the 256 byte tokens and one merge


def _write_tiny_gguf(path: Path) -> None:
    """A one-layer Llama with a byte-level BPE tokenizer: enough for transformers to load and convert."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, ff, heads, kv_heads = 32, 64, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([*bytes_to_unicode().values(), "\u0120t"])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_merges(["\u0120 t"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    kv_width = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (VOCAB, hidden), "output_norm.weight": (hidden,), "output.weight": (VOCAB, hidden),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv_width, hidden),
              "blk.0.attn_v.weight": (kv_width, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ff, hidden), "blk.0.ffn_up.weight": (ff, hidden),
              "blk.0.ffn_down.weight": (hidden, ff)}
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _convert_after(barrier, gguf_path: str, results) -> None:
    """Runs in a fresh process: imports everything first, then converts as the other process does."""
    import transformers  # noqa: F401 - the slow imports happen before the barrier, so both convert at once

    from specdec.models.conversion import materialise
    from specdec.models.sources import resolve_source

    barrier.wait(120)
    try:
        results.put(("ok", str(materialise(resolve_source(gguf_path)))))
    except Exception as err:  # noqa: BLE001 - reported to the test
        results.put(("failed", repr(err)))


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path)
    monkeypatch.setenv("SPECD_CACHE_DIR", str(tmp_path / "cache"))  # read by the child processes at import
    return path


def test_two_processes_converting_the_same_gguf_both_succeed(tiny_gguf, tmp_path):
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(2), spawn.Queue()
    workers = [spawn.Process(target=_convert_after, args=(barrier, str(tiny_gguf), results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert [status for status, _ in outcomes] == ["ok", "ok"], outcomes
    target = Path(outcomes[0][1])
    assert outcomes[0][1] == outcomes[1][1] and (target / "config.json").exists()
    assert not list(target.parent.glob("*.tmp*"))


def test_leftovers_of_a_dead_conversion_are_removed(tiny_gguf, tmp_path):
    script = ("import sys; from specdec.models.conversion import materialise; from specdec.models.sources import resolve_source, "
              "converted_dir; print(converted_dir(resolve_source(sys.argv[1])))")
    env = {**os.environ, "SPECD_CACHE_DIR": str(tmp_path / "cache")}
    target = Path(subprocess.run([sys.executable, "-c", script, str(tiny_gguf)], env=env, capture_output=True,
                                 text=True, check=True).stdout.strip())
    stale = target.with_name(target.name + ".tmp4242")  # a conversion killed half-way
    (stale / "half").mkdir(parents=True)
    target.mkdir()  # and a copy with no config.json in it
    (target / "model.safetensors").write_bytes(b"partial")
    convert = script.replace("print(converted_dir(", "print(materialise(")
    out = subprocess.run([sys.executable, "-c", convert, str(tiny_gguf)], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert Path(out) == target and (target / "config.json").exists()
    assert not stale.exists()

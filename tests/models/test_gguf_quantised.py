"""A GGUF with K-quant tensors loaded without an fp32 copy: the same model as gguf-py's dequantised weights
(to int8-activation rounding), llama's Q/K rows permuted as transformers permutes them, greedy decoding
through ModelRunner with the same tokens in a batch as alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize
from gguf_rows import random_rows
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from specdec.compute import small_gemm
from specdec.compute.quant_weights import QuantEmbedding
from specdec.models.gguf_quantised import MappedEmbedding, QuantLinear, load_quantised, quantised_table, read_table

pytestmark = pytest.mark.skipif(small_gemm.load_kernel() is None, reason="the kernel needs x86 with AVX2 and a compiler")

HIDDEN, FFN, VOCAB, LAYERS = 256, 512, 300, 2
# Each layer's linears in another mix of the formats the kernel reads.
LAYER_KINDS = [{"attn_q": "q4_k", "attn_k": "q4_k", "attn_v": "q6_k", "attn_output": "q4_k", "ffn_gate": "q4_k",
                "ffn_up": "q4_k", "ffn_down": "q6_k"},
               {"attn_q": "q5_0", "attn_k": "q8_0", "attn_v": "q5_0", "attn_output": "q8_0", "ffn_gate": "q6_k",
                "ffn_up": "q5_0", "ffn_down": "q4_k"}]


def _config(arch: str, tied: bool = False):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied)
    return Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)


def _scaled(kind: str, rows: int, columns: int, seed: int) -> np.ndarray:
    """Random blocks with fp16 scales small enough that activations stay in range through the layers."""
    raw = random_rows(kind, rows, columns, seed)
    offsets = {"q4_k": (0, 2), "q6_k": (208,), "q5_0": (0,), "q8_0": (0,)}[kind]
    per_block = {"q4_k": 144, "q6_k": 210, "q5_0": 22, "q8_0": 34}[kind]
    blocks = raw.reshape(rows, -1, per_block)
    shrink = {"q4_k": 0.02, "q6_k": 0.05, "q5_0": 0.3, "q8_0": 0.1}[kind]
    for offset in offsets:
        scales = blocks[..., offset: offset + 2].copy().view(np.float16) * np.float16(shrink)
        blocks[..., offset: offset + 2] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(path, arch: str, tied: bool = False) -> dict[str, np.ndarray]:
    """A tiny `arch` model as a GGUF; returns each tensor's fp32 values as gguf-py dequantises them."""
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_name("tiny")  # key-values of every kind the table reader skips: strings, string and number arrays
    writer.add_token_list([f"token{i}" for i in range(VOCAB)])
    writer.add_token_scores([0.5] * VOCAB)
    writer.add_bool("tiny.flag", True)
    rng = np.random.default_rng(7)
    values: dict[str, np.ndarray] = {}

    def quantised(name: str, kind: str, rows: int, columns: int, seed: int) -> None:
        raw = _scaled(kind, rows, columns, seed)
        qtype = GGMLQuantizationType[kind.upper()]
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        values[name] = dequantize(raw, qtype).reshape(rows, columns)

    def dense(name: str, array: np.ndarray) -> None:
        writer.add_tensor(name, array.astype(np.float32))
        values[name] = array.astype(np.float32)

    quantised("token_embd.weight", "q4_k", VOCAB, HIDDEN, 1)
    if not tied:
        quantised("output.weight", "q6_k", VOCAB, HIDDEN, 2)
    dense("output_norm.weight", 1 + 0.1 * rng.standard_normal(HIDDEN))
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (128, HIDDEN), "attn_v": (128, HIDDEN),
              "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
              "ffn_down": (HIDDEN, FFN)}
    for layer, kinds in enumerate(LAYER_KINDS):
        for part, (rows, columns) in shapes.items():
            quantised(f"blk.{layer}.{part}.weight", kinds[part], rows, columns, 100 * layer + len(values))
        for norm in ("attn_norm", "ffn_norm"):
            dense(f"blk.{layer}.{norm}.weight", 1 + 0.1 * rng.standard_normal(HIDDEN))
        if arch == "qwen2":
            for part, rows in (("attn_q", HIDDEN), ("attn_k", 128), ("attn_v", 128)):
                dense(f"blk.{layer}.{part}.bias", 0.1 * rng.standard_normal(rows))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


def _reference(arch: str, values: dict[str, np.ndarray], tied: bool = False) -> torch.nn.Module:
    """transformers' model with the dequantised weights, placed as transformers' GGUF loader places them."""
    from transformers.modeling_gguf_pytorch_utils import (LlamaTensorProcessor, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    config = _config(arch, tied)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    processor = LlamaTensorProcessor(config=config.to_dict()) if arch == "llama" else TensorProcessor()
    names = get_gguf_hf_weights_map(model, processor)
    state = {names[name]: torch.from_numpy(np.ascontiguousarray(processor.process(array, name).weights))
             for name, array in values.items()}
    model.load_state_dict(state, strict=False)
    return model.eval()


@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("llama", False), ("qwen2", True)])
def test_the_quantised_model_computes_the_dequantised_models_logits(arch, tied, tmp_path):
    path = tmp_path / f"{arch}.gguf"
    values = write_gguf(path, arch, tied)
    table = quantised_table(path, torch.device("cpu"), torch.float32)
    assert table is not None and table.path == path
    assert quantised_table(path, torch.device("cpu"), torch.bfloat16) is None
    model = load_quantised(table, _config(arch, tied))
    # Untied, the table stays in the mapped file; tied, the LM head's blocks serve both.
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, QuantEmbedding if tied else MappedEmbedding)
    if tied:
        assert model.get_output_embeddings().quant is embedding.quant
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 7 * LAYERS + 1 and not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert not [name for name, p in model.named_parameters() if p.dim() == 2]  # no fp32 matrix anywhere
    reference = _reference(arch, values, tied)
    ids = torch.tensor([[3, 17, 250, 9, 42, 42, 7, 100]])
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    # int8 activations round each block to 1/254 of its largest value: 1-2% of the logits' spread on
    # average; a wrong row order or scale is off by the whole spread.
    error = (got - expected).abs() / expected.std()
    assert error.mean() < 0.04 and error.max() < 0.5, (float(error.mean()), float(error.max()))
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


def greedy_tokens(runner, batch: list[list[int]], steps: int) -> list[list[int]]:
    """Each prompt's next `steps` greedy tokens, the prompts fed together through `runner` in one pass a step."""
    from specdec.compute.sessions import KVSession

    sessions = [KVSession(f"s{i}", ids=list(p)) for i, p in enumerate(batch)]
    for _ in range(steps):
        for session, (logits, _) in zip(sessions, runner.extend(sessions)):
            session.ids.append(int(logits[-1].argmax()))
    return [s.ids[len(p):] for s, p in zip(sessions, batch)]


def test_greedy_tokens_are_the_same_alone_and_batched_through_the_model_runner(tmp_path):
    from specdec.compute.model_runner import ModelRunner

    path = tmp_path / "qwen2.gguf"
    write_gguf(path, "qwen2")
    runner = ModelRunner(load_quantised(read_table(path), _config("qwen2")), torch.device("cpu"), small_gemm=True)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
    together = greedy_tokens(runner, prompts, 6)
    assert [greedy_tokens(runner, [p], 6)[0] for p in prompts] == together


def test_the_tensor_table_is_what_gguf_pys_reader_reads(tmp_path):
    from gguf import GGUFReader

    path = tmp_path / "qwen2.gguf"
    write_gguf(path, "qwen2")
    table, reader = read_table(path), GGUFReader(str(path))
    assert table.architecture == "qwen2"
    assert [t.name for t in table.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(table.tensors, reader.tensors):
        assert ours.type_name == theirs.tensor_type.name and ours.shape == tuple(reversed(theirs.shape.tolist()))
        assert np.array_equal(table.data(ours), np.asarray(theirs.data).view(np.uint8).reshape(-1))

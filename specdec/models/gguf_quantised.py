"""Builds a Hugging Face causal LM straight from a GGUF whose linears stay in their K-quant blocks.

A GGUF with Q4_K, Q6_K or Q5_0 tensors (Qwen2.5's and most llama.cpp models' Q4_K_M) is loaded without an
fp32 copy of its weights: the model is built on the meta device, every Q4_K, Q6_K, Q5_0 and Q8_0 matrix
becomes a `QuantLinear`, the token embedding a `MappedEmbedding` that reads and dequantises only the rows
it looks up from the mapped file (a `QuantEmbedding` over the LM head's blocks where the two are tied) over a `QuantWeight` (all three in specdec.compute.quant_weights), and the F32 tensors (norms, biases) are copied in.
A 1.5B Q4_K_M target then takes about its file's size in memory instead of 7 GB.

Tensors of other block types are dequantised by gguf-py into fp32 parameters. Architectures whose GGUF
tensors transformers does not rewrite (qwen2), or only permutes by rows (llama's Q and K), are read; the
row permutation is applied to the blocks' rows, which it moves whole.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specdec.compute import small_gemm
from specdec.compute.quant_weights import QuantEmbedding, QuantLinear, QuantWeight
from specdec.models.sources import ModelLoadError

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("qwen2", "llama")
DENSE_TYPES = ("F32", "F16", "BF16")
KERNEL_KINDS = {"Q4_K": "q4_k", "Q6_K": "q6_k", "Q5_0": "q5_0", "Q8_0": "q8_0"}
CALLS_FOR_QUANTISED = ("Q4_K", "Q6_K", "Q5_0")  # a file with any of these loads quantised (the fp32 kernels read none)


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str            # GGMLQuantizationType's name: "Q4_K", "F32", ...
    shape: tuple[int, ...]    # as torch orders it: outermost first
    offset: int               # of its data in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFTable:
    """What a GGUF file holds, read from its header without its key-value arrays (a 151k-token vocabulary
    takes gguf-py's reader 15 s to parse; skipping it takes a fraction of one)."""

    path: Path
    architecture: str
    tensors: list[GGUFTensor]

    def data(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's bytes, mapped from the file (nothing is read until used)."""
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(tensor.nbytes,))


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_table(path: Path) -> GGUFTable:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as handle:
        buffer = handle.read(64 << 20)  # headers run to a few MB; a larger one is read whole below
    at = 0

    def take(fmt: str):
        nonlocal at, buffer
        size = struct.calcsize(fmt)
        if at + size > len(buffer):
            buffer = path.read_bytes()
        value = struct.unpack_from(fmt, buffer, at)[0]
        at += size
        return value

    def string() -> str:
        nonlocal at
        length = take("<Q")
        text = bytes(buffer[at: at + length]).decode("utf-8", "replace")
        at += length
        return text

    def skip(value_type: int) -> None:
        nonlocal at
        if value_type == _STRING:
            length = take("<Q")  # taken before `at` is read: take() moves it
            at += length
        elif value_type == _ARRAY:
            item_type, count = take("<I"), take("<Q")
            if item_type in _SCALARS:
                at += struct.calcsize(_SCALARS[item_type]) * count
            else:
                for _ in range(count):
                    skip(item_type)
        else:
            at += struct.calcsize(_SCALARS[value_type])

    if take("<I") != 0x46554747:  # "GGUF"
        raise ModelLoadError(f"{path} is not a GGUF file")
    take("<I")  # version
    tensor_count, kv_count = take("<Q"), take("<Q")
    architecture, alignment = "", 32
    for _ in range(kv_count):
        key, value_type = string(), take("<I")
        if key == "general.architecture" and value_type == _STRING:
            architecture = string()
        elif key == "general.alignment" and value_type in _SCALARS:
            alignment = take(_SCALARS[value_type])
        else:
            skip(value_type)
    infos = []
    for _ in range(tensor_count):
        name, dims = string(), take("<I")
        shape = [take("<Q") for _ in range(dims)]
        type_id, offset = take("<I"), take("<Q")
        infos.append((name, GGMLQuantizationType(type_id), tuple(reversed(shape)), offset))
    data_start = (at + alignment - 1) // alignment * alignment
    tensors = []
    for name, qtype, shape, offset in infos:
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * block_bytes
        tensors.append(GGUFTensor(name, qtype.name, shape, data_start + offset, nbytes))
    return GGUFTable(path, architecture, tensors)


def quantised_table(gguf_path: Path | None, device: torch.device, dtype: torch.dtype) -> GGUFTable | None:
    """`gguf_path`'s table if the file is read quantised here (fp32 on CPU with the kernel, a supported
    architecture and tensors in blocks the fp32-exact kernels do not read), else None."""
    if gguf_path is None or device.type != "cpu" or dtype != torch.float32 or small_gemm.load_kernel() is None:
        return None
    table = read_table(gguf_path)
    wanted = table.architecture in SUPPORTED_ARCHS and any(t.type_name in CALLS_FOR_QUANTISED for t in table.tensors)
    return table if wanted else None


def _row_permutation(arch: str, gguf_name: str, rows: int, config) -> np.ndarray | None:
    """llama's GGUF Q and K rows are interleaved for its rotary layout; transformers undoes it (the
    LlamaTensorProcessor's reverse permute), which moves whole rows."""
    if arch != "llama" or not (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        return None
    heads = config.num_key_value_heads if ".attn_k." in gguf_name else config.num_attention_heads
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(-1)


def load_quantised(table: GGUFTable, config) -> torch.nn.Module:
    """The causal LM `config` describes, its weights read from the GGUF `table` describes (see the module
    docstring)."""
    from gguf import GGMLQuantizationType, get_tensor_name_map
    from gguf.constants import MODEL_ARCH_NAMES
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    if table.architecture not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"{table.path.name}: architecture {table.architecture!r} is not read quantised "
                             f"({', '.join(SUPPORTED_ARCHS)})")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    arch = next(key for key, name in MODEL_ARCH_NAMES.items() if name == table.architecture)
    name_map = get_tensor_name_map(arch, config.num_hidden_layers)
    names = {}  # GGUF name -> HF name
    for hf_name in model.state_dict():
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = name_map.get_name(stem)
        if gguf_stem is not None:
            names[f"{gguf_stem}.{suffix}"] = hf_name
    dense: dict[str, torch.Tensor] = {}
    for tensor in table.tensors:
        hf_name = names.get(tensor.name)
        if hf_name is None:
            log.info("GGUF tensor %s has no place in %s; skipped", tensor.name, type(model).__name__)
            continue
        module_name, attribute = hf_name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        permutation = _row_permutation(table.architecture, tensor.name, tensor.shape[0], config)
        kind = KERNEL_KINDS.get(tensor.type_name)
        raw = table.data(tensor)
        if (attribute == "weight" and isinstance(module, torch.nn.Embedding) and tensor.type_name not in DENSE_TYPES
                and not getattr(config, "tie_word_embeddings", False)):
            _replace(model, module_name, MappedEmbedding(raw.reshape(tensor.shape[0], -1), tensor.type_name))
            continue
        if attribute == "weight" and kind and isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            rows = raw.reshape(tensor.shape[0], -1)  # [rows, bytes of a row's blocks]
            quant = QuantWeight.from_gguf_rows(kind, rows if permutation is None else rows[permutation], *tensor.shape)
            replacement = QuantLinear(quant) if isinstance(module, torch.nn.Linear) else QuantEmbedding(quant)
            _replace(model, module_name, replacement)
            continue
        values = dequantize(raw, GGMLQuantizationType[tensor.type_name]).reshape(tensor.shape)
        dense[hf_name] = torch.from_numpy(np.array(values if permutation is None else values[permutation],
                                                   dtype=np.float32))
    for hf_name, values in dense.items():
        module_name, attribute = hf_name.rsplit(".", 1)
        setattr(model.get_submodule(module_name), attribute, torch.nn.Parameter(values, requires_grad=False))
    if getattr(config, "tie_word_embeddings", False) and not isinstance(model.get_output_embeddings(), QuantLinear):
        embedding = model.get_input_embeddings()
        if isinstance(embedding, QuantEmbedding):
            model.lm_head = QuantLinear(embedding.quant)  # the same blocks, read as a linear
    _rebuild_meta_buffers(model)
    left = [name for name, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise ModelLoadError(f"{table.path.name} leaves {', '.join(left[:5])} of {type(model).__name__} unset")
    return model.eval()


class MappedEmbedding(torch.nn.Module):
    """nn.Embedding over a GGUF table left in the mapped file: a lookup reads and dequantises (gguf-py) only
    its rows, so only the pages of the tokens seen become resident (Qwen2.5's 151,936 rows are 131 MB)."""

    def __init__(self, rows: np.ndarray, type_name: str):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        super().__init__()
        self.rows, self.qtype = rows, GGMLQuantizationType[type_name]  # rows: [vocab, bytes of a row's blocks]
        block, block_bytes = GGML_QUANT_SIZES[self.qtype]
        self.num_embeddings, self.embedding_dim = rows.shape[0], rows.shape[1] // block_bytes * block

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from gguf.quants import dequantize

        flat = ids.reshape(-1).cpu().numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_embeddings):
            raise IndexError(f"token ids must lie in [0, {self.num_embeddings})")
        values = dequantize(np.asarray(self.rows[flat]), self.qtype).astype(np.float32, copy=False)
        return torch.from_numpy(values).reshape(*ids.shape, self.embedding_dim)


def _replace(model: torch.nn.Module, module_name: str, replacement: torch.nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def _rebuild_meta_buffers(model: torch.nn.Module) -> None:
    """Modules whose buffers are computed from the config (rotary frequencies) are built again on the CPU."""
    for name, module in list(model.named_modules()):
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)) and not any(
                True for _ in module.parameters(recurse=False)):
            _replace(model, name, type(module)(config=model.config))

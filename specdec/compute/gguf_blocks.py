"""Gives a GGUF-loaded model's linears their weights in the file's own Q4_1 / Q8_0 blocks.

transformers de-quantises a GGUF into fp32 and may reorder rows on the way (Llama's q/k
projections are permuted back from llama.cpp's rotary layout). Rather than re-deriving each
architecture's name map and permutation, rows are matched by content: every de-quantised
row of a block tensor in the file is hashed, and a linear whose weight rows are all found
gets those rows' blocks. The matched blocks are saved once per file under the cache
directory (safetensors). Every load checks them bit for bit against the weights, so a layer
either reads its exact weights from the blocks or keeps its fp32 path.

The fp32 weights stay in the model: prefill, training and the torch fallback use them.

`quantise_in_place` does the converse for a model with no GGUF (a distilled drafter): it
rounds the weights to Q8_0 and keeps the blocks. That changes the model, so it is for
drafters only, where it costs at most some acceptance and never changes an output.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from specdec.compute.small_gemm import BLOCK_SIZE, CODE_BYTES, BlockWeight, SmallBatchLinear, kernel_available
from specdec.compute.subset_head import SubsetLMHead
from specdec.file_cache import CACHE_DIR, file_cache_key

log = logging.getLogger(__name__)

BLOCKS_FORMAT = 1  # bump when the saved layout changes


def _row_digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(row.tobytes(), digest_size=16).digest()


def _split_blocks(kind: str, raw: np.ndarray) -> BlockWeight:
    """raw uint8 [N, K / 32 * bytes per block], the file's layout (an fp16 scale, for Q4_1 an fp16 minimum, codes)."""
    header = 4 if kind == "q4_1" else 2
    blocks = raw.reshape(raw.shape[0], -1, header + CODE_BYTES[kind])

    def fp16_field(start: int) -> torch.Tensor:  # [N, K / 32] fp32
        return torch.from_numpy(np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0].astype(np.float32))

    minimum = fp16_field(2) if kind == "q4_1" else None
    return BlockWeight(kind, torch.from_numpy(np.ascontiguousarray(blocks[..., header:])), fp16_field(0), minimum)


class _BlockRows:
    """Every row of the file's Q4_1 and Q8_0 tensors, found by the digest of its de-quantised values."""

    def __init__(self, gguf_path: Path):
        from gguf import GGUFReader
        from gguf.quants import dequantize

        self.tensors: list[tuple[str, np.ndarray]] = []  # (kind, raw uint8 [rows, row bytes])
        self.index: dict[bytes, tuple[int, int]] = {}     # digest -> (tensor, row)
        for tensor in GGUFReader(str(gguf_path)).tensors:
            kind = tensor.tensor_type.name.lower()
            if kind not in CODE_BYTES:
                continue
            raw = np.asarray(tensor.data)  # [rows, row bytes], memory-mapped
            values = dequantize(raw, tensor.tensor_type)  # [rows, K] fp32
            position = len(self.tensors)
            self.tensors.append((kind, raw))
            for row, row_values in enumerate(values):
                self.index.setdefault(_row_digest(row_values), (position, row))

    def blocks_for(self, weight: torch.Tensor) -> BlockWeight | None:
        """The blocks of `weight`'s rows [N, K]; None unless every row is found, all in one tensor."""
        found = [self.index.get(_row_digest(row)) for row in weight.detach().numpy()]
        if not found or None in found or len({position for position, _ in found}) != 1:
            return None
        kind, raw = self.tensors[found[0][0]]
        return _split_blocks(kind, raw[[row for _, row in found]])


def _cache_file(gguf_path: Path) -> Path:
    return CACHE_DIR / "gguf-blocks" / f"{gguf_path.stem}-{file_cache_key(gguf_path, BLOCKS_FORMAT)}.safetensors"


NO_MATCH = "none"  # saved for a linear the file does not hold, so it is not searched for again


def _save(path: Path, found: dict[str, BlockWeight | None]) -> None:
    from safetensors.torch import save_file

    tensors, kinds = {}, {}
    for name, blocks in found.items():
        kinds[name] = NO_MATCH if blocks is None else blocks.kind
        if blocks is None:
            continue
        tensors[f"{name}.codes"], tensors[f"{name}.scale"] = blocks.codes, blocks.scale
        if blocks.minimum is not None:
            tensors[f"{name}.minimum"] = blocks.minimum
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(staging), metadata=kinds)
    staging.rename(path)  # atomic: concurrent services never read a half-written file


def _load(path: Path) -> dict[str, BlockWeight | None]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as saved:
        kinds = saved.metadata() or {}
        names = set(saved.keys())
        return {name: None if kind == NO_MATCH else
                BlockWeight(kind, saved.get_tensor(f"{name}.codes"), saved.get_tensor(f"{name}.scale"),
                            saved.get_tensor(f"{name}.minimum") if f"{name}.minimum" in names else None)
                for name, kind in kinds.items()}


def _kernel_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules whose small inputs the kernel runs and whose weights blocks of 32 can hold."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (SmallBatchLinear, SubsetLMHead))
            and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu" and m.weight.shape[1] % BLOCK_SIZE == 0}


def quantise_in_place(model: torch.nn.Module, kind: str = "q8_0") -> int:
    """Rounds each kernel-routed weight of `model` to `kind` blocks, in place, and gives the layer those blocks."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    modules = _kernel_linears(model) if kernel_available() else {}
    with torch.no_grad():
        for module in modules.values():
            blocks = _split_blocks(kind, quantize(module.weight.detach().numpy(), GGMLQuantizationType[kind.upper()]))
            module.weight.copy_(blocks.dequantize())  # prefill and the torch fallback see the same weights
            module.blocks = replace(blocks, weight_version=module.weight._version)
    return len(modules)


def attach(model: torch.nn.Module, gguf_path: Path) -> int:
    """Gives each kernel-routed linear of `model` whose weight came from `gguf_path`'s blocks those blocks; returns how many."""
    candidates = _kernel_linears(model) if kernel_available() else {}
    if not candidates:
        return 0
    cache = _cache_file(gguf_path)
    saved = _load(cache) if cache.exists() else {}
    unseen = [name for name in candidates if name not in saved]
    if unseen:  # a first start, or a model with linears no earlier match saw
        rows = _BlockRows(gguf_path)
        saved.update({name: rows.blocks_for(candidates[name].weight) for name in unseen})
        _save(cache, saved)
    attached = 0
    for name, module in candidates.items():
        blocks = saved.get(name)
        # A saved match is only trusted once it rebuilds this model's weight exactly.
        exact = blocks is not None and torch.equal(blocks.dequantize(), module.weight)
        module.blocks = replace(blocks, weight_version=module.weight._version) if exact else None
        attached += module.blocks is not None
    kinds = sorted({m.blocks.kind for m in candidates.values() if m.blocks is not None})
    log.info("linears reading GGUF blocks", extra={"fields": {"layers": attached, "of": len(candidates), "kinds": kinds}})
    return attached

"""Random GGUF quantised rows, shared by the kernel's weight tests (compute/) and the GGUF loader's (models/)."""

from __future__ import annotations

import numpy as np

from specdec.compute.quant_weights import RAW_BLOCK

D_OFFSETS = {"q4_k": (0, 2), "q6_k": (208,), "q5_0": (0,), "q8_0": (0,)}  # where each block keeps its fp16 scales


def random_rows(kind: str, rows: int, in_features: int, seed: int) -> np.ndarray:
    """Random GGUF blocks: random codes and sub-scales, finite fp16 scales of a realistic size."""
    rng = np.random.default_rng(seed)
    weights, block_bytes = RAW_BLOCK[kind]
    blocks = rng.integers(0, 256, (rows, in_features // weights, block_bytes), dtype=np.uint8)
    for offset in D_OFFSETS[kind]:
        scales = (rng.standard_normal((rows, in_features // weights)) * 0.01).astype(np.float16)
        blocks[..., offset: offset + 2] = scales.view(np.uint8).reshape(rows, -1, 2)
    return blocks.reshape(rows, -1)

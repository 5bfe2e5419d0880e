"""Weights that stay in GGUF's Q4_K, Q6_K, Q5_0 or Q8_0 blocks, and the linear that reads them (quant_gemm.c).

A `QuantWeight` holds one [N, K] matrix repacked from its GGUF rows into the kernel's layout (16 outputs
interleaved, codes, scales and fp16 super-block scales as they were): about the file's bytes, never an
fp32 copy. `quant_linear` multiplies by it with each input row quantised to int8 in blocks of 32 and
integer dot products, a row's bits independent of the others in its call; `dequantize` rebuilds fp32
rows exactly as gguf-py does (an embedding's lookup, a reference in tests). `QuantLinear` and
`QuantEmbedding` are the torch layers over one.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from specdec.compute import small_gemm

FORMATS = {"q4_k": 1, "q6_k": 2, "q5_0": 3, "q8_0": 4}
RAW_BLOCK = {"q4_k": (256, 144), "q6_k": (256, 210), "q5_0": (32, 22), "q8_0": (32, 34)}  # weights, bytes
LANES, BLOCK = 16, 32


def _plane_shapes(kind: str, groups: int, blocks: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The kernel's arrays for `kind` (quant_gemm.c's header describes each)."""
    shapes = {"codes": ((groups, blocks, 512 if kind == "q8_0" else 256), torch.uint8)}
    if kind == "q6_k":
        shapes["high"] = ((groups, blocks, 128), torch.uint8)
        shapes["scales"] = ((groups, blocks, 2, LANES), torch.uint8)
    if kind == "q5_0":
        shapes["high"] = ((groups, blocks, 64), torch.uint8)
    if kind == "q4_k":
        shapes["scales"] = ((groups, blocks, LANES), torch.uint8)
        shapes["mins"] = ((groups, blocks, LANES), torch.uint8)
        shapes["dmin"] = ((groups, blocks // 8, LANES), torch.int16)
    shapes["d"] = ((groups, blocks // 8 if kind in ("q4_k", "q6_k") else blocks, LANES), torch.int16)
    return shapes


@dataclass(frozen=True)
class QuantWeight:
    """An [out_features, in_features] weight in the kernel's layout of `kind` blocks."""

    kind: str
    out_features: int
    in_features: int
    planes: dict[str, torch.Tensor]  # name -> contiguous CPU tensor, as _plane_shapes gives

    def __post_init__(self):
        expected = _plane_shapes(self.kind, -(-self.out_features // LANES), self.in_features // BLOCK)
        for name, (shape, dtype) in expected.items():
            plane = self.planes.get(name)
            if plane is None or tuple(plane.shape) != shape or plane.dtype != dtype or not plane.is_contiguous():
                raise ValueError(f"{self.kind} weight's {name} must be a contiguous {dtype} {shape}")
        pointer = {name: plane.data_ptr() for name, plane in self.planes.items()}
        object.__setattr__(self, "_planes", small_gemm.QuantPlanes(FORMATS[self.kind], pointer["codes"], pointer.get("high"),
                                                    pointer.get("scales"), pointer.get("mins"), pointer["d"],
                                                    pointer.get("dmin")))

    @classmethod
    def from_gguf_rows(cls, kind: str, raw: np.ndarray, out_features: int, in_features: int) -> QuantWeight:
        """raw: the tensor's GGUF bytes, uint8 [out_features, in_features / weights per block * block bytes]."""
        weights, block_bytes = RAW_BLOCK[kind]
        if in_features % weights or raw.shape != (out_features, in_features // weights * block_bytes):
            raise ValueError(f"{kind} rows of {in_features} weights need {in_features // weights * block_bytes} "
                             f"bytes each, not {raw.shape}")
        planes = {name: torch.zeros(shape, dtype=dtype)
                  for name, (shape, dtype) in _plane_shapes(kind, -(-out_features // LANES), in_features // BLOCK).items()}
        weight = cls(kind, out_features, in_features, planes)
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        if _kernel().quant_repack(FORMATS[kind], raw.ctypes.data, out_features, in_features, weight._planes) != 0:
            raise ValueError(f"cannot repack {kind} rows of {in_features} weights")
        return weight

    @property
    def nbytes(self) -> int:
        return sum(plane.numel() * plane.element_size() for plane in self.planes.values())

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [len(rows), in_features] (every row when None), bit-equal to gguf-py's dequantize."""
        rows = torch.arange(self.out_features) if rows is None else rows.to(torch.int64).contiguous()
        if rows.dim() != 1 or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.out_features)):
            raise ValueError(f"rows must be a 1-d index into {self.out_features} outputs")
        out = torch.empty(rows.shape[0], self.in_features, dtype=torch.float32)
        _kernel().quant_dequantize(self._planes, self.in_features, rows.data_ptr(), rows.shape[0], out.data_ptr())
        return out


def _kernel() -> ctypes.CDLL:
    kernel = small_gemm.load_kernel()
    if kernel is None:
        raise RuntimeError("quantised weights need the kernel library: an x86 CPU with AVX2 and a C compiler")
    return kernel


def vectorised() -> bool:
    """Whether this CPU takes the kernel's AVX-512 VNNI path (else the portable one, with the same bits)."""
    return bool(_kernel().quant_gemm_vectorised())


def quant_linear(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None,
                 portable: bool = False) -> torch.Tensor:
    """x [..., in_features] fp32 CPU -> [..., out_features]; `portable` takes the scalar path (for tests)."""
    if x.shape[-1] != weight.in_features or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"input {x.dtype} {tuple(x.shape)} on {x.device} does not fit a "
                         f"[{weight.out_features}, {weight.in_features}] {weight.kind} weight")
    if bias is not None and (bias.shape != (weight.out_features,) or bias.dtype != torch.float32
                             or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous fp32 [{weight.out_features}]")
    flat = x.reshape(-1, weight.in_features).contiguous()  # [rows, K]
    out = torch.empty(flat.shape[0], weight.out_features, dtype=torch.float32)  # [rows, N]
    bias_ptr = None if bias is None else bias.data_ptr()
    kernel = _kernel()
    if portable:
        kernel.quant_gemm_portable_range(weight._planes, flat.data_ptr(), bias_ptr, out.data_ptr(), flat.shape[0],
                                         weight.out_features, weight.in_features, 0, weight.out_features)
    elif kernel.quant_gemm(weight._planes, flat.data_ptr(), bias_ptr, out.data_ptr(), flat.shape[0],
                           weight.out_features, weight.in_features) != 0:
        raise MemoryError("quant_gemm could not allocate its activation scratch")
    return out.reshape(*x.shape[:-1], weight.out_features)


class QuantLinear(torch.nn.Module):
    """nn.Linear's forward over a quantised weight: any number of rows, fp32 CPU inputs."""

    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.quant = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_parameter("bias", None)  # set by the loader where the GGUF has one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.quant, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.quant.kind}, bias={self.bias is not None}"


class QuantEmbedding(torch.nn.Module):
    """nn.Embedding over a quantised table: each lookup dequantises its rows as gguf-py does."""

    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.quant = weight
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quant.dequantize(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)

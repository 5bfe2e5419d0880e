"""GGUF K-quant and Q5_0/Q8_0 weights in the kernel's layout: gguf-py's dequantised bits, the 8-bit-activation
linear close to the fp32 product, the same bits for a row in any company and on any path."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from gguf_rows import random_rows

from specdec.compute import small_gemm
from specdec.compute.quant_weights import RAW_BLOCK, QuantWeight, quant_linear

pytestmark = pytest.mark.skipif(small_gemm.load_kernel() is None, reason="the kernel needs x86 with AVX2 and a compiler")

KINDS = list(RAW_BLOCK)


def qtype(kind: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[kind.upper()]


@pytest.mark.parametrize("kind", KINDS)
def test_dequantised_rows_are_gguf_pys_bits(kind):
    raw = random_rows(kind, 37, 512, seed=1)  # 37: a last group of 16 outputs with 5 of them
    weight = QuantWeight.from_gguf_rows(kind, raw, 37, 512)
    expected = torch.from_numpy(dequantize(raw, qtype(kind)).copy())
    assert torch.equal(weight.dequantize(), expected)
    some = torch.tensor([36, 0, 17])
    assert torch.equal(weight.dequantize(some), expected[some])


@pytest.mark.parametrize("kind", KINDS)
def test_the_linear_is_close_to_the_fp32_product_of_the_dequantised_weights(kind):
    raw = random_rows(kind, 40, 768, seed=2)
    weight = QuantWeight.from_gguf_rows(kind, raw, 40, 768)
    x, bias = torch.randn(5, 768), torch.randn(40)
    expected = torch.nn.functional.linear(x, weight.dequantize(), bias)
    out = quant_linear(x, weight, bias)
    # int8 activations: each block rounds to 1/254 of its largest value.
    error = (out - expected).abs().max() / expected.abs().max()
    assert error < 0.02, float(error)


@pytest.mark.parametrize("kind", KINDS)
def test_a_row_has_the_same_bits_alone_together_split_and_on_the_portable_path(kind):
    raw = random_rows(kind, 200, 512, seed=3)
    weight = QuantWeight.from_gguf_rows(kind, raw, 200, 512)
    x, bias = torch.randn(19, 512), torch.randn(200)  # 19 rows: passes of 8, 8 and 3
    try:
        small_gemm.set_threads(1)
        together = quant_linear(x, weight, bias)
        for rows in (1, 3, 8, 9, 19):
            assert torch.equal(quant_linear(x[:rows], weight, bias), together[:rows]), rows
        assert torch.equal(torch.cat([quant_linear(x[i:i + 1], weight, bias) for i in range(19)]), together)
        assert torch.equal(quant_linear(x, weight, bias, portable=True), together)
        assert small_gemm.set_threads(2) == 2
        assert torch.equal(quant_linear(x, weight, bias), together)
    finally:
        small_gemm.set_threads(1)


def test_shapes_the_weights_cannot_hold_are_refused():
    raw = random_rows("q4_k", 16, 256, seed=4)
    with pytest.raises(ValueError, match="need 144 bytes"):
        QuantWeight.from_gguf_rows("q4_k", raw[:, :100], 16, 256)
    weight = QuantWeight.from_gguf_rows("q4_k", raw, 16, 256)
    with pytest.raises(ValueError, match="does not fit"):
        quant_linear(torch.randn(2, 128), weight)
    with pytest.raises(ValueError, match="bias"):
        quant_linear(torch.randn(2, 256), weight, torch.randn(8))
    with pytest.raises(ValueError, match="rows must be"):
        weight.dequantize(torch.tensor([16]))
    with pytest.raises(ValueError, match="codes must be"):
        QuantWeight("q4_k", 16, 256, {**weight.planes, "codes": weight.planes["codes"][:, :, :128]})


def test_the_avx2_build_that_images_ship_takes_the_same_path_with_the_same_bits(tmp_path):
    """The vector path is chosen at run time, so the AVX2 build an image ships runs it where the CPU can,
    and gives the bits of this CPU's build."""
    import ctypes
    import subprocess

    library = tmp_path / "avx2.so"
    subprocess.run(["cc", *small_gemm.COMPILE_FLAGS, "-o", str(library), *map(str, small_gemm.SOURCES)], check=True)
    avx2 = ctypes.CDLL(str(library))
    avx2.quant_gemm.argtypes = [ctypes.POINTER(small_gemm.QuantPlanes)] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    for kind in KINDS:
        weight = QuantWeight.from_gguf_rows(kind, random_rows(kind, 48, 512, seed=5), 48, 512)
        x = torch.randn(11, 512)
        out = torch.empty(11, 48)
        assert avx2.quant_gemm(weight._planes, x.data_ptr(), None, out.data_ptr(), 11, 48, 512) == 0
        assert torch.equal(out, quant_linear(x, weight)), kind

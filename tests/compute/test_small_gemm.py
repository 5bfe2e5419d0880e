"""The small-batch linear kernel: F.linear's values, the same bits whatever the number of rows,
torch's path for training and prefill, and whole models routed through it."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tiny_model

from specdec.compute import small_gemm
from specdec.compute.model_runner import ModelRunner
from specdec.compute.subset_head import SubsetLMHead
from specdec.models.vocab_head import install_subset_head

pytestmark = pytest.mark.skipif(not small_gemm._cpu_has_avx2_fma(), reason="the kernel needs an x86 CPU with AVX2")


def test_the_kernel_builds_where_a_compiler_exists():
    assert (small_gemm.load_kernel() is not None) == (shutil.which("cc") is not None or shutil.which("gcc") is not None)


@pytest.mark.parametrize("in_features", [8, 37, 576])  # 37: the scalar tail after the 8-wide loop
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_torch_linear_for_every_row_count(in_features, with_bias):
    torch.manual_seed(in_features)
    weight = torch.randn(96, in_features)  # [N, K]
    bias = torch.randn(96) if with_bias else None
    for rows in range(1, small_gemm.MAX_ROWS + 1):
        x = torch.randn(rows, in_features)  # [rows, K]
        expected = torch.nn.functional.linear(x, weight, bias)
        # Sums of K products reduced in another order: fp32 rounding grows with K.
        torch.testing.assert_close(small_gemm.linear(x, weight, bias), expected, rtol=1e-5, atol=2e-7 * in_features)


def test_each_row_has_the_same_bits_whatever_else_is_in_the_call():
    torch.manual_seed(1)
    weight, bias = torch.randn(200, 300), torch.randn(200)
    x = torch.randn(small_gemm.MAX_ROWS, 300)  # 16 rows: two passes of the kernel
    together = small_gemm.linear(x, weight, bias)
    for rows in (1, 3, 8, 9, small_gemm.MAX_ROWS):
        assert torch.equal(small_gemm.linear(x[:rows], weight, bias), together[:rows]), rows
    one_by_one = torch.cat([small_gemm.linear(x[i:i + 1], weight, bias) for i in range(len(x))])
    assert torch.equal(one_by_one, together)
    # torch's BLAS does not promise this: a GEMM and a GEMV reduce in different orders.


def test_leading_dimensions_and_non_contiguous_inputs_are_kept():
    weight = torch.randn(24, 16)
    x = torch.randn(16, 2, 3).permute(1, 2, 0)  # [2, 3, 16], not contiguous
    torch.testing.assert_close(small_gemm.linear(x, weight), torch.nn.functional.linear(x, weight))


def test_prefill_training_and_other_dtypes_take_torchs_path():
    weight = torch.randn(24, 16)
    big = torch.randn(small_gemm.MAX_ROWS + 1, 16)
    assert torch.equal(small_gemm.linear(big, weight), torch.nn.functional.linear(big, weight))
    half = torch.randn(2, 16, dtype=torch.bfloat16)
    assert torch.equal(small_gemm.linear(half, weight.bfloat16()), torch.nn.functional.linear(half, weight.bfloat16()))
    trained = torch.nn.Parameter(weight.clone())
    x = torch.randn(2, 16)
    small_gemm.linear(x, trained).sum().backward()  # the kernel has no backward; torch's path does
    torch.testing.assert_close(trained.grad, x.sum(0).expand(24, 16))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_installed_models_keep_their_weights_and_outputs(arch):
    model = tiny_model(arch, seed=3)
    keys = set(model.state_dict())
    ids = torch.randint(0, 256, (1, 9))
    with torch.inference_mode():
        cache = model(input_ids=ids[:, :6], use_cache=True).past_key_values
        before = model(input_ids=ids[:, 6:], past_key_values=cache, use_cache=True).logits
    swapped = small_gemm.install(model)
    routed = sum(type(m) in (small_gemm.SmallBatchLinear, small_gemm.SmallBatchConv1D) for m in model.modules())
    assert swapped == routed > 0  # GPT-2's projections are Conv1D, its LM head an nn.Linear
    assert set(model.state_dict()) == keys
    with torch.inference_mode():
        cache = model(input_ids=ids[:, :6], use_cache=True).past_key_values
        after = model(input_ids=ids[:, 6:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_subset_heads_and_model_runners_are_routed_through_it():
    model = tiny_model("llama", seed=4)
    install_subset_head(model, torch.arange(0, 256, 3))
    runner = ModelRunner(model, torch.device("cpu"), small_gemm=True)
    head = model.get_output_embeddings()
    assert isinstance(head, SubsetLMHead) and head.project is small_gemm.linear
    assert runner.small_gemm_layers == sum(isinstance(m, torch.nn.Linear) for m in model.modules()) + 1
    untouched = tiny_model("llama", seed=4)
    assert ModelRunner(untouched, torch.device("cpu")).small_gemm_layers == 0
    assert not any(type(m) is small_gemm.SmallBatchLinear for m in untouched.modules())


@pytest.mark.parametrize("rows", [1, 3, 8, 13, 64])
def test_splitting_a_layer_among_threads_keeps_every_bit(rows):
    if small_gemm.load_kernel() is None:
        pytest.skip("the kernel needs x86 with AVX2 and FMA and a C compiler")
    torch.manual_seed(rows)
    x, weight, bias = torch.randn(rows, 320), torch.randn(1000, 320), torch.randn(1000)
    try:
        small_gemm.set_threads(1)
        alone = small_gemm.linear(x, weight, bias)
        assert small_gemm.set_threads(3) == 3
        assert torch.equal(small_gemm.linear(x, weight, bias), alone)
    finally:
        small_gemm.set_threads(1)


def test_inputs_the_kernel_would_misread_raise():
    if small_gemm.load_kernel() is None:
        pytest.skip("the kernel needs x86 with AVX2 and FMA and a C compiler")
    weight = torch.randn(64, 32)
    with pytest.raises(ValueError, match="input features"):
        small_gemm.linear(torch.randn(2, 16), weight)  # 32 numbers that reshape to one row of 32: a wrong answer
    blocks = small_gemm.BlockWeight("q8_0", torch.zeros(64, 1, 32, dtype=torch.uint8), torch.ones(64, 1), None)
    with pytest.raises(ValueError, match="do not hold the weight"):
        small_gemm.linear(torch.randn(2, 64), torch.randn(64, 64), blocks=blocks)
    with pytest.raises(ValueError, match="codes hold 16 bytes"):
        small_gemm.BlockWeight("q4_1", torch.zeros(64, 1, 32, dtype=torch.uint8), torch.ones(64, 1), torch.ones(64, 1))
    with pytest.raises(ValueError, match="does not match codes"):
        small_gemm.BlockWeight("q8_0", torch.zeros(64, 2, 32, dtype=torch.uint8), torch.ones(64, 1), None)
    with pytest.raises(ValueError, match="contiguous"):
        small_gemm.BlockWeight("q8_0", torch.zeros(2, 64, 32, dtype=torch.uint8).transpose(0, 1), torch.ones(64, 2), None)

"""Paged KV: the block pool, and attention over it through the kernel and through SDPA."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from specdec.compute import packed, small_gemm
from specdec.compute.sessions import crop_cache
from specdec.compute.paged_kv import INITIAL_BLOCKS, KVPool, PagedCache


def test_blocks_return_to_the_pool_when_a_cache_is_dropped():
    pool = KVPool(block_size=4)
    first, second = PagedCache(pool), PagedCache(pool)
    first.reserve(10)
    second.reserve(3)
    assert len(first.blocks) == 3 and len(second.blocks) == 1 and not set(first.blocks) & set(second.blocks)
    free = pool.free_blocks
    del first
    gc.collect()
    assert pool.free_blocks == free + 3
    assert second.slot(2) == second.blocks[0] * 4 + 2


def test_the_pool_doubles_and_keeps_what_it_holds():
    pool = KVPool(block_size=2)
    cache = PagedCache(pool)
    cache.reserve(2 * INITIAL_BLOCKS)
    like = torch.zeros(1, 3, 1, 8)  # [1, Hkv, n, D]
    keys, _ = pool.layer(0, like)
    keys.copy_(torch.arange(keys.numel(), dtype=torch.float32).view_as(keys))
    before = keys.clone()
    cache.reserve(2 * INITIAL_BLOCKS + 1)  # one block more: the pool doubles
    grown, _ = pool.layer(0, like)
    assert pool.num_blocks == 2 * INITIAL_BLOCKS and grown.shape == (2 * INITIAL_BLOCKS * 2, 3, 8)
    assert torch.equal(grown[: before.shape[0]], before)


def test_crop_follows_dynamic_cache_semantics():
    cache = PagedCache(KVPool())
    cache.reserve(20)
    cache.length = 20
    crop_cache(cache, 12)
    assert cache.get_seq_length() == 12 and len(cache.blocks) == 2  # blocks stay: the next pass overwrites them
    cache.crop(-2)
    assert cache.length == 10
    crop_cache(cache, 0)
    assert cache.length == 0


def _scattered_store(lengths: list[int], kv_heads: int, head_dim: int, block_size: int, generator):
    """Sessions' K/V scattered over a store in shuffled blocks; returns the store and per session its blocks."""
    blocks_each = [-(-n // block_size) for n in lengths]
    order = torch.randperm(sum(blocks_each), generator=generator).tolist()
    tables, start = [], 0
    for count in blocks_each:
        tables.append(order[start: start + count])
        start += count
    slots = sum(blocks_each) * block_size
    keys = torch.randn(slots, kv_heads, head_dim, generator=generator)
    values = torch.randn(slots, kv_heads, head_dim, generator=generator)
    return keys, values, tables


def _gather(store: torch.Tensor, blocks: list[int], length: int, block_size: int) -> torch.Tensor:
    slots = [blocks[p // block_size] * block_size + p % block_size for p in range(length)]
    return store[slots].transpose(0, 1)  # [Hkv, L, D]


def _kernel_rows(query, keys, values, tables, rows_of, block_size, scale):
    """rows_of: per row (session, attended length)."""
    table = torch.tensor([b for t in tables for b in t], dtype=torch.int32)
    starts = torch.tensor([sum(len(t) for t in tables[:s]) for s, _ in rows_of], dtype=torch.int64)
    lengths = torch.tensor([n for _, n in rows_of], dtype=torch.int32)
    return small_gemm.paged_attention(query.contiguous(), keys, values, table, starts, lengths, block_size, scale)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 16), (6, 2, 12), (2, 1, 128)])
def test_kernel_matches_sdpa_and_gives_a_row_the_same_bits_in_any_company(heads, kv_heads, head_dim):
    if not small_gemm.kernel_available():
        pytest.skip("the attention kernel needs x86 with AVX2 and FMA and a C compiler")
    generator = torch.Generator().manual_seed(heads * 1000 + head_dim)
    block_size, lengths = 16, [1, 37, 16, 130]
    keys, values, tables = _scattered_store(lengths, kv_heads, head_dim, block_size, generator)
    scale = head_dim ** -0.5
    # Every session's last three positions (or fewer), as a verify step asks them.
    rows_of = [(s, p + 1) for s, n in enumerate(lengths) for p in range(max(0, n - 3), n)]
    query = torch.randn(len(rows_of), heads, head_dim, generator=generator)
    together = _kernel_rows(query, keys, values, tables, rows_of, block_size, scale)
    for i, (session, length) in enumerate(rows_of):
        alone = _kernel_rows(query[i: i + 1], keys, values, tables, [(session, length)], block_size, scale)
        assert torch.equal(alone[0], together[i])
        k = _gather(keys, tables[session], length, block_size)[None]
        v = _gather(values, tables[session], length, block_size)[None]
        expected = F.scaled_dot_product_attention(query[i][None, :, None], k, v, scale=scale,
                                                  enable_gqa=heads != kv_heads)[0, :, 0]
        torch.testing.assert_close(together[i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["past_the_table", "empty_row", "block_outside_the_store", "negative_start",
                                 "int64_table", "strided_query", "rows_and_lengths_disagree", "head_dim_mismatch"])
def test_inputs_that_would_index_out_of_range_raise_before_the_kernel_reads(bad):
    if not small_gemm.kernel_available():
        pytest.skip("the attention kernel needs x86 with AVX2 and FMA and a C compiler")
    generator = torch.Generator().manual_seed(5)
    block_size, heads, kv_heads, head_dim = 16, 4, 2, 16
    keys, values, tables = _scattered_store([20, 5], kv_heads, head_dim, block_size, generator)
    table = torch.tensor([b for t in tables for b in t], dtype=torch.int32)
    starts, lengths = torch.tensor([0, 2]), torch.tensor([20, 5], dtype=torch.int32)
    query = torch.randn(2, heads, head_dim, generator=generator)
    if bad == "past_the_table":
        lengths[1] = 2 * block_size  # two blocks from the table's last entry
    elif bad == "empty_row":
        lengths[0] = 0
    elif bad == "block_outside_the_store":
        table[1] = keys.shape[0] // block_size
    elif bad == "negative_start":
        starts[1] = -1
    elif bad == "int64_table":
        table = table.long()
    elif bad == "strided_query":
        query = torch.randn(heads, 2, head_dim).transpose(0, 1)
    elif bad == "rows_and_lengths_disagree":
        lengths = lengths[:1]
    else:
        keys = keys[..., :8].contiguous()
    with pytest.raises(ValueError):
        small_gemm.paged_attention(query, keys, values, table, starts, lengths, block_size, 0.25)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_sdpa_path_serves_passes_the_kernel_cannot(arch, monkeypatch):
    """Without the kernel (CUDA, bf16, no compiler) a packed pass gathers each session's KV for SDPA: the same
    logits as the model's own forward, and decoding on after a rollback still matches."""
    monkeypatch.setattr(small_gemm, "kernel_available", lambda: False)
    model, reference = tiny_model(arch), tiny_model(arch)
    packed.install(model)
    cpu = torch.device("cpu")
    prompts = [[5, 9, 14, 2, 77, 31], [100, 3, 8]]
    pool = KVPool(block_size=4)
    caches = [PagedCache(pool) for _ in prompts]
    first = packed.packed_forward(model, [(p, 0, c) for p, c in zip(prompts, caches)], cpu, [2, 2], False)
    crop_cache(caches[0], 4)  # roll the first session back two positions and feed other tokens
    second = packed.packed_forward(model, [([40, 41], 4, caches[0]), ([9], 3, caches[1])], cpu, [2, 1], False)
    expectations = [(first[0][0], prompts[0], 2), (first[1][0], prompts[1], 2),
                    (second[0][0], prompts[0][:4] + [40, 41], 2), (second[1][0], prompts[1] + [9], 1)]
    for logits, ids, keep in expectations:
        torch.testing.assert_close(logits, reference(input_ids=torch.tensor([ids])).logits[0, -keep:],
                                   rtol=1e-4, atol=1e-4)


def _computed(pool: KVPool, tokens: list[int]) -> PagedCache:
    """A cache that computed `tokens` (its blocks reserved and counted) and offered its full blocks."""
    cache = PagedCache(pool)
    cache.reserve(len(tokens))
    cache.length = len(tokens)
    cache.publish_prefix(tokens)
    return cache


def test_a_prompt_shares_the_full_blocks_an_earlier_prompt_computed():
    pool = KVPool(block_size=4)
    first = _computed(pool, list(range(10)))  # blocks [0..3], [4..7] published; 8, 9 private
    second = PagedCache(pool)
    assert second.adopt_prefix(list(range(8)) + [99, 98, 97, 96]) == 8
    assert second.blocks == first.blocks[:2] and second.shared == 8
    third = PagedCache(pool)
    assert third.adopt_prefix([0, 1, 2, 99, 4, 5, 6, 7]) == 0  # differs inside the first block
    assert PagedCache(pool).adopt_prefix([0, 1, 2]) == 0  # no full block


def test_cached_blocks_outlive_their_sessions_until_their_slots_are_needed():
    pool = KVPool(block_size=4)
    first = _computed(pool, list(range(8)))
    shared = list(first.blocks)
    del first
    gc.collect()
    assert pool.cached_blocks == 2  # nobody holds them; still cached
    again = PagedCache(pool)
    assert again.adopt_prefix(list(range(8))) == 8 and again.blocks == shared
    del again
    gc.collect()
    filler = PagedCache(pool)
    filler.reserve(4 * pool.free_blocks)  # every free slot and both cached blocks
    assert pool.cached_blocks == 0
    assert PagedCache(pool).adopt_prefix(list(range(8))) == 0


def test_a_pass_never_writes_into_a_shared_block():
    model = tiny_model("llama")
    packed.install(model)
    pool = KVPool(block_size=4)
    prompt = [5, 9, 14, 2, 77, 31, 8, 3, 40]
    owner = PagedCache(pool)
    packed.packed_forward(model, [(prompt, 0, owner)], torch.device("cpu"), [1], False)
    owner.publish_prefix(prompt)
    sharer = PagedCache(pool)
    assert sharer.adopt_prefix(prompt) == 8
    crop_cache(sharer, 6)
    with pytest.raises(ValueError, match="share"):
        packed.packed_forward(model, [([1, 2], 6, sharer)], torch.device("cpu"), [1], False)

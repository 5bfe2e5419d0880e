"""One forward pass over the rows of many sessions, each attending only to its own KV.

The rows of every session in a step are packed into one sequence [1, N]: the linear layers
(most of a small model's cost) read their weights once for all of them, while each row attends
only to its own session's KV, which lives in blocks of a shared store (specdec/compute/paged_kv.py).
Positions are per row, so each session sees exactly the positions it would see alone. A pass
writes its rows' K and V into their slots with one indexed copy per layer; nothing is
concatenated and rollback costs nothing.

Attention, fp32 on CPU: one call of specd's kernel (specdec/compute/small_gemm.c) for all rows of the pass,
each (row, KV head) reduced in an order fixed by the row's own length. Elsewhere (CUDA, bf16, no
kernel): per session, its K/V gathered from the store and one SDPA call with the same shapes
whether the session is alone or not.

Batch invariance: a row's attention is the same computation whatever else shares the step, and
specd's CPU kernel reduces each output row of the linear layers in one order whatever the row
count (specdec/compute/small_gemm.py). Together they give a session the same bits alone or in a batch.
Where the linear layers go through a BLAS or cuBLAS GEMM (GPU, bf16, kernel off) the bits can
depend on the row count; the verifier's `batch_invariant_only` setting then packs one session per pass.

Works with any transformers causal LM whose attention goes through `ALL_ATTENTION_FUNCTIONS` and
updates `past_key_values` per layer (Llama, Qwen2, Mistral, GPT-2, ...): the model runs with the
attention implementation registered here, which falls back to SDPA outside a packed pass.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdec.compute import small_gemm
from specdec.compute.paged_kv import PagedCache

ATTENTION_NAME = "specd_packed"
MAX_KERNEL_HEAD_DIM = 256
_active = threading.local()  # the PackedKV of the pass running on this thread, if any


@dataclass(frozen=True)
class Segment:
    """Rows [start, start + length) of the packed sequence: one session's positions first .. first + length - 1."""

    start: int
    length: int
    first: int
    cache: PagedCache  # its blocks already cover the positions the pass writes


class PackedKV:
    """Stands in for `past_key_values` during a packed pass: writes each row's K and V into its slot and
    holds the per-pass tables the attention reads (the same in every layer)."""

    is_compileable = False

    def __init__(self, segments: list[Segment], device: torch.device):
        self.segments = segments
        self.pool = segments[0].cache.pool
        if any(seg.cache.pool is not self.pool for seg in segments):
            raise ValueError("the sessions of one pass must share a KV pool")
        positions = [(seg, p) for seg in segments for p in range(seg.first, seg.first + seg.length)]
        self.slots = torch.tensor([seg.cache.slot(p) for seg, p in positions], dtype=torch.long,
                                  device=device)  # [N]: where each row's K and V go
        table_start, starts = 0, []
        for seg in segments:
            starts.append(table_start)
            table_start += len(seg.cache.blocks)
        self.block_table = torch.tensor([b for seg in segments for b in seg.cache.blocks], dtype=torch.int32)
        self.row_blocks = torch.tensor([s for seg, s in zip(segments, starts) for _ in range(seg.length)],
                                       dtype=torch.int64)  # [N]
        self.row_len = torch.tensor([p + 1 for _, p in positions], dtype=torch.int32)  # [N]
        self._gathers: list[torch.Tensor] | None = None
        self.masks: dict[tuple[int, int], torch.Tensor] = {}  # (new rows, kv length): the same in every layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs=None):
        """key_states/value_states: [1, Hkv, N, D] for the packed rows; stores them and returns them unchanged."""
        key_store, value_store = self.pool.layer(layer_idx, key_states)
        key_store.index_copy_(0, self.slots, key_states[0].transpose(0, 1))
        value_store.index_copy_(0, self.slots, value_states[0].transpose(0, 1))
        return key_states, value_states

    def gathers(self) -> list[torch.Tensor]:
        """Per segment the slots of its positions 0 .. first + length - 1, in order (the SDPA path)."""
        if self._gathers is None:
            self._gathers = [torch.tensor([seg.cache.slot(p) for p in range(seg.first + seg.length)], dtype=torch.long,
                                          device=self.slots.device) for seg in self.segments]
        return self._gathers

    def mask(self, new_rows: int, kv_length: int, device: torch.device) -> torch.Tensor:
        key = (new_rows, kv_length)
        if key not in self.masks:
            self.masks[key] = causal_mask(new_rows, kv_length, device)
        return self.masks[key]

    # The mask builder asks the cache for sizes; the packed attention builds its own masks.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    @property
    def is_sliding(self) -> list[bool]:
        return [False]


def causal_mask(new_rows: int, kv_length: int, device: torch.device) -> torch.Tensor:
    """[new_rows, kv_length] bool: row j (at position kv_length - new_rows + j) sees positions <= its own."""
    positions = torch.arange(kv_length, device=device)
    own = torch.arange(kv_length - new_rows, kv_length, device=device)
    return positions[None, :] <= own[:, None]


def _kernel_serves(query: torch.Tensor, key_store: torch.Tensor) -> bool:
    return (query.device.type == "cpu" and query.dtype == torch.float32 and key_store.dtype == torch.float32
            and query.shape[-1] <= MAX_KERNEL_HEAD_DIM and query.shape[1] % key_store.shape[1] == 0
            and small_gemm.kernel_available())


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The attention function the model calls: query [1, H, N, D]; returns ([1, N, H, D], None)."""
    packed: PackedKV | None = getattr(_active, "packed", None)
    if packed is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    key_store, value_store = packed.pool.layers[module.layer_idx]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    rows = query[0].transpose(0, 1)  # [N, H, D]
    if _kernel_serves(query, key_store):
        out = small_gemm.paged_attention(rows.contiguous(), key_store, value_store, packed.block_table,
                                         packed.row_blocks, packed.row_len, packed.pool.block_size, scale)
        return out[None], None
    outputs = []
    for seg, slots in zip(packed.segments, packed.gathers()):
        seg_query = query[:, :, seg.start: seg.start + seg.length]  # [1, H, n, D]
        seg_key = key_store[slots].transpose(0, 1)[None]  # [1, Hkv, L, D]
        seg_value = value_store[slots].transpose(0, 1)[None]
        mask = packed.mask(seg.length, slots.shape[0], query.device)
        outputs.append(F.scaled_dot_product_attention(seg_query, seg_key, seg_value, attn_mask=mask, scale=scale,
                                                      enable_gqa=query.shape[1] != seg_key.shape[1]))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def install(model: torch.nn.Module) -> None:
    """Makes `model` run its attention through `packed_attention` (SDPA outside packed passes)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)


@torch.inference_mode()
def packed_forward(model: torch.nn.Module, rows: list[tuple[list[int], int, object]], device: torch.device,
                   keep: list[int], output_hidden: bool, embeds: list[torch.Tensor] | None = None):
    """One forward over several sessions' new tokens.

    rows: per session (new token ids, position of the first one, its PagedCache); keep: how many of each
    session's last rows need logits; embeds: per session the input rows [n_i, H] to feed instead of the
    ids' embeddings (feature drafters). Returns per session (logits [keep_i, V], last hidden [n_i, H] | None).
    """
    segments, ids, positions, start = [], [], [], 0
    for (new_ids, first_position, cache), k in zip(rows, keep):
        if not 0 <= k <= len(new_ids):
            raise ValueError(f"logits for {k} rows asked of a session feeding {len(new_ids)}")
        if cache.length != first_position:
            raise ValueError(f"a session with KV for {cache.length} positions cannot feed position {first_position}")
        if first_position < cache.shared:
            raise ValueError(f"position {first_position} lies in a prefix block other sessions share")
        cache.reserve(first_position + len(new_ids))
        segments.append(Segment(start, len(new_ids), first_position, cache))
        ids.extend(new_ids)
        positions.extend(range(first_position, first_position + len(new_ids)))
        start += len(new_ids)
    keep_rows = [seg.start + seg.length - k + j for seg, k in zip(segments, keep) for j in range(k)]
    packed = PackedKV(segments, device)
    _active.packed = packed
    try:
        inputs = ({"inputs_embeds": torch.cat(embeds)[None]} if embeds is not None
                  else {"input_ids": torch.tensor([ids], dtype=torch.long, device=device)})
        out = model(**inputs,
                    position_ids=torch.tensor([positions], dtype=torch.long, device=device),
                    past_key_values=packed, use_cache=True, output_hidden_states=output_hidden,
                    logits_to_keep=torch.tensor(keep_rows, dtype=torch.long, device=device))
    finally:
        _active.packed = None
    for seg in segments:
        seg.cache.length = seg.first + seg.length
    logits = out.logits[0]  # [sum(keep), V]
    hidden = out.hidden_states[-1][0] if output_hidden else None  # [N, H], after the final norm
    results, offset = [], 0
    for seg, k in zip(segments, keep):
        seg_hidden = hidden[seg.start: seg.start + seg.length] if hidden is not None else None
        results.append((logits[offset: offset + k], seg_hidden))
        offset += k
    return results

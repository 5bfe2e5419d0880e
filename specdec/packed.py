"""One forward pass over the rows of many sessions, each attending only to its own KV.

The rows of every session in a step are packed into one sequence [1, N]: the linear layers
(most of a small model's cost) read their weights once for all of them, while attention runs
per session over that session's own cache. Positions are per row, so each session sees exactly
the positions it would see alone.

Batch invariance: a session's attention is the same call whatever else shares the step (same
shapes, same mask), and specd's CPU kernel reduces each output row in one order whatever the row
count (specdec/small_gemm.py). Together they give a session the same bits alone or in a batch.
Where the linear layers go through a BLAS or cuBLAS GEMM (GPU, bf16, kernel off) the bits can
depend on the row count; the verifier's `batch_invariant_only` setting then packs one session per pass.

Works with any transformers causal LM whose attention goes through `ALL_ATTENTION_FUNCTIONS` and
updates `past_key_values` per layer (Llama, Qwen2, Mistral, GPT-2, ...): the model runs with the
attention implementation registered here, which falls back to SDPA outside a packed pass.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "specd_packed"
_active = threading.local()  # the PackedKV of the pass running on this thread, if any


@dataclass(frozen=True)
class Segment:
    """Rows [start, start + length) of the packed sequence belong to one session's cache."""

    start: int
    length: int
    cache: object  # the session's transformers Cache; it grows by `length` positions in the pass


class PackedKV:
    """Stands in for `past_key_values` during a packed pass: appends each session's new KV to its own
    cache and keeps the full per-session K/V of the current layer for the attention function."""

    is_compileable = False

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self.layer_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.masks: dict[tuple[int, int], torch.Tensor] = {}  # (new rows, kv length): the same in every layer

    def mask(self, new_rows: int, kv_length: int, device: torch.device) -> torch.Tensor:
        key = (new_rows, kv_length)
        if key not in self.masks:
            self.masks[key] = causal_mask(new_rows, kv_length, device)
        return self.masks[key]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs=None):
        """key_states/value_states: [1, Hkv, N, D] for the packed rows; returns them unchanged."""
        full = []
        for seg in self.segments:
            rows = slice(seg.start, seg.start + seg.length)
            full.append(seg.cache.update(key_states[:, :, rows], value_states[:, :, rows], layer_idx))
        self.layer_kv[layer_idx] = full
        return key_states, value_states

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


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
            scaling: float | None) -> torch.Tensor:
    """query [1, H, n, D] over key/value [1, Hkv, L, D] with mask [n, L] -> [1, H, n, D]; the mask is always
    explicit so a one-row step and a many-row step take the same SDPA path."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                          enable_gqa=query.shape[1] != key.shape[1])


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The attention function the model calls: query [1, H, N, D]; returns ([1, N, H, D], None)."""
    packed: PackedKV | None = getattr(_active, "packed", None)
    if packed is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    outputs = []
    for seg, (seg_key, seg_value) in zip(packed.segments, packed.layer_kv[module.layer_idx]):
        rows = slice(seg.start, seg.start + seg.length)
        mask = packed.mask(seg.length, seg_key.shape[2], query.device)
        outputs.append(_attend(query[:, :, rows], seg_key, seg_value, mask, scaling))
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

    rows: per session (new token ids, position of the first one, its Cache); keep: how many of each
    session's last rows need logits; embeds: per session the input rows [n_i, H] to feed instead of the
    ids' embeddings (feature drafters). Returns per session (logits [keep_i, V], last hidden [n_i, H] | None).
    """
    segments, ids, positions, start = [], [], [], 0
    for (new_ids, first_position, cache), k in zip(rows, keep):
        if not 0 <= k <= len(new_ids):
            raise ValueError(f"logits for {k} rows asked of a session feeding {len(new_ids)}")
        segments.append(Segment(start, len(new_ids), cache))
        ids.extend(new_ids)
        positions.extend(range(first_position, first_position + len(new_ids)))
        start += len(new_ids)
    keep_rows = [seg.start + seg.length - k + j for seg, k in zip(segments, keep) for j in range(k)]
    packed = PackedKV(segments)
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
    logits = out.logits[0]  # [sum(keep), V]
    hidden = out.hidden_states[-1][0] if output_hidden else None  # [N, H], after the final norm
    results, offset = [], 0
    for seg, k in zip(segments, keep):
        seg_hidden = hidden[seg.start: seg.start + seg.length] if hidden is not None else None
        results.append((logits[offset: offset + k], seg_hidden))
        offset += k
    return results

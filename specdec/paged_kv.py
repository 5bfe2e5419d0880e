"""KV of many sessions in one store of fixed-size blocks, as in vLLM's PagedAttention.

Each layer keeps K and V in two tensors of `slots` token positions, [slots, Hkv, D]; a session owns
whole blocks of BLOCK_SIZE slots, listed in its block table. Rolling back is setting a shorter
length: rejected positions keep their blocks and are overwritten by the next pass. A session's
blocks go back to the pool when its cache is dropped, so nothing else needs to free them.

The store grows by doubling, so its shapes stay in a few buckets (room for CUDA graphs or
torch.compile later), and never moves a session's KV between blocks.
"""

from __future__ import annotations

import threading

import torch

BLOCK_SIZE = 16
INITIAL_BLOCKS = 64


class KVPool:
    """Blocks of KV slots shared by the sessions of one model; thread-safe allocation."""

    def __init__(self, block_size: int = BLOCK_SIZE):
        self.block_size = block_size
        self.num_blocks = 0
        self._free: list[int] = []
        self._lock = threading.RLock()  # RLock: a cache dropped inside allocate gives its blocks back there
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (K, V) [slots, Hkv, D]

    def allocate(self, count: int) -> list[int]:
        with self._lock:
            if count > len(self._free):
                grown = max(INITIAL_BLOCKS, 2 * self.num_blocks, self.num_blocks + count - len(self._free))
                self._free.extend(range(grown - 1, self.num_blocks - 1, -1))  # lowest ids handed out first
                self.num_blocks = grown
            return [self._free.pop() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        with self._lock:
            self._free.extend(reversed(blocks))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V stores [slots, Hkv, D] for key rows shaped like `like` [.., Hkv, n, D], grown
        to cover every allocated block (called from the pass only, so no other pass reads them meanwhile)."""
        slots = self.num_blocks * self.block_size
        stores = self.layers.get(layer_idx)
        if stores is None or stores[0].shape[0] < slots:
            shape = (slots, like.shape[-3], like.shape[-1])
            grown = tuple(torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(2))
            if stores is not None:
                for new, old in zip(grown, stores):
                    new[: old.shape[0]].copy_(old)
            stores = self.layers[layer_idx] = grown
        return stores

    def bytes_per_block(self) -> int:
        return sum(2 * k.stride(0) * k.element_size() for k, _ in self.layers.values()) * self.block_size


class PagedCache:
    """One session's KV in a KVPool: its block table and how many positions hold valid KV.

    Offers what specd asks of a transformers Cache (`get_seq_length`, `crop`), so rollback code works
    on either."""

    def __init__(self, pool: KVPool):
        self.pool = pool
        self.blocks: list[int] = []
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """Keeps the first `max_length` positions (a negative value drops that many), as DynamicCache.crop."""
        keep = max_length if max_length >= 0 else self.length + max_length
        self.length = max(0, min(self.length, keep))

    def reserve(self, length: int) -> None:
        """Owns blocks for positions 0 .. length-1."""
        needed = -(-length // self.pool.block_size) - len(self.blocks)
        if needed > 0:
            self.blocks.extend(self.pool.allocate(needed))

    def slot(self, position: int) -> int:
        return self.blocks[position // self.pool.block_size] * self.pool.block_size + position % self.pool.block_size

    def kv_bytes(self) -> int:
        return len(self.blocks) * self.pool.bytes_per_block()

    def __del__(self):
        if self.blocks:
            self.pool.release(self.blocks)
            self.blocks = []

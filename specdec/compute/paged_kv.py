"""KV of many sessions in one store of fixed-size blocks, as in vLLM's PagedAttention.

Each layer keeps K and V in two tensors of `slots` token positions, [slots, Hkv, D]; a session owns
whole blocks of BLOCK_SIZE slots, listed in its block table. Rolling back is setting a shorter
length: rejected positions keep their blocks and are overwritten by the next pass. A session's
blocks go back to the pool when its cache is dropped, so nothing else needs to free them.

The store grows by doubling, so its shapes stay in a few buckets (room for CUDA graphs or
torch.compile later), and never moves a session's KV between blocks.

Prefix caching: a full block of a prompt is named by a digest of every token up to its end, and a
session whose prompt starts with the same tokens shares the block instead of computing it again
(a chat template's system prompt, a few-shot preamble). Shared blocks are never written: sessions
write only past their prompt. A block no session holds stays cached until its slots are needed;
the least recently released goes first. With the batch-invariant kernel a shared block holds the
bits the session would have computed itself.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict

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
        self._block_bytes = 0  # K and V of one block, every layer: the gauges read it per call
        self._block_of: dict[bytes, int] = {}       # prefix digest -> the block holding its last BLOCK_SIZE positions
        self._digest_of: dict[int, bytes] = {}
        self._holders: dict[int, int] = {}          # cached block -> sessions holding it
        self._unheld: OrderedDict[int, None] = OrderedDict()  # cached blocks no session holds, oldest first

    def allocate(self, count: int) -> list[int]:
        with self._lock:
            while count > len(self._free) and self._unheld:
                block, _ = self._unheld.popitem(last=False)
                del self._block_of[self._digest_of.pop(block)]
                self._free.append(block)
            if count > len(self._free):
                grown = max(INITIAL_BLOCKS, 2 * self.num_blocks, self.num_blocks + count - len(self._free))
                self._free.extend(range(grown - 1, self.num_blocks - 1, -1))  # lowest ids handed out first
                self.num_blocks = grown
            return [self._free.pop() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        with self._lock:
            for block in reversed(blocks):
                if block not in self._digest_of:
                    self._free.append(block)
                    continue
                self._holders[block] -= 1
                if not self._holders[block]:
                    del self._holders[block]
                    self._unheld[block] = None

    def share(self, digest: bytes) -> int | None:
        """The cached block named `digest`, now held once more; None when no block holds that prefix."""
        with self._lock:
            block = self._block_of.get(digest)
            if block is not None:
                self._unheld.pop(block, None)
                self._holders[block] = self._holders.get(block, 0) + 1
            return block

    def publish(self, block: int, digest: bytes) -> None:
        """Names a computed block after its prefix, held by the session that computed it; a prefix another
        session published first keeps that session's block."""
        with self._lock:
            if digest not in self._block_of:
                self._block_of[digest], self._digest_of[block] = block, digest
                self._holders[block] = 1

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take: free ones and cached ones no session holds."""
        return len(self._free) + len(self._unheld)

    @property
    def cached_blocks(self) -> int:
        return len(self._digest_of)

    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V stores [slots, Hkv, D] for key rows shaped like `like` [.., Hkv, n, D], grown
        to cover every allocated block (called from the pass only, so no other pass reads them meanwhile)."""
        slots = self.num_blocks * self.block_size
        stores = self.layers.get(layer_idx)
        if stores is None or stores[0].shape[0] < slots:
            shape = (slots, like.shape[-3], like.shape[-1])
            grown = tuple(torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(2))
            if stores is None:
                self._block_bytes += 2 * grown[0][0].nbytes * self.block_size
            else:
                for new, old in zip(grown, stores):
                    new[: old.shape[0]].copy_(old)
            stores = self.layers[layer_idx] = grown
        return stores

    def bytes_per_block(self) -> int:
        return self._block_bytes


class PagedCache:
    """One session's KV in a KVPool: its block table and how many positions hold valid KV.

    Offers what specd asks of a transformers Cache (`get_seq_length`, `crop`), so rollback code works
    on either."""

    def __init__(self, pool: KVPool):
        self.pool = pool
        self.blocks: list[int] = []
        self.length = 0
        self.digests: list[bytes] = []  # of blocks[:len(digests)]: the prompt's full blocks, never written again

    @property
    def shared(self) -> int:
        """Positions other sessions may read: no pass writes below them."""
        return len(self.digests) * self.pool.block_size

    def adopt_prefix(self, tokens: list[int]) -> int:
        """Shares the cached blocks of the longest full-block prefix of `tokens` (a fresh cache only); returns
        the positions they cover."""
        if self.blocks:
            raise ValueError("a prefix is adopted before the session computes anything")
        size, digest = self.pool.block_size, b""
        for start in range(0, len(tokens) - size + 1, size):
            digest = prefix_digest(digest, tokens[start: start + size])
            block = self.pool.share(digest)
            if block is None:
                break
            self.blocks.append(block)
            self.digests.append(digest)
        self.length = self.shared
        return self.length

    def publish_prefix(self, tokens: list[int]) -> None:
        """Offers the full blocks of `tokens` that this cache holds computed to later sessions."""
        size = self.pool.block_size
        digest = self.digests[-1] if self.digests else b""
        for index in range(len(self.digests), min(self.length, len(tokens)) // size):
            digest = prefix_digest(digest, tokens[index * size: (index + 1) * size])
            self.pool.publish(self.blocks[index], digest)
            self.digests.append(digest)

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


def prefix_digest(parent: bytes, block_tokens: list[int]) -> bytes:
    """Names a block by every token up to its end: the digest of its parent's digest and its own tokens."""
    return hashlib.sha256(parent + array("q", block_tokens).tobytes()).digest()

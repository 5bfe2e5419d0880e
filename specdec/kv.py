"""Per-session KV caches, kept apart from the model runner.

A session holds the token ids of its sequence and a KV cache covering a prefix
of them. At least the last token is always left out of the cache, so the next
forward pass yields the logits that predict what follows without keeping
logits around; rolling back is cropping both.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec import packed
from specdec.errors import CapacityExhausted, SessionNotFound
from specdec.paged_kv import KVPool, PagedCache


@dataclass
class KVSession:
    session_id: str
    ids: list[int] = field(default_factory=list)
    cache: PagedCache | None = None   # dropping it gives its blocks back to the pool
    cached_len: int = 0               # ids[:cached_len] have KV in `cache`
    last_used: float = field(default_factory=time.monotonic)
    request_id: str = ""
    extra: dict = field(default_factory=dict)  # role-specific state (sampling params, seed, ...)

    def crop(self, length: int) -> None:
        """Keeps the first `length` ids and whatever KV they have: a rollback recomputes nothing."""
        del self.ids[length:]
        self.crop_kv(min(self.cached_len, length))

    def crop_kv(self, keep: int) -> None:
        """Drops KV beyond the first `keep` ids (the ids stay)."""
        if self.cache is not None and keep < self.cached_len:
            crop_cache(self.cache, keep)
        self.cached_len = keep

    def reconcile(self, base_len: int, tokens: list[int]) -> int:
        """Makes the sequence ids[:base_len] + tokens, keeping KV that still matches.

        Returns the length of the prefix that was already present.
        """
        if base_len > len(self.ids):
            raise ValueError(f"base_len {base_len} exceeds the session's {len(self.ids)} tokens")
        common = base_len
        for token in tokens:
            if common < len(self.ids) and self.ids[common] == token:
                common += 1
            else:
                break
        self.crop(common)
        self.ids.extend(tokens[common - base_len:])
        return common

    def kv_bytes(self) -> int:
        return self.cache.kv_bytes() if self.cache is not None else 0


def crop_cache(cache, length: int) -> None:
    """Crops a transformers Cache or a PagedCache to its first `length` positions."""
    current = cache.get_seq_length()
    if length < current:
        cache.crop(length - current) if length > 0 else cache.crop(-current)


class SessionStore:
    """Thread-safe sessions with a capacity bound and an idle TTL."""

    def __init__(self, max_sessions: int, ttl_s: float):
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._sessions: dict[str, KVSession] = {}
        self._lock = threading.Lock()

    def create(self, session_id: str, request_id: str = "") -> KVSession:
        with self._lock:
            self._expire_locked()
            if session_id not in self._sessions and len(self._sessions) >= self.max_sessions:
                raise CapacityExhausted(f"all {self.max_sessions} sessions are in use; retry later or scale out")
            session = KVSession(session_id, request_id=request_id)
            self._sessions[session_id] = session
            return session

    def get(self, session_id: str) -> KVSession:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise SessionNotFound(f"unknown session {session_id!r} (expired, released or never opened)")
            session.last_used = time.monotonic()
            return session

    def release(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def expire(self) -> list[str]:
        with self._lock:
            return self._expire_locked()

    def _expire_locked(self) -> list[str]:
        deadline = time.monotonic() - self.ttl_s
        stale = [sid for sid, s in self._sessions.items() if s.last_used < deadline]
        for sid in stale:
            del self._sessions[sid]
        return stale

    def __len__(self) -> int:
        return len(self._sessions)

    def kv_bytes(self) -> int:
        with self._lock:
            return sum(s.kv_bytes() for s in self._sessions.values())


class ModelRunner:
    """Runs the model over sessions, many at once (specdec/packed.py). Stateless apart from the model."""

    def __init__(self, model: torch.nn.Module, device: torch.device, small_gemm: bool = False,
                 gguf_path: Path | None = None, quantise_to: str = ""):
        from specdec import gguf_blocks
        from specdec import small_gemm as kernel
        from specdec.gguf_quantised import QuantLinear

        self.model = model
        self.device = device
        # Decode and verify steps feed a few rows; the kernel keeps them memory-bound and batch-invariant.
        self.small_gemm_layers = kernel.install(model) if small_gemm and device.type == "cpu" else 0
        # Layers loaded quantised (specdec.gguf_quantised) run every pass on the kernel: they have no BLAS path.
        self.quantised_layers = sum(isinstance(m, QuantLinear) for m in model.modules())
        # The kernel splits each layer among the process's threads itself; torch's own pool would spin
        # beside it between layers for the small ops it runs there, so torch keeps one thread for passes
        # the kernel serves and gets them all back for prefill-sized ones, which go to BLAS.
        self.threads = torch.get_num_threads()
        self.kernel_rows = kernel.MAX_ROWS if self.small_gemm_layers and not self.quantised_layers else 0
        if self.small_gemm_layers or self.quantised_layers:
            kernel.set_threads(self.threads)
            torch.set_num_threads(1)
        # Weights de-quantised from a GGUF are read in its blocks: a fifth of the bytes, the same values.
        self.gguf_block_layers = gguf_blocks.attach(model, gguf_path) if self.small_gemm_layers and gguf_path else 0
        # Drafters may go further: rounding their own weights to blocks costs acceptance at most.
        if self.small_gemm_layers and quantise_to and not self.gguf_block_layers:
            self.gguf_block_layers = gguf_blocks.quantise_in_place(model, quantise_to)
        # Attention over the packed rows of many sessions, each reading only its own KV.
        packed.install(model)
        self.pool = KVPool()

    def new_cache(self) -> PagedCache:
        return PagedCache(self.pool)

    @torch.inference_mode()
    def extend(self, sessions: list[KVSession], output_hidden: bool = False,
               keep_logits: int | list[int] = 1) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Feeds each session's uncached ids in one packed pass; returns per session
        (logits [keep, V], last hidden [n, H] | None).

        Row i of a session's logits predicts the token after its last `keep` ids (a fully cached session
        first uncaches its last id); keep_logits is one count for all sessions or one per session, and 0
        means no logits (a prefill chunk that only fills the cache).
        """
        rows = []
        for session in sessions:
            if not session.ids:
                raise ValueError("nothing to feed: the session has no tokens")
            if session.cached_len >= len(session.ids):
                # Logits are not kept, only KV: a fully cached session recomputes its last token.
                session.crop_kv(len(session.ids) - 1)
            if session.cache is None:
                session.cache = self.new_cache()
            rows.append((session.ids[session.cached_len:], session.cached_len, session.cache))
        keep = keep_logits if isinstance(keep_logits, list) else [keep_logits] * len(sessions)
        blas = self.kernel_rows and sum(len(new_ids) for new_ids, _, _ in rows) > self.kernel_rows
        if blas:
            torch.set_num_threads(self.threads)
        try:
            results = packed.packed_forward(self.model, rows, self.device, keep, output_hidden)
        finally:
            if blas:
                torch.set_num_threads(1)
        for session in sessions:
            session.cached_len = len(session.ids)
        return results

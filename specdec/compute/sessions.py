"""Per-session KV caches, kept apart from the model runner (specdec/compute/model_runner.py).

A session holds the token ids of its sequence and a KV cache covering a prefix
of them. At least the last token is always left out of the cache, so the next
forward pass yields the logits that predict what follows without keeping
logits around; rolling back is cropping both.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from specdec.compute.paged_kv import PagedCache
from specdec.errors import CapacityExhausted, SessionNotFound


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

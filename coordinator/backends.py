"""Upstream drafter and verifier endpoints, with health marks for fallback and failover."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import grpc

# Errors that say the endpoint (not the request) is broken.
TRANSPORT_ERRORS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
                    grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class Backend:
    addr: str
    channel: grpc.aio.Channel
    stub: object
    down_until: float = 0.0
    failures: int = 0

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.down_until


@dataclass
class BackendPool:
    backends: list[Backend] = field(default_factory=list)

    @classmethod
    def connect(cls, addrs: list[str], stub_cls, credentials: grpc.ChannelCredentials | None,
                options: list[tuple[str, int]]) -> "BackendPool":
        backends = []
        for addr in addrs:
            channel = (grpc.aio.secure_channel(addr, credentials, options=options) if credentials
                       else grpc.aio.insecure_channel(addr, options=options))
            backends.append(Backend(addr, channel, stub_cls(channel)))
        return cls(backends)

    def pick(self, key: str, exclude: set[str] = frozenset()) -> Backend | None:
        """A healthy backend chosen stably by key (session affinity), or None."""
        candidates = [b for b in self.backends if b.healthy and b.addr not in exclude]
        if not candidates:
            return None
        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
        return candidates[digest % len(candidates)]

    def mark_down(self, backend: Backend, seconds: float) -> None:
        backend.failures += 1
        backend.down_until = time.monotonic() + seconds

    def mark_up(self, backend: Backend) -> None:
        backend.failures = 0
        backend.down_until = 0.0

    async def close(self) -> None:
        for backend in self.backends:
            await backend.channel.close()

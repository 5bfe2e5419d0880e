"""Upstream drafter and verifier endpoints: health marks, re-admission by health watch, and the one
classification of what an upstream failure says about the endpoint and the request."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.verify_stream import VerifyStream
from specdec import metrics
from specdec.v1 import verifier_pb2

log = logging.getLogger(__name__)

# A restarted backend is reconnected within about a second, not after gRPC's default backoff of up to two minutes.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]
# A backend that vanishes without closing its connection (host lost, network cut) fails the calls and the
# Verify stream on it within about 15 s instead of leaving them waiting for their deadline, or forever.
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                     ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
WATCH_RETRY_S = 0.25  # pause before re-opening a health watch that ended
RELEASE_TIMEOUT_S = 1.0


class UpstreamError(Exception):
    """A failure to report to the caller with the upstream status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Failure(enum.Enum):
    """What an upstream status code says, and so what the coordinator does about it."""

    TRANSPORT = "transport"      # the endpoint is unreachable or broken: mark it down, use another
    OVERLOAD = "overload"        # the endpoint is busy: use another replica, mark nothing down
    SESSION_LOST = "session"     # the endpoint lost the session (restart, TTL): open it again
    REQUEST = "request"          # this request is at fault: the caller gets the code
    INTERNAL = "internal"        # an upstream bug: the caller gets the code, the endpoint stays up


_REQUEST_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                  grpc.StatusCode.OUT_OF_RANGE}


def classify(code: grpc.StatusCode, deadline_passed: bool = False) -> Failure:
    """`deadline_passed`: the request's own deadline has passed, so a DEADLINE_EXCEEDED is the caller's."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Failure.REQUEST if deadline_passed else Failure.TRANSPORT
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Failure.TRANSPORT
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Failure.OVERLOAD
    if code == grpc.StatusCode.NOT_FOUND:
        return Failure.SESSION_LOST
    if code in _REQUEST_CODES:
        return Failure.REQUEST
    return Failure.INTERNAL


def classified(service: str, err: grpc.aio.AioRpcError, deadline_passed: bool) -> Failure:
    """`classify`, counted in the upstream error metric."""
    failure = classify(err.code(), deadline_passed)
    metrics.UPSTREAM_ERRORS.labels(service=service, failure=failure.value, code=err.code().name).inc()
    return failure


@dataclass
class CallContext:
    """What every upstream call of one request shares: its metadata, its deadline, and how long a
    failed endpoint stays marked down."""

    metadata: list[tuple[str, str]]
    deadline: float | None          # time.monotonic() deadline
    retry_s: float

    def timeout(self) -> float | None:
        if self.deadline is None:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request deadline passed")
        return remaining

    def deadline_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


@dataclass
class Backend:
    addr: str
    channel: grpc.aio.Channel
    stub: object
    serving: bool = True            # as its health service last said
    down_until: float = 0.0         # a failed call keeps it out until then
    failures: int = 0
    verify_stream: VerifyStream | None = None  # a verifier's multiplexed Verify calls (None: one unary call each)

    @property
    def healthy(self) -> bool:
        return self.serving and time.monotonic() >= self.down_until


@dataclass
class BackendPool:
    backends: list[Backend] = field(default_factory=list)
    watchers: list[asyncio.Task] = field(default_factory=list)
    wait_s: float = 0.0             # the longest a new session waits in `wait_healthy` for a backend
    _changed: asyncio.Event = field(default_factory=asyncio.Event)  # set, and replaced, on every health change

    @classmethod
    def connect(cls, addrs: list[str], stub_cls, credentials: grpc.ChannelCredentials | None,
                options: list[tuple[str, int]], wait_s: float = 0.0) -> "BackendPool":
        """Channels to `addrs`, each watched by its health service from now on (needs a running loop).
        With `wait_s`, a backend is taken only once its health service has said SERVING, and a new session
        that finds none healthy waits up to `wait_s` for one (at start-up, or while one restarts)."""
        backends = []
        for addr in addrs:
            channel_options = [*options, *RECONNECT_OPTIONS, *KEEPALIVE_OPTIONS]
            channel = (grpc.aio.secure_channel(addr, credentials, options=channel_options) if credentials
                       else grpc.aio.insecure_channel(addr, options=channel_options))
            backends.append(Backend(addr, channel, stub_cls(channel), serving=wait_s == 0))
        pool = cls(backends, wait_s=wait_s)
        pool.watchers = [asyncio.ensure_future(pool.watch_health(backend)) for backend in backends]
        return pool

    def multiplex_verify(self, metadata: list[tuple[str, str]]) -> None:
        """Verify calls to each backend (a verifier) go over one VerifyStream, opened on first use, that
        carries `metadata`."""
        for backend in self.backends:
            backend.verify_stream = VerifyStream(backend.stub, metadata)

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

    def release_calls(self, session_id: str, addrs: set[str], metadata: list[tuple[str, str]]) -> list:
        """Release calls for a session on the backends in `addrs` (Release of an unknown session is a no-op)."""
        request = verifier_pb2.ReleaseRequest(session_id=session_id)
        return [backend.stub.Release(request, timeout=RELEASE_TIMEOUT_S, metadata=metadata)
                for backend in self.backends if backend.addr in addrs]

    def set_serving(self, backend: Backend, serving: bool) -> None:
        """What the backend's health service says; SERVING re-admits it at once, failure marks included."""
        if serving and not backend.serving:
            log.info("backend serving", extra={"fields": {"addr": backend.addr}})
        elif backend.serving and not serving:
            log.warning("backend not serving", extra={"fields": {"addr": backend.addr}})
        if serving:
            self.mark_up(backend)
        backend.serving = serving
        self._changed.set()
        self._changed = asyncio.Event()

    def any_serving(self) -> bool:
        return any(backend.serving for backend in self.backends)

    def next_change(self) -> asyncio.Event:
        """The event the next health report sets (take it before reading the state it may change)."""
        return self._changed

    async def wait_healthy(self, until: float) -> bool:
        """Waits until a backend is healthy or time.monotonic() reaches `until`; whether one is. Woken by
        the health watches, and when a failure mark of a serving backend runs out."""
        while not any(backend.healthy for backend in self.backends):
            now = time.monotonic()
            if now >= until:
                return False
            marked = [b.down_until for b in self.backends if b.serving and b.down_until > now]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.next_change().wait(), min([until, *marked]) - now)
        return True

    async def watch_health(self, backend: Backend) -> None:
        """Follows the backend's overall health (`Health.Watch` of the empty service name) for as long as
        the pool lives, re-opening the watch whenever it ends; an unreachable backend is not serving."""
        stub = health_pb2_grpc.HealthStub(backend.channel)
        while True:
            try:
                async for message in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    self.set_serving(backend, message.status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self.set_serving(backend, True)
                    return  # no health service there: failed calls alone mark it
                self.set_serving(backend, False)
            await asyncio.sleep(WATCH_RETRY_S)

    async def close(self) -> None:
        for task in self.watchers:
            task.cancel()
        for backend in self.backends:
            if backend.verify_stream is not None:
                backend.verify_stream.close()
            await backend.channel.close()

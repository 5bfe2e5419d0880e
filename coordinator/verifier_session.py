"""One request's session on a verifier, opened again on another replica when its verifier is lost."""

from __future__ import annotations

import logging
import time

import grpc

from coordinator.backends import Backend, BackendPool, CallContext, Failure, UpstreamError, classified
from coordinator.features import TargetFeatures
from specdec import metrics
from specdec.v1 import verifier_pb2

log = logging.getLogger(__name__)


class VerifierSession:
    def __init__(self, verifiers: BackendPool, calls: CallContext, prefill: verifier_pb2.PrefillRequest,
                 features: TargetFeatures):
        """`prefill`: the request's PrefillRequest without its tokens and budget, which `open` fills in."""
        self.verifiers, self.calls = verifiers, calls
        self.prefill, self.features = prefill, features
        self.backend: Backend | None = None
        self.addrs_used: set[str] = set()    # verifiers that may hold the session
        self.intervals: list[tuple[float, float]] = []

    @property
    def session_id(self) -> str:
        return self.prefill.session_id

    async def open(self, committed: list[int], remaining: int, exclude: set[str] = frozenset()) -> None:
        """Prefills `committed` on a healthy verifier, trying the others in turn: an unreachable one is
        marked down, an overloaded one only skipped; any other failure goes to the caller. A new session
        (nothing excluded) that finds no verifier healthy waits for one, up to the request's deadline and
        the pool's `wait_s` (a verifier starting or restarting); a session moving off a lost verifier does not."""
        last_error = "; ".join(f"verifier {b.addr} is draining or unreachable" for b in self.verifiers.backends
                               if not b.serving) or "no verifier is configured"  # why pick may find none
        overloaded = False
        tried = set(exclude)
        may_wait = not exclude
        wait_until = time.monotonic() + self.verifiers.wait_s
        if self.calls.deadline is not None:
            wait_until = min(wait_until, self.calls.deadline)
        while True:
            backend = self.verifiers.pick(self.session_id, tried)
            if backend is None and may_wait and not overloaded and await self.verifiers.wait_healthy(wait_until):
                tried = set(exclude)
                continue
            if backend is None:
                if self.calls.deadline_passed():
                    raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"the request deadline passed while no verifier was healthy: {last_error}")
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if overloaded else grpc.StatusCode.UNAVAILABLE
                raise UpstreamError(code, f"no healthy verifier left: {last_error}")
            request = verifier_pb2.PrefillRequest()
            request.CopyFrom(self.prefill)
            request.token_ids[:] = committed
            request.max_new_tokens = remaining
            # Recorded before the call: a request abandoned mid-Prefill must still release what it opened.
            self.addrs_used.add(backend.addr)
            try:
                response = await backend.stub.Prefill(request, timeout=self.calls.timeout(),
                                                      metadata=self.calls.metadata)
            except grpc.aio.AioRpcError as err:
                failure = classified("verifier", err, self.calls.deadline_passed())
                if failure not in (Failure.TRANSPORT, Failure.OVERLOAD):
                    raise UpstreamError(err.code(), err.details() or "verifier refused the prompt") from None
                if failure is Failure.TRANSPORT:
                    self.verifiers.mark_down(backend, self.calls.retry_s)
                overloaded = failure is Failure.OVERLOAD
                last_error = f"{backend.addr}: {err.code().name} {err.details()}"
                log.warning("verifier prefill failed", extra={"fields": {"addr": backend.addr, "error": last_error}})
                tried.add(backend.addr)
                continue
            self.backend = backend
            return

    async def verify(self, request: verifier_pb2.VerifyRequest, committed: list[int],
                     remaining: int) -> tuple[verifier_pb2.VerifyResponse, float]:
        """The verifier's answer and the seconds its call took. A lost session is prefilled again (on
        another verifier unless only the session was lost); request errors and upstream bugs go to the caller."""
        while True:
            started = time.perf_counter()
            try:
                stream = self.backend.verify_stream
                response = await (stream.verify(request, self.calls.timeout()) if stream is not None
                                  else self.backend.stub.Verify(request, timeout=self.calls.timeout(),
                                                                metadata=self.calls.metadata))
            except grpc.aio.AioRpcError as err:
                failure = classified("verifier", err, self.calls.deadline_passed())
                if failure in (Failure.REQUEST, Failure.INTERNAL):
                    raise UpstreamError(err.code(), err.details() or "verification failed") from None
                failed = self.backend
                log.warning("verifier lost, re-prefilling elsewhere", extra={"fields": {
                    "addr": failed.addr, "code": err.code().name}})
                if failure is Failure.TRANSPORT:
                    self.verifiers.mark_down(failed, self.calls.retry_s)
                await self.open(committed, remaining,
                                exclude=set() if failure is Failure.SESSION_LOST else {failed.addr})
                continue
            finally:
                self.intervals.append((started, time.perf_counter()))
            seconds = time.perf_counter() - started
            metrics.VERIFY_LATENCY.observe(seconds)
            self.features.store(response.hidden)
            return response, seconds

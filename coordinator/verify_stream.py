"""Every session's Verify calls to one verifier over one long-lived VerifyStream: a call costs a place in
the next message each way instead of an RPC of its own. Its failures are the errors a unary Verify would
have raised, so `backends.classified` judges both alike."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import grpc

from specdec.v1 import verifier_pb2

log = logging.getLogger(__name__)

STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
UNARY_RETRY_S = 60.0  # a verifier without VerifyStream gets unary calls this long before the stream is tried again


def call_failed(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a unary Verify ending with `code` raises."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _OpenStream:
    """One VerifyStream call: a sender writes everything queued since its last write as one VerifyBatch,
    a receiver settles each call's future by its id. Once broken, it fails every call it holds with the
    stream's own error and takes no more."""

    def __init__(self, stub, metadata: list[tuple[str, str]]):
        self.call = stub.VerifyStream(metadata=metadata)
        self.queue: list[verifier_pb2.VerifyCall] = []
        self.queued = asyncio.Event()
        self.pending: dict[int, asyncio.Future] = {}
        self.broken = False
        self.tasks = [asyncio.ensure_future(self._send()), asyncio.ensure_future(self._receive())]
        for task in self.tasks:
            task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task) -> None:
        """A sender or receiver that stops for any reason breaks the stream, so no call waits on it forever."""
        if not self.broken:
            reason = "stopped" if task.cancelled() or task.exception() is None else repr(task.exception())
            self.fail(call_failed(grpc.StatusCode.UNAVAILABLE, f"the verify stream's task {reason}"))

    def submit(self, call_id: int, request: verifier_pb2.VerifyRequest) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        self.queue.append(verifier_pb2.VerifyCall(call_id=call_id, request=request))
        self.queued.set()
        return future

    async def _send(self) -> None:
        try:
            while True:
                await self.queued.wait()
                self.queued.clear()
                batch = verifier_pb2.VerifyBatch(calls=self.queue)
                self.queue = []
                await self.call.write(batch)
        except grpc.aio.AioRpcError as err:
            self.fail(err)
        except Exception as err:  # noqa: BLE001 - the call ended under the write (UsageError, InvalidStateError, ...)
            self.fail(call_failed(grpc.StatusCode.UNAVAILABLE, f"the verify stream ended: {err!r}"))

    async def _receive(self) -> None:
        try:
            async for batch in self.call:
                for result in batch.results:
                    future = self.pending.pop(result.call_id, None)
                    if future is None or future.done():
                        continue  # timed out or cancelled meanwhile
                    if result.HasField("error"):
                        code = STATUS_BY_VALUE.get(result.error.code, grpc.StatusCode.UNKNOWN)
                        future.set_exception(call_failed(code, result.error.message))
                    else:
                        future.set_result(result.response)
            self.fail(call_failed(grpc.StatusCode.UNAVAILABLE, "the verifier ended the verify stream"))
        except grpc.aio.AioRpcError as err:
            self.fail(err)
        except Exception as err:  # noqa: BLE001 - anything else ends the stream too
            self.fail(call_failed(grpc.StatusCode.UNAVAILABLE, f"the verify stream ended: {err!r}"))

    def fail(self, error: grpc.aio.AioRpcError) -> None:
        """Breaks the stream: every call on it fails with `error`, as each unary call on a lost channel would."""
        if self.broken:
            return
        self.broken = True
        if self.pending:
            log.warning("verify stream failed", extra={"fields": {"code": error.code().name, "calls": len(self.pending),
                                                                   "details": error.details()}})
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()
        self.call.cancel()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class VerifyStream:
    """The Verify calls of every session on one verifier. The stream opens on the first call and again on
    the first call after it broke; `metadata` (the service's credentials) goes with the stream, each
    request's id inside its VerifyRequest."""

    def __init__(self, stub, metadata: list[tuple[str, str]]):
        self.stub, self.metadata = stub, metadata
        self._open: _OpenStream | None = None
        self._call_ids = itertools.count(1)
        self._unary_until = 0.0  # a verifier that predates VerifyStream gets unary calls until then

    async def verify(self, request: verifier_pb2.VerifyRequest, timeout: float | None) -> verifier_pb2.VerifyResponse:
        """The verifier's answer, or the grpc.aio.AioRpcError the unary Verify would have raised."""
        if time.monotonic() < self._unary_until:
            return await self.stub.Verify(request, timeout=timeout, metadata=self.metadata)
        if self._open is None or self._open.broken:
            self._open = _OpenStream(self.stub, self.metadata)
        stream, call_id = self._open, next(self._call_ids)
        started = time.monotonic()
        try:
            return await asyncio.wait_for(stream.submit(call_id, request), timeout)
        except asyncio.TimeoutError:
            raise call_failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            log.warning("verifier has no VerifyStream; using unary Verify calls", extra={"fields": {
                "retry_stream_s": UNARY_RETRY_S}})
            self._unary_until = time.monotonic() + UNARY_RETRY_S
            left = None if timeout is None else max(timeout - (time.monotonic() - started), 0.0)
            return await self.stub.Verify(request, timeout=left, metadata=self.metadata)
        finally:
            stream.pending.pop(call_id, None)

    def close(self) -> None:
        if self._open is not None:
            self._open.fail(call_failed(grpc.StatusCode.CANCELLED, "the coordinator is closing"))

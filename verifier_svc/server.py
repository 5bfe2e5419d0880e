"""gRPC servicer for the verifier: converts messages and delegates to VerifierCore."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future

import grpc

from specdec import metrics
from specdec.config import VerifierSettings
from specdec.errors import InvalidRequest, status_for
from specdec.models.loader import LoadedModel, configure_threads, load_model
from specdec.sampling_params import sampling_from_proto
from specdec.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from specdec.wire.rpc import Drain, RunningServer, abort_for, expire_sessions_forever, serve_until_signalled, start_server
from specdec.wire.tensor_messages import dist_from_proto, hidden_to_proto
from verifier_svc.scheduler import VerifierOptions
from verifier_svc.verifier import VerifierCore

log = logging.getLogger(__name__)
SERVICE_NAME = "specdec.v1.Verifier"
BATCH_BYTES = 1 << 20  # a VerifyResultBatch stays under the smallest message limit a service can be given


def _ended_undelivered(call) -> bool:
    """Whether a finished call's answer cannot have reached its caller: cancelled, or ended past its deadline."""
    remaining = call.time_remaining()
    return call.cancelled() or (remaining is not None and remaining <= 0)


def call_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and details a unary Verify failing with `error` would have ended with."""
    code = status_for(error)
    if code is None:  # what gRPC makes of an unexpected exception in a unary handler
        log.error("verify call failed", exc_info=error)
        return grpc.StatusCode.UNKNOWN, f"Unexpected {type(error).__name__}: {error}"
    return code, str(error)


def result_batches(results: list[verifier_pb2.VerifyResult]) -> Iterator[verifier_pb2.VerifyResultBatch]:
    """The results in order, as few messages as keep each under BATCH_BYTES (a larger result goes alone)."""
    batch, size = [], 0
    for result in results:
        result_size = result.ByteSize()
        if batch and size + result_size > BATCH_BYTES:
            yield verifier_pb2.VerifyResultBatch(results=batch)
            batch, size = [], 0
        batch.append(result)
        size += result_size
    if batch:
        yield verifier_pb2.VerifyResultBatch(results=batch)


class VerifierServicer(verifier_pb2_grpc.VerifierServicer):
    def __init__(self, core: VerifierCore):
        self.core = core
        self.drain = Drain(open_work=lambda: len(self.core.sessions))  # a drain finishes open sessions

    @staticmethod
    async def _run(submit, *args):
        """Queues a call for the step scheduler and waits for its pass; returns (result, wall ms)."""
        started = time.perf_counter()
        result = await asyncio.wrap_future(submit(*args))
        return result, (time.perf_counter() - started) * 1e3

    def _update_gauges(self) -> None:
        metrics.ACTIVE_SESSIONS.labels(service="verifier").set(len(self.core.sessions))
        metrics.KV_CACHE_BYTES.labels(service="verifier").set(self.core.sessions.kv_bytes())

    def _release_now(self, session_id: str) -> bool:
        released = self.core.release(session_id)
        self._update_gauges()
        return released

    def _release_after_pending(self, session_id: str) -> None:
        """Releases the session once the compute queued before now is done."""
        self.core.after_pending(lambda: self._release_now(session_id))

    async def Prefill(self, request, context):
        await self.drain.refuse_new(context, "this verifier opens no new sessions")
        try:
            sampling = sampling_from_proto(request.sampling)
            (committed, _), ms = await self._run(self.core.submit_prefill, request.session_id, list(request.token_ids),
                                                      sampling, request.max_new_tokens, request.request_id,
                                                      request.return_hidden)
        except asyncio.CancelledError:
            # The caller went away (cancelled, deadline passed, server draining) while the prefill was queued or
            # running. It never learnt that the session exists, so it cannot be relied on to release it: the
            # prefill may still create it, so release it after the prefill job rather than now.
            log.info("prefill abandoned by the caller; releasing its session",
                     extra={"fields": {"session_id": request.session_id}})
            self._release_after_pending(request.session_id)
            raise
        except Exception as err:  # noqa: BLE001 - abort_for re-raises what it cannot map
            await abort_for(context, err)
        # A prefill that finishes as the deadline passes returns here, but its answer is dropped: the caller
        # sees DEADLINE_EXCEEDED and never learns the session exists, so release it if the call ends past it.
        context.add_done_callback(lambda call: _ended_undelivered(call) and self._release_after_pending(request.session_id))
        self._update_gauges()
        log.debug("session opened", extra={"fields": {"session_id": request.session_id, "committed_len": committed,
                                                      "compute_ms": round(ms, 2)}})
        return verifier_pb2.PrefillResponse(committed_len=committed, timing=common_pb2.Timing(compute_ms=ms))

    def _submit_verify(self, request: verifier_pb2.VerifyRequest) -> Future:
        """Queues one Verify call for the step scheduler: a future of its VerifyOutcome. The unary call and
        the stream both come through here, so they check and convert alike."""
        if request.bild_rollback_threshold < 0:
            raise InvalidRequest("bild_rollback_threshold must be >= 0")
        dists = [dist_from_proto(p) for p in request.draft_probs]
        return self.core.submit_verify(request.session_id, request.committed_len, list(request.draft_tokens), dists,
                                       request.return_top_k, request.bild_rollback_threshold, request.return_hidden)

    @staticmethod
    def _verify_response(outcome, wall_ms: float) -> verifier_pb2.VerifyResponse:
        return verifier_pb2.VerifyResponse(
            accepted=outcome.accepted, next_token=outcome.next_token, committed_len=outcome.committed_len,
            target_top_k=[common_pb2.TopKProbs(indices=i, probs=p) for i, p in outcome.target_top],
            timing=common_pb2.Timing(compute_ms=outcome.compute_ms, queue_ms=max(wall_ms - outcome.compute_ms, 0.0),
                                     batch_rows=outcome.batch_rows, batch_sessions=outcome.batch_sessions),
            lossy=outcome.lossy, hidden=hidden_to_proto(*outcome.hidden) if outcome.hidden else None)

    async def Verify(self, request, context):
        try:
            outcome, wall_ms = await self._run(self._submit_verify, request)
        except Exception as err:  # noqa: BLE001
            await abort_for(context, err)
        self._update_gauges()
        return self._verify_response(outcome, wall_ms)

    async def VerifyStream(self, request_iterator, context):
        """Verify calls of many sessions on one stream: every call is queued as it arrives, and each
        message back carries every result that has finished since the last one. A draining verifier keeps
        answering here (the calls belong to sessions it holds). When the caller goes, calls that have not
        started are dropped; their sessions stay until Release or their TTL, as after a unary call."""
        loop = asyncio.get_running_loop()
        ready: list[verifier_pb2.VerifyResult] = []
        pending: dict[int, Future] = {}
        wake = asyncio.Event()

        def finish(call: verifier_pb2.VerifyCall, started: float, future: Future | None,
                   error: Exception | None = None) -> None:
            pending.pop(call.call_id, None)
            if future is not None and future.cancelled():
                return
            code = grpc.StatusCode.OK
            try:
                if error is not None:
                    raise error
                response = self._verify_response(future.result(), (time.perf_counter() - started) * 1e3)
                result = verifier_pb2.VerifyResult(call_id=call.call_id, response=response)
            except Exception as err:  # noqa: BLE001 - reported to that call only
                code, message = call_status(err)
                result = verifier_pb2.VerifyResult(call_id=call.call_id,
                                                   error=verifier_pb2.CallError(code=code.value[0], message=message))
            ready.append(result)
            wake.set()
            if log.isEnabledFor(logging.DEBUG):  # the access-log line a unary call would have had
                log.debug("verify call finished", extra={"request_id": call.request.request_id, "fields": {
                    "session_id": call.request.session_id, "code": code.name,
                    "ms": round((time.perf_counter() - started) * 1e3, 2)}})

        async def read() -> None:
            try:
                async for batch in request_iterator:
                    for call in batch.calls:
                        started = time.perf_counter()
                        try:
                            future = self._submit_verify(call.request)
                        except Exception as err:  # noqa: BLE001 - refused before it was queued
                            finish(call, started, None, err)
                            continue
                        pending[call.call_id] = future
                        future.add_done_callback(lambda f, call=call, started=started:
                                                 loop.call_soon_threadsafe(finish, call, started, f))
            finally:
                wake.set()

        reader = asyncio.ensure_future(read())
        try:
            while True:
                await wake.wait()
                wake.clear()
                await asyncio.sleep(0)  # results of the same pass already on their way join this message
                if ready:
                    results = ready[:]
                    ready.clear()
                    self._update_gauges()
                    for batch in result_batches(results):
                        yield batch
                if reader.done() and not pending and not ready:
                    reader.result()  # a broken request stream ends the call with its error
                    return
        finally:
            reader.cancel()
            for future in pending.values():
                future.cancel()  # queued, not started: the caller is gone

    async def Release(self, request, context):
        # Free the KV now, and once more after the compute already queued: a Prefill that the caller abandoned
        # may still be waiting for the compute thread and would otherwise re-create the session afterwards.
        released = self._release_now(request.session_id)
        self._release_after_pending(request.session_id)
        log.debug("session released", extra={"fields": {"session_id": request.session_id, "released": released}})
        return verifier_pb2.ReleaseResponse(released=released)

    async def Info(self, request, context):
        loaded = self.core.loaded
        return verifier_pb2.ModelInfo(model_name=loaded.name, vocab_size=loaded.vocab_size, max_context=loaded.max_context,
                                      tokenizer_fingerprint=loaded.fingerprint, model_version=loaded.version,
                                      active_sessions=len(self.core.sessions), max_sessions=self.core.sessions.max_sessions,
                                      eos_token_ids=loaded.eos_token_ids,
                                      pass_costs=[verifier_pb2.PassCost(rows=rows, seconds=seconds)
                                                  for rows, seconds in self.core.pass_costs])


def build_servicer(settings: VerifierSettings, loaded: LoadedModel | None = None) -> VerifierServicer:
    configure_threads(settings.threads)
    loaded = loaded or load_model(settings.model, settings.device, settings.dtype, max_context=settings.max_context)
    return VerifierServicer(VerifierCore(loaded, VerifierOptions.from_settings(settings)))


async def start(settings: VerifierSettings, servicer: VerifierServicer | None = None) -> RunningServer:
    """Serves `servicer` (by default, one for `settings`) until drained."""
    servicer = servicer or build_servicer(settings)
    loaded = servicer.core.loaded
    running = await start_server(settings, lambda s: verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, s),
                                 [SERVICE_NAME], servicer.drain)
    running.stop_when_dead(servicer.core.scheduler.model_thread, [SERVICE_NAME])
    metrics_port = metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    running.background.append(asyncio.ensure_future(expire_sessions_forever(servicer.core.sessions, "verifier")))
    log.info("verifier ready", extra={"fields": {"port": running.port, "metrics_port": metrics_port,
                                                 "model": loaded.name, "vocab": loaded.vocab_size,
                                                 "small_gemm_layers": servicer.core.runner.small_gemm_layers,
                                                 "gguf_block_layers": servicer.core.runner.gguf_block_layers,
                                                 "pass_ms_by_rows": {rows: round(seconds * 1e3, 2) for rows, seconds
                                                                     in servicer.core.pass_costs}}})
    return running


async def serve(settings: VerifierSettings) -> None:
    running = await start(settings)
    await serve_until_signalled(running, settings.grace_period_s)

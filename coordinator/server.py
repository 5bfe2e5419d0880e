"""The public Generation service: validates requests, admits them, runs a Generation, streams text.

Tokenising, chat templating and detokenising run on worker threads, so one large prompt never stalls
the streams of others."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import secrets
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2

from coordinator.admission import AdmissionQueue, QueueFull, QueueTimeout
from coordinator.backends import BackendPool
from coordinator.engine import Generation, GenerationOptions, GenerationRequest, GenerationStats, UpstreamError
from coordinator.policies import POLICIES, SharedMeasurements, make_policy
from coordinator.text import PromptEncoder, TextStream
from coordinator.tracing import TraceSink
from specdec import metrics
from specdec.config import CoordinatorSettings, runtime_settings
from specdec.errors import InvalidRequest
from specdec.logs import client_id_var, request_id_var
from specdec.models.sources import load_tokenizer
from specdec.sampling_params import SamplingParams, validate_sampling
from specdec.traces import TracePublisher
from specdec.v1 import drafter_pb2_grpc, generation_pb2, generation_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from specdec.wire.rpc import (
    REQUEST_ID_HEADER,
    Drain,
    RunningServer,
    channel_credentials,
    clean_request_id,
    message_options,
    serve_until_signalled,
    start_server,
)

log = logging.getLogger(__name__)
SERVICE_NAME = "specdec.v1.Generation"
ANY_TOKENIZER = "any"
RETRY_AFTER_HEADER = "retry-after-ms"  # trailing metadata of a RESOURCE_EXHAUSTED answer

POLICY_NAMES = {generation_pb2.DraftPolicy.Value(f"DRAFT_POLICY_{name.upper()}"): name for name in POLICIES}
MODE_NAMES = {generation_pb2.PIPELINE_MODE_SEQUENTIAL: "sequential", generation_pb2.PIPELINE_MODE_OVERLAPPED: "overlapped",
              generation_pb2.PIPELINE_MODE_TARGET_ONLY: "target_only"}
FINISH = {"length": generation_pb2.FINISH_REASON_LENGTH, "eos": generation_pb2.FINISH_REASON_EOS,
          "stop": generation_pb2.FINISH_REASON_STOP}


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, settings: CoordinatorSettings, tokenizer, verifiers: BackendPool, drafters: BackendPool,
                 target_info: verifier_pb2.ModelInfo, eos_ids: list[int], trace_sink=None,
                 drafter_reads_hidden: bool | None = False):
        self.settings = settings
        self.tokenizer = tokenizer
        self.verifiers, self.drafters = verifiers, drafters
        self.target_info = target_info
        self.eos_ids = frozenset(eos_ids)
        self.trace_sink = trace_sink
        # Whether the drafter reads the target's features (the verifier then sends them); None: not known yet.
        self.drafter_reads_hidden = drafter_reads_hidden
        self._next_drafter_probe = 0.0
        token = settings.resolved_auth_token()
        self.upstream_metadata = [("authorization", f"Bearer {token}")] if token else []
        # Prompts are encoded on one thread and text decoded on another, each with its own tokenizer: a fast
        # tokenizer must not be reconfigured (split_special_tokens) by one thread while another uses it.
        self.encoder = PromptEncoder(copy.deepcopy(tokenizer), target_info.max_context) if tokenizer else None
        self.encode_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt-encode")
        self.decode_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="text-decode")
        self.admission = AdmissionQueue(settings.max_concurrency, settings.max_queued)
        self.in_flight: dict[str, int] = defaultdict(int)  # by client: requests parsing, queued or running
        self.drain = Drain(open_work=lambda: sum(self.in_flight.values()))
        self.measurements = SharedMeasurements(tuple((c.rows, c.seconds) for c in target_info.pass_costs))

    # -- request parsing ----------------------------------------------------------------------------

    def _prompt_ids(self, request) -> list[int]:
        """Runs on the encode thread: a long prompt takes its time there, not on the event loop."""
        kind = request.WhichOneof("input")
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
        elif kind in ("prompt", "messages"):
            if self.encoder is None:
                raise InvalidRequest("this target has no tokenizer: send token_ids")
            if kind == "prompt":
                ids = self.encoder.encode_prompt(request.prompt, request.raw, request.max_new_tokens)
            else:
                ids = self.encoder.encode_messages([(m.role, m.content) for m in request.messages.messages],
                                                   request.raw, request.max_new_tokens)
        else:
            raise InvalidRequest("give one of prompt, messages or token_ids")
        if not ids:
            raise InvalidRequest("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.target_info.vocab_size]
        if bad:
            raise InvalidRequest(f"token ids outside the vocabulary [0, {self.target_info.vocab_size}): {bad[:5]}")
        return ids

    async def _parse(self, request, context) -> GenerationRequest:
        settings = self.settings
        s = request.sampling
        problem = validate_sampling(s.temperature, s.top_p if s.top_p else 1.0, s.top_k)
        if problem:
            raise InvalidRequest(problem)
        if not 0 < request.max_new_tokens <= settings.max_new_tokens_limit:
            raise InvalidRequest(f"max_new_tokens must be in [1, {settings.max_new_tokens_limit}], got {request.max_new_tokens}")
        if request.bild_rollback_threshold < 0 or math.isnan(request.bild_rollback_threshold):
            raise InvalidRequest("bild_rollback_threshold must be >= 0")
        if request.bild_rollback_threshold > 0 and s.temperature != 0:
            raise InvalidRequest("the lossy BiLD rollback rule applies to greedy decoding only")
        if not 0 <= request.draft_length <= settings.max_draft_length:
            raise InvalidRequest(f"draft_length must be in [0, {settings.max_draft_length}]")
        if request.policy_threshold < 0 or math.isnan(request.policy_threshold):
            raise InvalidRequest("policy_threshold must be >= 0")
        if request.request_id and clean_request_id(request.request_id) != request.request_id:
            raise InvalidRequest("request_id must be 1-128 printable ASCII characters")
        if request.policy and request.policy not in POLICY_NAMES:
            raise InvalidRequest(f"unknown policy {request.policy}")
        if request.mode and request.mode not in MODE_NAMES:
            raise InvalidRequest(f"unknown mode {request.mode}")
        vocab = self.target_info.vocab_size
        outside = [t for t in request.stop_token_ids if not 0 <= t < vocab]
        if outside:
            raise InvalidRequest(f"stop_token_ids outside the vocabulary [0, {vocab}): {outside[:5]}")
        prompt_ids = await asyncio.get_running_loop().run_in_executor(self.encode_pool, self._prompt_ids, request)
        if len(prompt_ids) + request.max_new_tokens > self.target_info.max_context:
            raise InvalidRequest(f"prompt of {len(prompt_ids)} tokens plus max_new_tokens {request.max_new_tokens} "
                                 f"exceeds the context length {self.target_info.max_context}")
        seed = s.seed if s.has_seed else secrets.randbits(63)
        mode = MODE_NAMES.get(request.mode, settings.mode)
        policy = make_policy(POLICY_NAMES.get(request.policy, settings.policy),
                             request.draft_length or settings.draft_length, settings.max_draft_length,
                             request.policy_threshold, self.measurements.goodput(mode, s.temperature == 0))
        stop_ids = set(request.stop_token_ids) | (set() if request.ignore_eos else set(self.eos_ids))
        remaining = context.time_remaining()
        return GenerationRequest(
            request_id=request.request_id or request_id_var.get() or uuid.uuid4().hex,
            prompt_ids=prompt_ids, max_new_tokens=request.max_new_tokens,
            sampling=SamplingParams(s.temperature, s.top_p or 1.0, s.top_k, seed), policy=policy,
            mode=mode, stop_token_ids=frozenset(stop_ids),
            stop_strings=tuple(request.stop), bild_rollback_threshold=request.bild_rollback_threshold,
            exclude_from_training=request.exclude_from_training,
            deadline=time.monotonic() + remaining if remaining is not None else None)

    # -- admission ----------------------------------------------------------------------------------

    def _client_key(self, context) -> str:
        """Whom the per-client limit counts: the authenticated client id where the token names one;
        otherwise the caller's own x-client-id (advisory: any holder of the shared token can set it) or address."""
        authenticated = client_id_var.get()
        if authenticated:
            return authenticated
        metadata = dict(context.invocation_metadata() or ())
        return metadata.get("x-client-id") or context.peer().rsplit(":", 1)[0]

    # -- the RPCs -----------------------------------------------------------------------------------

    async def GenerateStream(self, request, context):
        await self.drain.refuse_new(context, "this coordinator takes no new requests")
        client = self._client_key(context)
        if self.in_flight[client] >= self.settings.max_concurrency_per_client:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"at most {self.settings.max_concurrency_per_client} concurrent requests per client")
        self.in_flight[client] += 1  # queued requests count too: one client cannot fill the queue
        try:
            try:
                parsed = await self._parse(request, context)
            except InvalidRequest as err:
                metrics.REQUESTS.labels(mode="", policy="", status="invalid").inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            request_id_var.set(parsed.request_id)
            admitted_at = await self._admit(parsed, context)
            try:
                # aclosing: a cancelled stream runs the generation's clean-up (session releases) now, not at GC
                async with contextlib.aclosing(self._stream(parsed, context)) as chunks:
                    async for chunk in chunks:
                        yield chunk
            finally:
                self.admission.leave(admitted_at)
        finally:
            self.in_flight[client] -= 1
            if not self.in_flight[client]:
                del self.in_flight[client]

    async def _admit(self, parsed: GenerationRequest, context) -> float:
        """Waits for a slot in the admission queue; answers RESOURCE_EXHAUSTED when it is full."""
        timeout = None if parsed.deadline is None else max(parsed.deadline - time.monotonic(), 0.0)
        try:
            return await self.admission.enter(timeout)
        except QueueFull as full:
            metrics.REQUESTS.labels(mode=parsed.mode, policy=parsed.policy.name, status="queue_full").inc()
            retry_ms = round(full.retry_after_s * 1e3)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, parsed.request_id), (RETRY_AFTER_HEADER, str(retry_ms))))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the coordinator is at its concurrency limit and its queue is full; "
                                f"retry in about {retry_ms} ms")
        except QueueTimeout as waited:
            metrics.REQUESTS.labels(mode=parsed.mode, policy=parsed.policy.name, status="deadline_exceeded").inc()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(waited))

    async def _stream(self, parsed: GenerationRequest, context):
        """Runs an admitted request, yielding its chunks."""
        if self.drafter_reads_hidden is None and parsed.mode != "target_only":
            await self._probe_drafter_kind()
        generation = self._generation(parsed)
        text = TextStream(self.tokenizer, parsed.stop_strings)
        status = "ok"
        last_emit = None
        loop = asyncio.get_running_loop()
        try:
            async for new_tokens in generation.stream():
                kept, delta = await loop.run_in_executor(self.decode_pool, text.push, new_tokens)
                if text.stopped:
                    generation.finish_with_stop_string()
                now = time.perf_counter()
                if last_emit is None:
                    metrics.TTFT.observe(generation.stats.ttft_ms / 1e3)
                else:
                    metrics.INTER_TOKEN.observe((now - last_emit) / max(len(kept), 1))
                last_emit = now
                if kept:
                    yield generation_pb2.GenerateChunk(token_ids=kept, text=delta, request_id=parsed.request_id)
            yield generation_pb2.GenerateChunk(done=True, finish_reason=FINISH[generation.finish_reason],
                                               stats=_stats_proto(generation.stats), request_id=parsed.request_id)
        except UpstreamError as err:
            status = err.code.name.lower()
            await context.abort(err.code, str(err))
        except (asyncio.CancelledError, GeneratorExit):
            # A cancel that lands while this generator waits at a `yield` closes it (GeneratorExit), not CancelledError.
            status = "cancelled"
            raise
        finally:
            metrics.REQUESTS.labels(mode=parsed.mode, policy=parsed.policy.name, status=status).inc()
            metrics.GENERATED_TOKENS.inc(len(text.token_ids))
            if generation.stats.tokens_per_s:
                metrics.TOKENS_PER_SECOND.observe(generation.stats.tokens_per_s)
            log.info("request finished", extra={"fields": {
                "status": status, "new_tokens": generation.stats.new_tokens, "rounds": generation.stats.rounds,
                "acceptance_rate": round(generation.stats.acceptance_rate, 3), "total_ms": round(generation.stats.total_ms, 1),
                "mode": parsed.mode, "policy": parsed.policy.name, "fallback_steps": generation.stats.fallback_steps}})

    async def Generate(self, request, context):
        token_ids, pieces, final = [], [], None
        async for chunk in self.GenerateStream(request, context):
            token_ids.extend(chunk.token_ids)
            pieces.append(chunk.text)
            if chunk.done:
                final = chunk
        return generation_pb2.GenerateResponse(request_id=final.request_id, token_ids=token_ids, text="".join(pieces),
                                               finish_reason=final.finish_reason, stats=final.stats)

    def _generation(self, parsed: GenerationRequest) -> Generation:
        options = GenerationOptions.from_settings(self.settings, self.target_info.model_version,
                                                  traced=self.trace_sink is not None,
                                                  target_hidden=bool(self.drafter_reads_hidden))
        return Generation(parsed, self.verifiers, self.drafters,
                          self.upstream_metadata + [(REQUEST_ID_HEADER, parsed.request_id)], options, self.trace_sink,
                          self.measurements.draft_wait(parsed.sampling.greedy) if self.settings.adaptive_draft_wait
                          else None,
                          self.measurements.post_verify(parsed.sampling.greedy) if self.settings.post_verify == "auto"
                          else self.settings.post_verify == "on")

    async def _probe_drafter_kind(self) -> None:
        """Asks a drafter that was down at start-up what it reads, at most once per drafter_retry_s."""
        now = time.monotonic()
        if now < self._next_drafter_probe:
            return
        self._next_drafter_probe = now + self.settings.drafter_retry_s
        info = await _backend_info(self.drafters, self.upstream_metadata, 0.0, required=False, rpc_timeout_s=0.5)
        if info is not None:
            self.drafter_reads_hidden = info.reads_target_hidden


def _stats_proto(stats: GenerationStats) -> generation_pb2.GenerationStats:
    return generation_pb2.GenerationStats(
        prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens, rounds=stats.rounds,
        drafted_tokens=stats.drafted_tokens, accepted_tokens=stats.accepted_tokens,
        acceptance_rate=stats.acceptance_rate, mean_accepted_length=stats.mean_accepted_length,
        ttft_ms=stats.ttft_ms, total_ms=stats.total_ms, tokens_per_s=stats.tokens_per_s,
        fallback_steps=stats.fallback_steps, draft_ms=stats.draft_ms, verify_ms=stats.verify_ms,
        hidden_draft_ms=stats.hidden_draft_ms, policy=stats.policy, mode=stats.mode, lossy=stats.lossy,
        drafter_version=stats.drafter_version, stale_draft_tokens=stats.stale_draft_tokens,
        speculation_off_rounds=stats.speculation_off_rounds, early_verify_rounds=stats.early_verify_rounds,
        lookup_rounds=stats.lookup_rounds, lookup_drafted_tokens=stats.lookup_drafted_tokens,
        lookup_accepted_tokens=stats.lookup_accepted_tokens, mean_block_length=stats.mean_block_length,
        feature_catch_up_rounds=stats.feature_catch_up_rounds)


async def _backend_info(pool: BackendPool, metadata, wait_s: float, required: bool,
                        rpc_timeout_s: float = 2.0) -> verifier_pb2.ModelInfo | None:
    """Info from the first backend that answers, retrying for up to wait_s while services start."""
    deadline = time.monotonic() + wait_s
    while True:
        for backend in pool.backends:
            try:
                return await backend.stub.Info(verifier_pb2.InfoRequest(), timeout=rpc_timeout_s, metadata=metadata)
            except grpc.aio.AioRpcError as err:
                last = f"{backend.addr}: {err.code().name}"
        if time.monotonic() > deadline:
            if required:
                raise RuntimeError(f"no backend answered Info within {wait_s}s ({last})")
            log.warning("no backend answered Info; will retry per request", extra={"fields": {"last": last}})
            return None
        await asyncio.sleep(0.5)


async def build_servicer(settings: CoordinatorSettings, trace_sink=None) -> GenerationServicer:
    credentials = channel_credentials(settings)
    options = message_options(settings)
    verifiers = BackendPool.connect(settings.verifier_addrs, verifier_pb2_grpc.VerifierStub, credentials, options,
                                    wait_s=settings.verifier_wait_s)
    drafters = BackendPool.connect(settings.drafter_addrs, drafter_pb2_grpc.DrafterStub, credentials, options)
    token = settings.resolved_auth_token()
    settings.resolved_auth_clients()  # a bad clients file fails now, not after waiting for the backends
    metadata = [("authorization", f"Bearer {token}")] if token else []
    if settings.verify_stream:
        verifiers.multiplex_verify(metadata)
    wait_s = runtime_settings().backend_wait_s
    target_info = await _backend_info(verifiers, metadata, wait_s, required=True)
    drafter_info = None
    if drafters.backends:
        drafter_info = await _backend_info(drafters, metadata, min(wait_s, 10.0), required=False)
        if drafter_info is not None and drafter_info.tokenizer_fingerprint not in (ANY_TOKENIZER, target_info.tokenizer_fingerprint):
            raise RuntimeError(
                f"drafter {drafter_info.model_name!r} does not share the tokenizer of target {target_info.model_name!r}; "
                "speculative decoding needs identical token ids")
        if drafter_info is not None:
            metrics.set_drafter_version(drafter_info.model_version)
    tokenizer = load_tokenizer(settings.target) if settings.target else None
    if tokenizer is not None and len(tokenizer) > target_info.vocab_size:
        raise RuntimeError(f"coordinator tokenizer ({settings.target}) has {len(tokenizer)} tokens, "
                           f"the target model only {target_info.vocab_size}")
    return GenerationServicer(settings, tokenizer, verifiers, drafters, target_info, list(target_info.eos_token_ids),
                              trace_sink, drafter_reads_hidden=(drafter_info.reads_target_hidden if drafter_info
                                                                else None if drafters.backends else False))


def trace_sink_for(settings: CoordinatorSettings) -> TraceSink | None:
    """The OSD trace publisher, or None when no Redis is configured."""
    if not settings.redis_url:
        return None
    publisher = TracePublisher(settings.redis_url, stream=settings.trace_stream, maxlen=settings.trace_maxlen,
                               sample_rate=settings.trace_sample_rate)
    return TraceSink(publisher)


async def start(settings: CoordinatorSettings, trace_sink=None) -> RunningServer:
    trace_sink = trace_sink or trace_sink_for(settings)
    servicer = await build_servicer(settings, trace_sink)
    running = await start_server(settings, lambda s: generation_pb2_grpc.add_GenerationServicer_to_server(servicer, s),
                                 [SERVICE_NAME], servicer.drain)
    running.background += servicer.verifiers.watchers + servicer.drafters.watchers  # health watches end with it
    running.background.append(asyncio.ensure_future(_serve_while_a_verifier_serves(servicer.verifiers, running.health)))
    if isinstance(trace_sink, TraceSink):
        running.on_stop(trace_sink.close)
    metrics_port = metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    log.info("coordinator ready", extra={"fields": {"port": running.port, "metrics_port": metrics_port,
                                                    "verifiers": settings.verifier_addrs, "drafters": settings.drafter_addrs}})
    return running


async def _serve_while_a_verifier_serves(verifiers: BackendPool, health) -> None:
    """The coordinator's overall health is SERVING only while some verifier's is, so a balancer routes no request
    to a coordinator that has none yet (at start-up) or none left. The service's own name stays SERVING while the
    process runs: the liveness probe asks for it, so a coordinator is not restarted for its verifiers' sake."""
    last = None
    while True:
        changed = verifiers.next_change()
        status = health_pb2.HealthCheckResponse.SERVING if verifiers.any_serving() else health_pb2.HealthCheckResponse.NOT_SERVING
        if status != last:
            await health.set("", status)
            last = status
        await changed.wait()


async def serve(settings: CoordinatorSettings) -> None:
    running = await start(settings)
    await serve_until_signalled(running, settings.grace_period_s)

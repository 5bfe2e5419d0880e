"""gRPC servicer for the drafter: converts messages and delegates to a Drafter."""

from __future__ import annotations

import asyncio
import logging
import time

from drafter_svc.batcher import DraftBatcher
from drafter_svc.drafters import Drafter, FeatureDrafter, ModelDrafter, NgramDrafter, PromptLookup, StepItem
from drafter_svc.hot_swap import CheckpointWatcher
from specdec import metrics
from specdec.config import DrafterSettings
from specdec.errors import InvalidRequest
from specdec.models.checkpoints import CheckpointStore
from specdec.models.conversion import materialise
from specdec.models.eagle import is_feature_drafter
from specdec.models.loader import check_pair, configure_threads, load_model, tokenizer_fingerprint
from specdec.models.sources import load_tokenizer, resolve_source
from specdec.sampling_params import sampling_from_proto
from specdec.stopping import StopRule, should_stop
from specdec.v1 import drafter_pb2, drafter_pb2_grpc, verifier_pb2
from specdec.wire.rpc import Drain, RunningServer, abort_for, expire_sessions_forever, serve_until_signalled, start_server
from specdec.wire.tensor_messages import dist_to_proto, hidden_from_proto

log = logging.getLogger(__name__)
SERVICE_NAME = "specdec.v1.Drafter"
MAX_DRAFT_TOKENS = 128
ANY_TOKENIZER = "any"  # model-free drafters work with every tokenizer


class DrafterServicer(drafter_pb2_grpc.DrafterServicer):
    def __init__(self, drafter: Drafter, support: int, name: str, fingerprint: str, max_context: int):
        self.drafter = drafter
        self.support = support
        self.name, self.fingerprint, self.max_context = name, fingerprint, max_context
        self.batcher = DraftBatcher(drafter)
        self._locks: dict[str, asyncio.Lock] = {}
        self.drain = Drain(open_work=lambda: len(self.drafter.sessions))  # a drain keeps open sessions drafting

    async def _run(self, fn, *args):
        """fn(*args) on the model thread, in order with the other calls."""
        return await asyncio.wrap_future(self.batcher.call(fn, *args))

    async def _step(self, session, sampling):
        """The session's next draft, computed in one pass with every other stream's next draft."""
        if len(session.ids) >= self.max_context:
            return None
        return await asyncio.wrap_future(self.batcher.step(StepItem(session, sampling, self.support)))

    async def Draft(self, request, context):
        # One draft stream per session at a time: a new one waits for a cancelled one's current step.
        lock = self._locks.setdefault(request.session_id, asyncio.Lock())
        async with lock:
            try:
                if not 0 < request.max_tokens <= MAX_DRAFT_TOKENS:
                    raise InvalidRequest(f"max_tokens must be in [1, {MAX_DRAFT_TOKENS}], got {request.max_tokens}")
                if not request.session_id:
                    raise InvalidRequest("session_id is required")
                rule = StopRule(request.stop_rule)
                sampling = sampling_from_proto(request.sampling)
                hidden = None
                if self.drafter.reads_target_hidden and request.HasField("hidden"):
                    hidden = hidden_from_proto(request.hidden, self.drafter.hidden_size)
                started = time.perf_counter()
                session, result = await asyncio.wrap_future(self.batcher.sync_and_step(
                    lambda: self.drafter.sync(request.session_id, request.base_len, list(request.tokens),
                                              request.request_id, hidden, request.committed_len),
                    sampling, self.support, self.max_context))
            except ValueError as err:  # unknown stop rule enum value
                await abort_for(context, err if isinstance(err, InvalidRequest) else InvalidRequest(str(err)))
            except Exception as err:  # noqa: BLE001
                await abort_for(context, err)
            steps = []
            version = self.drafter.version
            while result is not None:
                step, dist = result
                steps.append(step)
                yield drafter_pb2.DraftToken(token=step.token, probs=dist_to_proto(dist), confidence=step.confidence,
                                             entropy=step.entropy, accept_prob=step.accept_prob, drafter_version=version)
                if should_stop(rule, request.stop_threshold, steps) or len(steps) >= request.max_tokens:
                    break
                result = await self._step(session, sampling)
            metrics.DRAFT_LATENCY.observe(time.perf_counter() - started)
            self._update_gauges()

    async def Rollback(self, request, context):
        try:
            session = self.drafter.sessions.get(request.session_id)
            if not 0 <= request.length <= len(session.ids):
                raise InvalidRequest(f"rollback length {request.length} outside [0, {len(session.ids)}]")
            await self._run(session.crop, request.length)
        except Exception as err:  # noqa: BLE001
            await abort_for(context, err)
        return drafter_pb2.RollbackResponse(length=len(session.ids))

    async def Release(self, request, context):
        released = self.drafter.release(request.session_id)
        # A sync queued on the compute thread could re-create the session: release again behind it.
        self.batcher.call(self.drafter.release, request.session_id)
        self._locks.pop(request.session_id, None)
        self._update_gauges()
        return verifier_pb2.ReleaseResponse(released=released)

    async def Info(self, request, context):
        return verifier_pb2.ModelInfo(model_name=self.name, vocab_size=self.drafter.vocab_size,
                                      max_context=self.max_context, tokenizer_fingerprint=self.fingerprint,
                                      model_version=self.drafter.version, active_sessions=len(self.drafter.sessions),
                                      max_sessions=self.drafter.sessions.max_sessions,
                                      reads_target_hidden=self.drafter.reads_target_hidden)

    def _update_gauges(self) -> None:
        metrics.ACTIVE_SESSIONS.labels(service="drafter").set(len(self.drafter.sessions))
        metrics.KV_CACHE_BYTES.labels(service="drafter").set(self.drafter.sessions.kv_bytes())


def build_drafter(settings: DrafterSettings) -> DrafterServicer:
    """Loads the configured drafter and refuses one whose tokenizer differs from the target's."""
    if settings.model == "ngram":
        tokenizer = load_tokenizer(settings.target) if settings.target else None
        vocab = len(tokenizer) if tokenizer is not None else 2**31 - 1
        drafter = NgramDrafter(vocab, settings.ngram_max, settings.ngram_min, settings.max_sessions, settings.session_ttl_s)
        return DrafterServicer(drafter, 0, "ngram", ANY_TOKENIZER, 2**31 - 1)
    loaded = load_model(settings.model, settings.device, settings.dtype, tokenizer_from=settings.target or None,
                        max_context=settings.max_context)
    if settings.target:
        from transformers import AutoConfig

        target_dir = materialise(resolve_source(settings.target), weights=False)  # the config is all it reads
        target_vocab = AutoConfig.from_pretrained(target_dir).vocab_size
        check_pair(tokenizer_fingerprint(load_tokenizer(settings.target), target_vocab),
                   loaded.fingerprint, settings.target, settings.model)
    lookup = PromptLookup(settings.ngram_max, settings.ngram_min) if settings.prompt_lookup else None
    kind = FeatureDrafter if is_feature_drafter(loaded.model) else ModelDrafter
    drafter = kind(loaded, settings.max_sessions, settings.session_ttl_s, small_gemm=settings.small_gemm,
                           lookup=lookup, quantise_to="" if settings.draft_weights == "fp32" else settings.draft_weights)
    return DrafterServicer(drafter, settings.draft_support, loaded.name, loaded.fingerprint, loaded.max_context)


def checkpoint_watcher(settings: DrafterSettings, drafter: Drafter) -> CheckpointWatcher | None:
    """Follows settings.checkpoint_dir when the drafter is a model (n-gram drafters have no weights)."""
    if not settings.checkpoint_dir:
        return None
    if not isinstance(drafter, ModelDrafter):
        log.warning("checkpoint_dir ignored: the %s drafter has no weights to swap", drafter.version)
        return None
    redis_client = None
    if settings.redis_url:
        from specdec import redisutil

        # The events wait blocks up to swap_poll_s; the socket must outlast it.
        redis_client = redisutil.connect(settings.redis_url, socket_timeout=settings.swap_poll_s + 2.0)
    return CheckpointWatcher(drafter, CheckpointStore(settings.checkpoint_dir), settings.swap_poll_s, redis_client)


async def start(settings: DrafterSettings) -> RunningServer:
    configure_threads(settings.threads)
    servicer = build_drafter(settings)
    metrics.set_drafter_version(servicer.drafter.version)
    running = await start_server(settings, lambda s: drafter_pb2_grpc.add_DrafterServicer_to_server(servicer, s),
                                 [SERVICE_NAME], servicer.drain)
    running.stop_when_dead(servicer.batcher.model_thread, [SERVICE_NAME])
    metrics_port = metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    running.background.append(asyncio.ensure_future(expire_sessions_forever(servicer.drafter.sessions, "drafter")))
    watcher = checkpoint_watcher(settings, servicer.drafter)
    if watcher is not None:
        initial = watcher.wanted()
        if initial is not None:  # serve the promoted version from the first request on
            await asyncio.to_thread(watcher.swap_to, initial)
        running.background.append(asyncio.ensure_future(watcher.run()))
    log.info("drafter ready", extra={"fields": {"port": running.port, "metrics_port": metrics_port,
                                                "drafter": servicer.name, "version": servicer.drafter.version}})
    return running


async def serve(settings: DrafterSettings) -> None:
    running = await start(settings)
    await serve_until_signalled(running, settings.grace_period_s)

"""What every specd gRPC service shares: auth, request ids, health, reflection,
TLS, message limits, malformed-request handling and a SIGTERM drain that finishes open work."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec import metrics
from specdec.config import CommonSettings
from specdec.errors import status_for
from specdec.logs import client_id_var, request_id_var
from specdec.model_thread import ModelThread

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_LEN = 128
UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/",)  # probes carry no token
DRAIN_POLL_S = 0.05
FINAL_STOP_S = 1.0  # once open work is done: time for last responses to leave (health watches never end)
MALFORMED_DETAILS = "the request is not a valid protobuf message (corrupt bytes, or a string that is not UTF-8)"


class BearerTokens:
    """The `Authorization` headers a service accepts: its shared token and one per client of
    auth_clients_file, compared in constant time. Every service, gRPC or HTTP, checks callers with it."""

    def __init__(self, token: str, clients: dict[str, str] | None = None):
        # "Bearer <token>" -> the client id it authenticates ('' for the shared service token)
        self._accepted = {f"Bearer {secret}".encode(): client for secret, client in (clients or {}).items()}
        if token:
            self._accepted[f"Bearer {token}".encode()] = ""

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> "BearerTokens":
        return cls(settings.resolved_auth_token(), settings.resolved_auth_clients())

    @property
    def required(self) -> bool:
        return bool(self._accepted)

    def authenticate(self, authorization: bytes) -> str | None:
        """The client id the header authenticates ('' for the shared token), or None if it is not accepted."""
        matched = None
        for header, client_id in self._accepted.items():  # compares every entry: no early exit to time
            if hmac.compare_digest(authorization, header) and matched is None:
                matched = client_id
        return matched


class _RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token (constant-time), binds the request id and the authenticated client id
    for logs, echoes the request id to the caller in the trailing metadata and writes a debug
    access-log line per RPC."""

    def __init__(self, tokens: BearerTokens):
        self._tokens = tokens

    async def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        request_id = clean_request_id(metadata.get(REQUEST_ID_HEADER, "")) or uuid.uuid4().hex
        request_id_var.set(request_id)
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        client_id = ""
        if self._tokens.required and not method.startswith(UNAUTHENTICATED_METHODS):
            matched = self._tokens.authenticate(metadata.get("authorization", "").encode())
            if matched is None:
                log.debug("unauthenticated call refused", extra={"fields": {"method": method}})
                return _deny_handler(handler, request_id)
            client_id = matched
        if handler is None:
            return None
        return _observed_handler(handler, method, request_id, client_id)


def clean_request_id(value: str) -> str:
    """A caller's request id, kept only if it is a short printable-ASCII token (it goes into logs and headers)."""
    value = value.strip()
    if not value or len(value) > MAX_REQUEST_ID_LEN or not all(" " < ch < "\x7f" for ch in value):
        return ""
    return value


_HANDLER_KINDS = {  # (request_streaming, response_streaming) -> (attribute, factory)
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _status_name(context) -> str:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc without code()
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN"


def _observed_handler(handler: grpc.RpcMethodHandler, method: str, request_id: str,
                      client_id: str = "") -> grpc.RpcMethodHandler:
    """Wraps an async handler: the request id and client id are bound for it (the handler runs in another
    context than the interceptor), the request id is echoed in the trailing metadata
    (the id the handler settled on, if it chose another one), and a debug line records how it ended."""
    attribute, factory = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, attribute)
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler  # a synchronous handler runs in grpc's thread pool; leave it alone
    deserializer = handler.request_deserializer
    if not handler.request_streaming:
        deserializer = _tolerant(deserializer)

    def begin(context) -> float:
        request_id_var.set(request_id)
        client_id_var.set(client_id)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        return time.perf_counter()

    def succeeded(context) -> None:
        settled = clean_request_id(request_id_var.get())
        if settled and settled != request_id:
            context.set_trailing_metadata(((REQUEST_ID_HEADER, settled),))

    def finished(started: float, code: str) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rpc finished", extra={"fields": {
                "method": method, "code": code, "ms": round((time.perf_counter() - started) * 1e3, 2)}})

    if inspect.isasyncgenfunction(behavior):  # streams its responses by yielding
        async def observed(request, context):
            started, code = begin(context), "OK"
            if request is MALFORMED:
                finished(started, "INVALID_ARGUMENT")
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_DETAILS)
            responses = behavior(request, context)
            try:
                async for message in responses:
                    yield message
                succeeded(context)
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            except BaseException:
                code = _status_name(context)
                raise
            finally:
                await responses.aclose()  # run the handler's own clean-up now, not when it is collected
                finished(started, code)
    else:  # a coroutine: returns its response, or streams with context.write
        async def observed(request, context):
            started, code = begin(context), "OK"
            if request is MALFORMED:
                finished(started, "INVALID_ARGUMENT")
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_DETAILS)
            try:
                response = await behavior(request, context)
                succeeded(context)
                return response
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except BaseException:
                code = _status_name(context)
                raise
            finally:
                finished(started, code)

    return factory(observed, request_deserializer=deserializer, response_serializer=handler.response_serializer)


MALFORMED = object()  # what _tolerant hands the handler in place of a request that did not parse


def _tolerant(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    """The request deserializer, returning MALFORMED instead of raising: grpc would answer a DecodeError
    with UNKNOWN, naming the exception class, and log its traceback."""
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except DecodeError:
            return MALFORMED
    return deserialize


def _deny_handler(handler: grpc.RpcMethodHandler | None, request_id: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as the real one that only answers UNAUTHENTICATED."""
    trailer = ((REQUEST_ID_HEADER, request_id),)

    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token", trailer)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token", trailer)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:  # unknown method: deny without revealing whether it exists
        return grpc.unary_unary_rpc_method_handler(deny)
    _attribute, factory = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    deserializer = handler.request_deserializer if handler.request_streaming else _tolerant(handler.request_deserializer)
    return factory(deny_stream if handler.response_streaming else deny,
                   request_deserializer=deserializer, response_serializer=handler.response_serializer)


# Servers accept the coordinators' keepalive pings (coordinator/backends.py KEEPALIVE_OPTIONS), which find a
# verifier that vanished without closing its connections under a long-lived stream.
SERVER_KEEPALIVE_OPTIONS = [("grpc.keepalive_permit_without_calls", 1),
                            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000)]


def message_options(settings: CommonSettings) -> list[tuple[str, int]]:
    limit = settings.max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def _server_credentials(settings: CommonSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    key, cert = Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes()
    ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(settings: CommonSettings) -> grpc.ChannelCredentials | None:
    """Credentials for calls to upstream services (None: plaintext)."""
    if not settings.client_tls_ca:
        return None
    ca = Path(settings.client_tls_ca).read_bytes()
    if settings.client_tls_cert:
        return grpc.ssl_channel_credentials(ca, Path(settings.client_tls_key).read_bytes(),
                                            Path(settings.client_tls_cert).read_bytes())
    return grpc.ssl_channel_credentials(ca)


async def abort_for(context: grpc.aio.ServicerContext, error: BaseException):
    """Turns a core error into its gRPC status; anything else propagates as INTERNAL."""
    code = status_for(error)
    if code is None:
        raise error
    await context.abort(code, str(error))


def _nothing_open() -> int:
    return 0


@dataclass
class Drain:
    """A service's shutdown as its servicer sees it: once `begun`, it refuses new work (new sessions,
    new streams) but keeps serving the work it holds, which `open_work` counts, until that is done."""

    open_work: Callable[[], int] = _nothing_open
    begun: bool = False

    async def refuse_new(self, context: grpc.aio.ServicerContext, refusal: str) -> None:
        """While draining, answers UNAVAILABLE (`refusal` says what is refused), which sends callers elsewhere."""
        if self.begun:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{refusal}: it is draining (shutting down)")


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    work: Drain = field(default_factory=Drain)
    background: list[asyncio.Task] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)
    failure: str = ""  # why the server stopped by itself ('' while it serves, or when it was told to stop)

    def stop_when_dead(self, thread: ModelThread, service_names: list[str]) -> None:
        """Once `thread` (the service's model thread) dies: health NOT_SERVING, so probes fail and coordinators
        route elsewhere; then the server stops and `serve_until_signalled` raises, so the process exits
        non-zero and its supervisor (specd up, compose, Kubernetes) restarts it."""
        loop = asyncio.get_running_loop()

        async def stop() -> None:
            for name in ["", *service_names]:
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            self.failure = str(thread.died)
            await self.server.stop(FINAL_STOP_S)

        thread.on_death(lambda: loop.call_soon_threadsafe(lambda: self.background.append(asyncio.ensure_future(stop()))))

    def on_stop(self, close: Callable[[], None]) -> None:
        """Runs `close` after the last RPC has finished (e.g. flushing the trace publisher)."""
        self.closers.append(close)

    async def drain(self, grace_s: float) -> None:
        """NOT_SERVING first so balancers stop routing, and new work is refused; the server keeps answering
        (health checks, and the calls that open work still makes) until that work is done or grace_s has
        passed; then it stops."""
        self.work.begun = True
        await self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + grace_s
        while self.work.open_work() and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        left = self.work.open_work()
        if left:
            log.warning("grace period over; stopping with work still open", extra={"fields": {"open": left}})
        await self.server.stop(min(max(deadline - time.monotonic(), 0.0), FINAL_STOP_S))
        for task in self.background:
            task.cancel()
        for close in self.closers:
            await asyncio.to_thread(close)


async def start_server(settings: CommonSettings, register: Callable[[grpc.aio.Server], None],
                       service_names: list[str], work: Drain | None = None) -> RunningServer:
    """Builds, binds and starts a server with our interceptors, health and reflection; `work` is what
    its drain refuses and waits for (nothing, if not given)."""
    server = grpc.aio.server(interceptors=[_RequestContextInterceptor(BearerTokens.from_settings(settings))],
                             options=message_options(settings) + SERVER_KEEPALIVE_OPTIONS)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{settings.host}:{settings.port}"
    credentials = _server_credentials(settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    return RunningServer(server, port, health_servicer, work or Drain())


async def serve_until_signalled(running: RunningServer, grace_s: float) -> None:
    """Runs until SIGTERM/SIGINT, then drains for up to grace_s."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.ensure_future(running.server.wait_for_termination())
    await asyncio.wait([serving, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if running.failure:
        await running.drain(0.0)
        raise RuntimeError(running.failure)
    log.info("draining", extra={"fields": {"grace_s": grace_s}})
    await running.drain(grace_s)
    log.info("stopped")


async def expire_sessions_forever(store, service: str, period_s: float = 5.0) -> None:
    while True:
        await asyncio.sleep(period_s)
        for session_id in store.expire():
            log.info("session expired", extra={"fields": {"session_id": session_id}})
        metrics.ACTIVE_SESSIONS.labels(service=service).set(len(store))

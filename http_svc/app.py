"""The OpenAI-compatible HTTP API: each request becomes one GenerateStream call on a coordinator.

The routes only check the caller, convert (http_svc/openai_api.py) and relay; the coordinators do the
work. A caller that disconnects cancels its gRPC call, so the coordinator releases the request's
verifier and drafter sessions at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import AsyncIterator, Awaitable, TypeVar

import grpc
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from http_svc.coordinators import CoordinatorPool
from http_svc.errors import ApiError
from http_svc.openai_api import (
    CHAT,
    COMPLETION,
    DONE,
    FINISH_REASONS,
    ApiCall,
    chunk_body,
    first_chat_chunk,
    parse_call,
    response_body,
    speculation_stats,
    sse,
    usage_chunk,
)
from specdec import metrics
from specdec.config import HttpSettings
from specdec.v1 import generation_pb2
from specdec.wire.rpc import REQUEST_ID_HEADER, BearerTokens, clean_request_id

log = logging.getLogger(__name__)
T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for a request the client gave up on; only the metrics see it


class ClientGone(Exception):
    """The caller closed the connection before its answer was ready."""


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (with `work` cancelled) if the caller disconnects first."""
    working, watching = asyncio.ensure_future(work), asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not working.done():
            working.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await working
    if working.cancelled():
        raise ClientGone
    return working.result()


class Upstream:
    """One request's GenerateStream call, on the first coordinator that takes it."""

    def __init__(self, pool: CoordinatorPool, request: generation_pb2.GenerateRequest, metadata: list, timeout_s: float):
        self.pool, self.request, self.metadata, self.timeout_s = pool, request, metadata, timeout_s
        self.call = None

    async def first(self) -> generation_pb2.GenerateChunk:
        """The first chunk; a coordinator that is unavailable before answering anything is skipped."""
        unavailable = None
        for stub in self.pool.in_turn():
            self.call = stub.GenerateStream(self.request, timeout=self.timeout_s, metadata=self.metadata)
            try:
                return await self.next()
            except ApiError as err:
                if err.code != grpc.StatusCode.UNAVAILABLE.name.lower():
                    raise
                unavailable = err
        raise unavailable

    async def next(self) -> generation_pb2.GenerateChunk:
        try:
            chunk = await self.call.read()
        except grpc.aio.AioRpcError as err:
            raise ApiError.from_rpc(err) from None
        if chunk is grpc.aio.EOF:
            raise ApiError(502, "the coordinator ended the stream without its final chunk", "server_error")
        return chunk

    async def collect(self) -> tuple[str, list[int], generation_pb2.GenerateChunk]:
        """The whole generation: its text, its token ids and the final chunk (with the stats)."""
        chunk = await self.first()
        pieces, tokens = [], []
        while True:
            pieces.append(chunk.text)
            tokens.extend(chunk.token_ids)
            if chunk.done:
                return "".join(pieces), tokens, chunk
            chunk = await self.next()

    def cancel(self) -> None:
        if self.call is not None:
            self.call.cancel()


class FrontDoor:
    """The FastAPI app of one HTTP tier, with its coordinator channels (opened in the app's lifespan, on the
    event loop that serves it)."""

    def __init__(self, settings: HttpSettings):
        self.settings = settings
        self.tokens = BearerTokens.from_settings(settings)
        self.body_limit = int(settings.max_body_mb * 1024 * 1024)
        self.pool: CoordinatorPool | None = None
        self.started = int(time.time())
        self._logged_fields: set[str] = set()
        self.app = FastAPI(title="specd", lifespan=self._lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        self.app.add_exception_handler(StarletteHTTPException, self._http_exception)
        self.app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        self.app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        self.app.add_api_route("/v1/models", self.models, methods=["GET"])
        self.app.add_api_route("/v1/models/{model:path}", self.model, methods=["GET"])
        self.app.add_api_route("/health", self.health, methods=["GET"])
        self.app.add_api_route("/metrics", self.metrics, methods=["GET"])

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app):
        self.pool = CoordinatorPool(self.settings)
        try:
            yield
        finally:
            await self.pool.close()

    # -- routes -------------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, COMPLETION)

    async def models(self, request: Request) -> Response:
        try:
            self._authenticate(request)
        except ApiError as err:
            return self._error("/v1/models", err)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request, model: str) -> Response:
        try:
            self._authenticate(request)
            self._check_model(model)
        except ApiError as err:
            return self._error("/v1/models", err)
        return JSONResponse(self._model_card())

    async def health(self) -> Response:
        if await self.pool.any_serving():
            return JSONResponse({"status": "ok"})
        return JSONResponse(ApiError(503, "no coordinator is serving", "service_unavailable_error").body(), 503)

    async def metrics(self) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # -- generation ---------------------------------------------------------------------------------

    async def _generate(self, request: Request, kind: str) -> Response:
        endpoint = request.url.path
        try:
            authorization = self._authenticate(request)
            body = await self._body(request)
            request_id = clean_request_id(request.headers.get(REQUEST_ID_HEADER, "")) or uuid.uuid4().hex
            call = parse_call(kind, body, self.settings.default_max_tokens, request_id)
            self._log_unknown(call.unknown_fields)
            self._check_model(call.model)
        except ApiError as err:
            return self._error(endpoint, err)
        metadata = [(REQUEST_ID_HEADER, request_id),
                    ("x-client-id", call.client_id or (request.client.host if request.client else ""))]
        if authorization:
            metadata.append(("authorization", authorization))
        upstream = Upstream(self.pool, call.request, metadata, self.settings.request_timeout_s)
        finish = _Finish(upstream, endpoint)
        try:
            if call.stream:
                first = await _unless_disconnected(request, upstream.first())
            else:
                text, tokens, final = await _unless_disconnected(request, upstream.collect())
        except ApiError as err:
            finish.close(err.status)
            return _error_response(err)
        except ClientGone:
            finish.close(CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        headers = {REQUEST_ID_HEADER: request_id}
        if not call.stream:
            finish.close(200)
            return JSONResponse(response_body(call, text, tokens, final), headers=headers)
        # The background task runs however the stream ends, even if the caller left before its first chunk.
        return StreamingResponse(self._events(call, upstream, first, finish), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"},
                                 background=BackgroundTask(finish.close))

    async def _events(self, call: ApiCall, upstream: Upstream, chunk: generation_pb2.GenerateChunk,
                      finish: "_Finish") -> AsyncIterator[bytes]:
        tokens = 0
        try:
            if call.kind == CHAT:
                yield sse(first_chat_chunk(call))
            while True:
                tokens += len(chunk.token_ids)
                if chunk.text or (call.return_token_ids and chunk.token_ids):
                    yield sse(chunk_body(call, chunk.text, token_ids=chunk.token_ids))
                if chunk.done:
                    break
                chunk = await upstream.next()
            yield sse(chunk_body(call, None, FINISH_REASONS.get(chunk.finish_reason, "stop"),
                                 speculation=speculation_stats(chunk.stats)))
            if call.include_usage:
                yield sse(usage_chunk(call, tokens, chunk))
            finish.status = 200
        except ApiError as err:  # the status line is long gone: the error travels as an event
            finish.status = err.status
            yield sse(err.body())
        finally:
            finish.close()
        yield sse(DONE)

    # -- helpers ------------------------------------------------------------------------------------

    def _authenticate(self, request: Request) -> str:
        """The caller's Authorization header (passed on to the coordinator), or 401."""
        authorization = request.headers.get("authorization", "")
        if self.tokens.required and self.tokens.authenticate(authorization.encode()) is None:
            raise ApiError(401, "missing or invalid bearer token", "authentication_error", code="invalid_api_key")
        return authorization

    async def _body(self, request: Request) -> bytes:
        """The request body, or 413 once it passes max_body_mb (by its Content-Length, or as it arrives)."""
        too_large = ApiError(413, f"the request body exceeds {self.settings.max_body_mb:g} MB",
                             code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.body_limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.body_limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_model(self, model: str) -> None:
        if model != self.settings.model:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.settings.model!r}",
                           param="model", code="model_not_found")

    def _model_card(self) -> dict:
        return {"id": self.settings.model, "object": "model", "created": self.started, "owned_by": "specd",
                "speculation": {"drafter": self.settings.drafter or None}}

    def _log_unknown(self, fields: list[str]) -> None:
        new = [name for name in fields if name not in self._logged_fields]
        if new:
            self._logged_fields.update(new)
            log.warning("ignoring request fields OpenAI does not define", extra={"fields": {"fields": new}})

    def _error(self, endpoint: str, err: ApiError) -> Response:
        metrics.HTTP_REQUESTS.labels(endpoint=endpoint, status=str(err.status)).inc()
        return _error_response(err)

    async def _http_exception(self, request: Request, exc: StarletteHTTPException) -> Response:
        """FastAPI's own answers (unknown path, wrong method) in OpenAI's error shape."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind).body(), exc.status_code)


def _error_response(err: ApiError) -> Response:
    return JSONResponse(err.body(), err.status, headers=err.headers())


class _Finish:
    """Counts a generation open from its start until it ends, however it ends, exactly once."""

    def __init__(self, upstream: Upstream, endpoint: str):
        self.upstream, self.endpoint = upstream, endpoint
        self.status = CLIENT_CLOSED  # until the answer is complete
        self.closed = False
        metrics.HTTP_OPEN_REQUESTS.inc()

    def close(self, status: int | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.upstream.cancel()  # a no-op once the call has ended; frees the sessions if it has not
        metrics.HTTP_OPEN_REQUESTS.dec()
        if status is not None:
            self.status = status
        metrics.HTTP_REQUESTS.labels(endpoint=self.endpoint, status=str(self.status)).inc()

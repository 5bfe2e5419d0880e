"""The production surface of the three services, against real gRPC servers on loopback:
health and reflection, Prometheus metrics, bearer-token auth, cancellation and deadlines
(KV sessions freed on every hop), request ids, message-size and per-client limits,
start-up config validation and loopback-only defaults."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from conftest import InProcessStack
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from specd.stack import check_health
from specdec.config import SETTINGS_BY_ROLE, load_settings
from specdec.logs import JsonFormatter
from specdec.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc, generation_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from specdec.wire.client import SpecdClient, build_request

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-" + uuid.uuid4().hex[:8]
AUTH = [("authorization", f"Bearer {TOKEN}")]
SERVICES = {"coordinator": "specdec.v1.Generation", "verifier0": "specdec.v1.Verifier", "drafter": "specdec.v1.Drafter"}
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
GREEDY = common_pb2.SamplingParams(temperature=0.0)
PROMPT = [5, 6, 7, 8, 9]


# -- helpers -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(predicate, timeout: float, interval: float = 0.02):
    """Polls until predicate() is truthy; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def _channel(running: InProcessStack, name: str) -> grpc.Channel:
    channels = running.__dict__.setdefault("_test_channels", {})
    if name not in channels:
        channels[name] = grpc.insecure_channel(f"127.0.0.1:{running.port(name)}")
    return channels[name]


def _sessions(running: InProcessStack, metadata=()) -> tuple[int, int]:
    """Open KV sessions on (verifier, drafter), from their Info RPCs."""
    info = verifier_pb2.InfoRequest()
    verifier = verifier_pb2_grpc.VerifierStub(_channel(running, "verifier0")).Info(info, metadata=metadata, timeout=5)
    drafter = drafter_pb2_grpc.DrafterStub(_channel(running, "drafter")).Info(info, metadata=metadata, timeout=5)
    return verifier.active_sessions, drafter.active_sessions


def _rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)
    return info.value


def _scrape(port: int) -> dict:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class _LogCapture(logging.Handler):
    """Formats records with the services' JSON formatter as they are emitted (the request id is a context var)."""

    LOGGERS = ("specdec.wire.rpc", "coordinator.server", "verifier_svc.server", "drafter_svc.server")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.json = JsonFormatter("test")
        self.entries: list[dict] = []

    def emit(self, record):
        self.entries.append(json.loads(self.json.format(record)))

    def __enter__(self):
        self.saved = {}
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self.saved[name] = logger.level
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        for name, level in self.saved.items():
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(level)


# -- stacks ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tiny_dirs):
    """Auth on everywhere, metrics endpoints, a 1 MiB message limit and 2 streams per client.
    The drafter has the target's weights, so greedy drafts are accepted and the counters move."""
    dirs = tiny_dirs["llama"]
    ports = {"coordinator": _free_port(), "drafter": _free_port()}
    running = InProcessStack(dirs["target"], dirs["target"], auth_token=TOKEN,
                             coordinator_overrides={"metrics_port": ports["coordinator"], "max_message_mb": 1,
                                                    "max_concurrency_per_client": 2},
                             drafter_overrides={"metrics_port": ports["drafter"]})
    running.metrics_ports = ports
    yield running
    running.close()


@pytest.fixture
def plain_stack(tiny_dirs):
    """A throw-away stack without auth, for tests that may leave sessions behind when they fail. (Its drafter
    has the same version as `stack`'s: the drafter-version gauge is one per process.)"""
    dirs = tiny_dirs["llama"]
    running = InProcessStack(dirs["target"], dirs["target"])
    yield running
    running.close()


# -- 1. health and reflection ------------------------------------------------------------------------

def _check_health_and_reflection(running: InProcessStack, token: str) -> None:
    for name, service in SERVICES.items():
        addr = f"127.0.0.1:{running.port(name)}"
        channel = _channel(running, name)
        health = health_pb2_grpc.HealthStub(channel)
        for target in ("", service):  # probes carry no token, even when auth is on
            response = health.Check(health_pb2.HealthCheckRequest(service=target), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, (name, target)
            assert check_health(addr, target), (name, target)  # what `specd health` and the manifests run
        assert _rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"),
                                               timeout=5)).code() == grpc.StatusCode.NOT_FOUND

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)]
        metadata = [("authorization", f"Bearer {token}")] if token else []
        listed, files = list(reflection.ServerReflectionInfo(iter(requests), metadata=metadata, timeout=5))
        assert {s.name for s in listed.list_services_response.service} == {service, HEALTH, REFLECTION}, name
        descriptors = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                       for raw in files.file_descriptor_response.file_descriptor_proto]
        package, short = service.rsplit(".", 1)
        assert any(fd.package == package and short in [s.name for s in fd.service] for fd in descriptors), name
        if token:  # reflection describes the API: it needs the token like every other method
            for bad in ([], [("authorization", "Bearer wrong")]):
                error = _rpc_error(lambda: reflection.ServerReflectionInfo(iter(requests[:1]), metadata=bad, timeout=5))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, name


def test_health_and_reflection_with_auth(stack):
    _check_health_and_reflection(stack, TOKEN)


def test_health_and_reflection_without_auth(plain_stack):
    _check_health_and_reflection(plain_stack, "")


# -- 2. metrics --------------------------------------------------------------------------------------

def test_metrics_endpoint_reports_a_real_generation(stack):
    port = stack.metrics_ports["coordinator"]
    labels = dict(mode="sequential", policy="heuristic", status="ok")
    before = _scrape(port)
    client = SpecdClient(stack.address, token=TOKEN)
    received, final, during = [], None, None

    def sessions_open():
        s = _scrape(port)
        open_ = (_value(s, "specd_active_sessions", service="verifier") == 1
                 and _value(s, "specd_active_sessions", service="drafter") == 1)
        return s if open_ else None

    for chunk in client.stream(token_ids=PROMPT, max_new_tokens=450, policy="heuristic", mode="sequential"):
        received.extend(chunk.token_ids)
        if during is None and received:  # mid-stream: both backends hold one session with KV
            during = _wait_until(sessions_open, timeout=2)
        if chunk.done:
            final = chunk
    client.close()
    assert during, "active-session gauges did not show the open sessions mid-stream"
    assert _value(during, "specd_kv_cache_bytes", service="verifier") > 0
    assert final is not None and len(received) == 450
    stats = final.stats
    assert stats.drafted_tokens > 0 and stats.accepted_tokens > 0

    # The request counter moves in the handler's clean-up, just after the last chunk is sent.
    def finished():
        s = _scrape(port)
        done = (_value(s, "specd_requests_total", **labels) - _value(before, "specd_requests_total", **labels) == 1
                and _value(s, "specd_active_sessions", service="verifier") == 0
                and _value(s, "specd_active_sessions", service="drafter") == 0)
        return s if done else None

    after = _wait_until(finished, timeout=2)
    assert after, "request counter or session gauges did not settle after the generation"

    def delta(name, **lab):
        return _value(after, name, **lab) - _value(before, name, **lab)

    assert delta("specd_generated_tokens_total") == 450
    assert delta("specd_draft_tokens_total", policy="heuristic") == stats.drafted_tokens
    assert delta("specd_accepted_tokens_total", policy="heuristic") == stats.accepted_tokens
    assert 1 <= delta("specd_accepted_length_count", policy="heuristic") <= stats.rounds
    assert delta("specd_accepted_length_sum", policy="heuristic") == stats.accepted_tokens
    assert delta("specd_position_accepted_total", position="0") >= 1
    assert delta("specd_ttft_seconds_count") == 1 and delta("specd_ttft_seconds_sum") > 0
    assert delta("specd_inter_token_seconds_count") >= 1
    assert delta("specd_tokens_per_second_count") == 1
    assert delta("specd_verify_latency_seconds_count") == stats.rounds
    assert delta("specd_draft_latency_seconds_count") >= 1 and delta("specd_draft_latency_seconds_sum") > 0
    versions = {dict(labels)["version"]: value for (name, labels), value in after.items()
                if name == "specd_drafter_version_info"}
    assert stats.drafter_version and versions == {stats.drafter_version: 1}
    # The drafter serves its own endpoint (one registry per process: in production each service has its own).
    drafter = _scrape(stack.metrics_ports["drafter"])
    assert _value(drafter, "specd_draft_latency_seconds_count") >= delta("specd_draft_latency_seconds_count")
    assert _value(drafter, "specd_drafter_version_info", version=stats.drafter_version) == 1


# -- 3. auth -----------------------------------------------------------------------------------------

def test_bearer_token_is_required_on_every_hop(stack):
    stub = generation_pb2_grpc.GenerationStub(_channel(stack, "coordinator"))
    request = build_request(token_ids=PROMPT, max_new_tokens=4)
    refused = [[], [("authorization", "Bearer wrong")], [("authorization", TOKEN)],
               [("authorization", f"Bearer {TOKEN}x")], [("authorization", f"Basic {TOKEN}")]]
    for metadata in refused:
        for call in (lambda: stub.Generate(request, metadata=metadata, timeout=5),
                     lambda: stub.GenerateStream(request, metadata=metadata, timeout=5)):
            error = _rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert "bearer token" in error.details()
    # The backends refuse callers without the token too (the coordinator forwards its own).
    verifier = verifier_pb2_grpc.VerifierStub(_channel(stack, "verifier0"))
    drafter = drafter_pb2_grpc.DrafterStub(_channel(stack, "drafter"))
    for call in (lambda: verifier.Info(verifier_pb2.InfoRequest(), timeout=5),
                 lambda: verifier.Prefill(verifier_pb2.PrefillRequest(session_id="x", token_ids=[1], sampling=GREEDY,
                                                                      max_new_tokens=1), timeout=5),
                 lambda: drafter.Draft(drafter_pb2.DraftRequest(session_id="x", tokens=[1, 2], max_tokens=2),
                                       timeout=5)):
        assert _rpc_error(call).code() == grpc.StatusCode.UNAUTHENTICATED
    assert _sessions(stack, AUTH) == (0, 0)  # the refused Prefill/Draft opened nothing
    # With `authorization: Bearer <token>` (what SpecdClient sends) it works, unary and streaming.
    with SpecdClient(stack.address, token=TOKEN) as client:
        assert len(client.generate(token_ids=PROMPT, max_new_tokens=4).token_ids) == 4
        assert sum(len(c.token_ids) for c in client.stream(token_ids=PROMPT, max_new_tokens=4)) == 4
    assert verifier.Info(verifier_pb2.InfoRequest(), metadata=AUTH, timeout=5).vocab_size == 256


# -- 4. cancellation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sequential", "overlapped"])
def test_cancelling_a_stream_frees_kv_on_drafter_and_verifier(stack, mode):
    before = _scrape(stack.metrics_ports["coordinator"])
    client = SpecdClient(stack.address, token=TOKEN)
    call = client.stream(token_ids=PROMPT, max_new_tokens=450, mode=mode, policy="static")
    received = 0
    for chunk in call:
        received += len(chunk.token_ids)
        if received >= 10:
            break
    assert _sessions(stack, AUTH) == (1, 1)  # mid-stream: one session on each backend
    call.cancel()
    cancelled_at = time.monotonic()
    assert _wait_until(lambda: _sessions(stack, AUTH) == (0, 0), timeout=1.0), \
        f"sessions still open 1s after the cancel: {_sessions(stack, AUTH)}"
    assert time.monotonic() - cancelled_at < 1.0
    labels = dict(mode=mode, policy="static", status="cancelled")
    assert _wait_until(lambda: _value(_scrape(stack.metrics_ports["coordinator"]), "specd_requests_total", **labels)
                       - _value(before, "specd_requests_total", **labels) == 1, timeout=1.0)
    client.close()


class _SlowResponses:
    """A TCP proxy that delays every byte coming back from the upstream server: network latency on the
    verifier's responses, so a request can be cancelled after the verifier has opened its session but before
    the coordinator has heard back."""

    def __init__(self, upstream_port: int, delay_s: float):
        self.upstream_port, self.delay_s = upstream_port, delay_s

    async def start(self) -> int:
        import asyncio

        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _connection(self, client_reader, client_writer):
        import asyncio

        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(self._pipe(client_reader, upstream_writer, 0.0),
                             self._pipe(upstream_reader, client_writer, self.delay_s), return_exceptions=True)

    @staticmethod
    async def _pipe(reader, writer, delay_s: float):
        import asyncio

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def forward():
            while True:
                due, data = await queue.get()
                if data is None:
                    break
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()

        forwarding = asyncio.ensure_future(forward())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + delay_s, data))
        finally:
            queue.put_nowait((0.0, None))
            await forwarding
            writer.close()

    async def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_giving_up_during_prefill_frees_the_verifier_session(plain_stack, tiny_dirs, how):
    from coordinator.server import start as start_coordinator

    proxy = _SlowResponses(plain_stack.port("verifier0"), delay_s=0.6)
    proxy_port = plain_stack.run(proxy.start())
    try:
        settings = load_settings("coordinator", {"target": tiny_dirs["llama"]["target"],
                                                 "verifier_addrs": f"127.0.0.1:{proxy_port}",
                                                 "drafter_addrs": f"127.0.0.1:{plain_stack.port('drafter')}"},
                                 environ={})
        plain_stack.servers["slow-coordinator"] = plain_stack.run(start_coordinator(settings))
        stub = generation_pb2_grpc.GenerationStub(_channel(plain_stack, "slow-coordinator"))
        request = build_request(token_ids=PROMPT, max_new_tokens=8)
        if how == "cancel":
            call = stub.GenerateStream(request, timeout=30)
            # The verifier has opened the session and finished the prefill (a few ms for this prompt); its
            # answer is still on the wire, so the coordinator has not heard back when the caller gives up.
            assert _wait_until(lambda: _sessions(plain_stack) == (1, 0), timeout=0.45)
            time.sleep(0.05)
            call.cancel()
        else:
            assert _rpc_error(lambda: stub.Generate(request, timeout=0.2)).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _wait_until(lambda: _sessions(plain_stack) == (0, 0), timeout=3.0), _sessions(plain_stack)
    finally:
        plain_stack.run(proxy.close())


# -- 5. deadlines ------------------------------------------------------------------------------------

def test_deadline_exceeded_frees_sessions_and_service_keeps_serving(stack):
    stub = generation_pb2_grpc.GenerationStub(_channel(stack, "coordinator"))
    for call in (lambda r: stub.GenerateStream(r, metadata=AUTH, timeout=0.3),
                 lambda r: stub.Generate(r, metadata=AUTH, timeout=0.3)):
        request = build_request(token_ids=PROMPT, max_new_tokens=450, mode="overlapped")
        started = time.monotonic()
        error = _rpc_error(lambda: call(request))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.0
        assert _wait_until(lambda: _sessions(stack, AUTH) == (0, 0), timeout=1.0), _sessions(stack, AUTH)
    with SpecdClient(stack.address, token=TOKEN) as client:
        result = client.generate(token_ids=PROMPT, max_new_tokens=8)
    assert len(result.token_ids) == 8 and result.finish_reason == "FINISH_REASON_LENGTH"
    # A client's deadline is not the drafter's fault: the drafter was not marked down for it.
    assert result.stats["fallback_steps"] == 0 and result.stats["drafted_tokens"] > 0


def test_verifier_releases_a_prefill_abandoned_at_its_deadline(plain_stack):
    """A caller whose Prefill hits its deadline never learns the session id was opened; the verifier must not
    keep the KV until the TTL."""
    verifier = verifier_pb2_grpc.VerifierStub(_channel(plain_stack, "verifier0"))
    expired = 0
    for i in range(20):
        prompt = [i + 1] + [(7 * j) % 250 + 1 for j in range(499)]  # its own first block: no prefix to share
        try:
            verifier.Prefill(verifier_pb2.PrefillRequest(session_id=f"late-{i}", token_ids=prompt, sampling=GREEDY,
                                                         max_new_tokens=1), timeout=0.001 + i * 0.0001)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            expired += 1
        else:
            verifier.Release(verifier_pb2.ReleaseRequest(session_id=f"late-{i}"))
    assert expired >= 10
    assert _wait_until(lambda: _sessions(plain_stack)[0] == 0, timeout=1.0), _sessions(plain_stack)
    # Still serving.
    verifier.Prefill(verifier_pb2.PrefillRequest(session_id="ok", token_ids=[1, 2, 3], sampling=GREEDY,
                                                 max_new_tokens=4), timeout=5)
    assert verifier.Release(verifier_pb2.ReleaseRequest(session_id="ok"), timeout=5).released
    assert _wait_until(lambda: _sessions(plain_stack)[0] == 0, timeout=1.0)


# -- 6. request ids ----------------------------------------------------------------------------------

def test_request_id_reaches_every_hop_and_comes_back(stack):
    stub = generation_pb2_grpc.GenerationStub(_channel(stack, "coordinator"))
    request_id = "req-" + uuid.uuid4().hex
    request = build_request(token_ids=PROMPT, max_new_tokens=12, mode="sequential")
    request.request_id = ""  # only in the x-request-id header
    with _LogCapture() as logs:
        call = stub.GenerateStream(request, metadata=AUTH + [("x-request-id", request_id)], timeout=30)
        chunks = list(call)
        assert chunks and all(chunk.request_id == request_id for chunk in chunks)
        assert dict(call.trailing_metadata())["x-request-id"] == request_id
        wanted = {"/specdec.v1.Generation/GenerateStream", "/specdec.v1.Verifier/Prefill",
                  "/specdec.v1.Verifier/Release", "/specdec.v1.Drafter/Draft",
                  "/specdec.v1.Drafter/Release"}  # Verify calls travel on the coordinator's VerifyStream

        def seen():
            return {e.get("method") for e in logs.entries if e["msg"] == "rpc finished"
                    and e.get("request_id") == request_id}

        assert _wait_until(lambda: wanted <= seen(), timeout=2), wanted - seen()
    messages = {(e["logger"], e["msg"]) for e in logs.entries if e.get("request_id") == request_id}
    assert {("coordinator.server", "request finished"), ("verifier_svc.server", "session opened"),
            ("verifier_svc.server", "verify call finished"), ("verifier_svc.server", "session released")} <= messages

    # Unary call: the id comes back in the response and the trailers.
    response, call = stub.Generate.with_call(request, metadata=AUTH + [("x-request-id", request_id)], timeout=30)
    assert response.request_id == request_id and dict(call.trailing_metadata())["x-request-id"] == request_id
    # No id sent: one is made up, and the response body and trailers agree on it.
    response, call = stub.Generate.with_call(request, metadata=AUTH, timeout=30)
    assert len(response.request_id) == 32 and dict(call.trailing_metadata())["x-request-id"] == response.request_id
    # An unusable header value (too long for logs) is replaced, not echoed.
    response, call = stub.Generate.with_call(request, metadata=AUTH + [("x-request-id", "x" * 300)], timeout=30)
    assert dict(call.trailing_metadata())["x-request-id"] == response.request_id != "x" * 300
    # Errors carry it too.
    bad = build_request(token_ids=PROMPT, max_new_tokens=0)
    error = _rpc_error(lambda: stub.Generate(bad, metadata=AUTH + [("x-request-id", request_id)], timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(error.trailing_metadata())["x-request-id"] == request_id
    # Each backend echoes the id too, also on errors (here: no token).
    for name, method in (("verifier0", "/specdec.v1.Verifier/Info"), ("drafter", "/specdec.v1.Drafter/Info")):
        info = _channel(stack, name).unary_unary(method, request_serializer=verifier_pb2.InfoRequest.SerializeToString,
                                                 response_deserializer=verifier_pb2.ModelInfo.FromString)
        _, call = info.with_call(verifier_pb2.InfoRequest(), metadata=AUTH + [("x-request-id", request_id)], timeout=5)
        assert dict(call.trailing_metadata())["x-request-id"] == request_id
        error = _rpc_error(lambda: info(verifier_pb2.InfoRequest(), metadata=[("x-request-id", request_id)], timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(error.trailing_metadata())["x-request-id"] == request_id


def test_unusable_request_id_in_the_body_is_rejected_quickly(plain_stack):
    stub = generation_pb2_grpc.GenerationStub(_channel(plain_stack, "coordinator"))
    request = build_request(token_ids=PROMPT, max_new_tokens=4, request_id="naïve\nid")
    error = _rpc_error(lambda: stub.Generate(request, timeout=2))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- 7. message size and per-client concurrency --------------------------------------------------------

def test_oversized_messages_are_refused(stack):
    stub = generation_pb2_grpc.GenerationStub(_channel(stack, "coordinator"))
    limit = 1024 * 1024  # max_message_mb=1
    huge_text = build_request(max_new_tokens=4)
    huge_text.prompt = "a" * (limit + 10)
    huge_ids = build_request(token_ids=[200] * (limit // 2 + 10), max_new_tokens=4)
    for request in (huge_text, huge_ids):
        assert request.ByteSize() > limit
        error = _rpc_error(lambda: stub.Generate(request, metadata=AUTH, timeout=10))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    # Under the byte limit but beyond the model's context: a clear INVALID_ARGUMENT, no upstream work.
    long_ids = build_request(token_ids=[1] * 100_000, max_new_tokens=4)
    assert long_ids.ByteSize() < limit
    error = _rpc_error(lambda: stub.Generate(long_ids, metadata=AUTH, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "context length" in error.details()
    assert _sessions(stack, AUTH) == (0, 0)
    with SpecdClient(stack.address, token=TOKEN) as client:
        assert len(client.generate(token_ids=PROMPT, max_new_tokens=4).token_ids) == 4


def test_per_client_concurrency_limit(stack):
    stub = generation_pb2_grpc.GenerationStub(_channel(stack, "coordinator"))

    def open_stream(client_id=None, tokens=400):
        metadata = AUTH + ([("x-client-id", client_id)] if client_id else [])
        return stub.GenerateStream(build_request(token_ids=PROMPT, max_new_tokens=tokens, mode="sequential"),
                                   metadata=metadata, timeout=60)

    admitted = [open_stream() for _ in range(2)]  # max_concurrency_per_client=2
    firsts = [next(call) for call in admitted]    # both are running
    assert all(first.token_ids for first in firsts)
    error = _rpc_error(lambda: open_stream(tokens=4))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per client" in error.details()
    # Another client is not affected.
    other = list(open_stream("another-backend", tokens=4))
    assert other[-1].done and sum(len(c.token_ids) for c in other) == 4
    # The admitted streams run to completion.
    for call, first in zip(admitted, firsts):
        rest = list(call)
        assert rest[-1].done and len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 400
    # Their slots are given back.
    def admitted_again():
        try:
            return list(open_stream(tokens=4))[-1].done
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False

    assert _wait_until(admitted_again, timeout=2)


def test_client_tokens_name_the_client_that_limits_count(tiny_dirs, tmp_path):
    """With auth_clients_file each caller's token is its identity: a spoofed x-client-id does not
    escape its per-client limit, and the coordinator's logs name the client."""
    clients = tmp_path / "clients"
    clients.write_text("# client_id token\nalice alice-" + uuid.uuid4().hex + "\n\nbob bob-" + uuid.uuid4().hex + "\n")
    tokens = dict(line.split() for line in clients.read_text().splitlines() if line and not line.startswith("#"))
    dirs = tiny_dirs["llama"]
    running = InProcessStack(dirs["target"], dirs["target"], coordinator_overrides={
        "auth_clients_file": str(clients), "max_concurrency_per_client": 1})
    stub = generation_pb2_grpc.GenerationStub(_channel(running, "coordinator"))

    def open_stream(client: str | None, tokens_wanted: int, extra=()):
        metadata = ([("authorization", f"Bearer {tokens[client]}")] if client else []) + list(extra)
        return stub.GenerateStream(build_request(token_ids=PROMPT, max_new_tokens=tokens_wanted, mode="sequential"),
                                   metadata=metadata, timeout=60)

    try:
        assert _rpc_error(lambda: open_stream(None, 4)).code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = [("authorization", "Bearer not-a-client-token")]
        assert _rpc_error(lambda: stub.GenerateStream(build_request(token_ids=PROMPT, max_new_tokens=4),
                                                      metadata=wrong, timeout=10)).code() \
            == grpc.StatusCode.UNAUTHENTICATED
        with _LogCapture() as logs:
            held = open_stream("alice", 400)
            assert next(held).token_ids  # alice's one slot is taken
            spoofed = _rpc_error(lambda: open_stream("alice", 4, [("x-client-id", "bob")]))
            assert spoofed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            bobs = list(open_stream("bob", 4))
            assert bobs[-1].done and sum(len(c.token_ids) for c in bobs) == 4
            held.cancel()
        finished = [e for e in logs.entries if e["msg"] == "request finished"]
        assert {e.get("client_id") for e in finished} >= {"bob"}
    finally:
        running.close()


# -- 8. config validation at start-up ------------------------------------------------------------------

def test_invalid_config_fails_fast_at_startup(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("coordinator:\n  verifier_addrs: ['127.0.0.1:1']\n  draft_lenght: 3\n")
    unknown_common = tmp_path / "common.yaml"
    unknown_common.write_text("bogus_setting: 1\ncoordinator:\n  verifier_addrs: ['127.0.0.1:1']\n")
    bad_clients = tmp_path / "clients"
    bad_clients.write_text("alice token-a\nbob\n")
    addr = ["--verifier-addrs", "127.0.0.1:1"]
    cases = {  # name: (argv, extra env, exit code, words the message must contain)
        "env bad int": (addr, {"SPECD_DRAFT_LENGTH": "banana"}, 2, ["invalid coordinator settings", "draft_length"]),
        "env bad enum": (addr, {"SPECD_MODE": "warp"}, 2, ["invalid coordinator settings", "mode"]),
        "yaml unknown key": (["--config", str(typo)], {}, 2, ["draft_lenght", "Extra inputs are not permitted"]),
        "yaml unknown common key": ([], {"SPECD_CONFIG": str(unknown_common)}, 2, ["bogus_setting"]),
        "flag out of range": (addr + ["--port", "70000"], {}, 2, ["port"]),
        "bad address": (["--verifier-addrs", "nocolon"], {}, 2, ["not host:port"]),
        "no verifier": ([], {}, 2, ["verifier_addrs needs at least one"]),
        "unreadable token file": (addr, {"SPECD_AUTH_TOKEN_FILE": str(tmp_path / "missing")}, 1, ["auth_token_file"]),
        "malformed clients file": (addr, {"SPECD_AUTH_CLIENTS_FILE": str(bad_clients)}, 1,
                                   ["auth_clients_file line 2", "client_id token"]),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECD_")}
    started = time.monotonic()
    processes = {
        name: subprocess.Popen([sys.executable, "-m", "specd.cli", "serve", "coordinator", *argv], cwd=ROOT,
                               env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (argv, extra, _, _) in cases.items()}
    try:
        for name, process in processes.items():
            _, stderr = process.communicate(timeout=60)
            _, _, code, words = cases[name]
            assert process.returncode == code, (name, stderr)
            for word in words:
                assert word in stderr, (name, stderr)
            assert "Traceback" not in stderr, (name, stderr)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    assert time.monotonic() - started < 45


# -- 9. loopback by default --------------------------------------------------------------------------

def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            address = sock.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_default_bind_address_is_loopback(stack):
    for role, schema in SETTINGS_BY_ROLE.items():
        # The roles that need an upstream address to start get one; the bind addresses are what is checked.
        overrides = {"coordinator": {"verifier_addrs": "127.0.0.1:1"}, "http": {"coordinator_addrs": "127.0.0.1:1"}}
        overrides = overrides.get(role, {})
        settings = load_settings(role, overrides, environ={})
        assert settings.host == "127.0.0.1" and settings.metrics_host == "127.0.0.1", role
        for name, field in schema.model_fields.items():
            if name.endswith("host"):
                assert field.default == "127.0.0.1", (role, name)
    # The running services (bound with the defaults) are not reachable on another interface.
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback interface to probe")
    for port in (stack.port("coordinator"), stack.port("verifier0"), stack.port("drafter"),
                 stack.metrics_ports["coordinator"]):
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=1).close()

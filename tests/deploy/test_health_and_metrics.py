"""Health, reflection and Prometheus metrics of the three services on loopback: probes answer without a token,
reflection needs one when auth is on, and /metrics reports what a real generation did."""

from __future__ import annotations

import grpc
from conftest import InProcessStack
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from production_stacks import (
    HEALTH,
    PROMPT,
    REFLECTION,
    SERVICES,
    TOKEN,
    channel_to,
    rpc_error,
    sample_value,
    scrape,
    wait_until,
)
from production_stacks import plain_stack, stack  # noqa: F401 - fixtures

from specd.stack import check_health
from specdec.wire.client import SpecdClient


def _check_health_and_reflection(running: InProcessStack, token: str) -> None:
    for name, service in SERVICES.items():
        addr = f"127.0.0.1:{running.port(name)}"
        channel = channel_to(running, name)
        health = health_pb2_grpc.HealthStub(channel)
        for target in ("", service):  # probes carry no token, even when auth is on
            response = health.Check(health_pb2.HealthCheckRequest(service=target), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, (name, target)
            assert check_health(addr, target), (name, target)  # what `specd health` and the manifests run
        assert rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"),
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
                error = rpc_error(lambda: reflection.ServerReflectionInfo(iter(requests[:1]), metadata=bad, timeout=5))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, name


def test_health_and_reflection_with_auth(stack):
    _check_health_and_reflection(stack, TOKEN)


def test_health_and_reflection_without_auth(plain_stack):
    _check_health_and_reflection(plain_stack, "")


def test_metrics_endpoint_reports_a_real_generation(stack):
    port = stack.metrics_ports["coordinator"]
    labels = dict(mode="sequential", policy="heuristic", status="ok")
    before = scrape(port)
    client = SpecdClient(stack.address, token=TOKEN)
    received, final, during = [], None, None

    def sessions_open():
        s = scrape(port)
        open_ = (sample_value(s, "specd_active_sessions", service="verifier") == 1
                 and sample_value(s, "specd_active_sessions", service="drafter") == 1)
        return s if open_ else None

    for chunk in client.stream(token_ids=PROMPT, max_new_tokens=450, policy="heuristic", mode="sequential"):
        received.extend(chunk.token_ids)
        if during is None and received:  # mid-stream: both backends hold one session with KV
            during = wait_until(sessions_open, timeout=2)
        if chunk.done:
            final = chunk
    client.close()
    assert during, "active-session gauges did not show the open sessions mid-stream"
    assert sample_value(during, "specd_kv_cache_bytes", service="verifier") > 0
    assert final is not None and len(received) == 450
    stats = final.stats
    assert stats.drafted_tokens > 0 and stats.accepted_tokens > 0

    # The request counter moves in the handler's clean-up, just after the last chunk is sent.
    def finished():
        s = scrape(port)
        done = (sample_value(s, "specd_requests_total", **labels) - sample_value(before, "specd_requests_total", **labels) == 1
                and sample_value(s, "specd_active_sessions", service="verifier") == 0
                and sample_value(s, "specd_active_sessions", service="drafter") == 0)
        return s if done else None

    after = wait_until(finished, timeout=2)
    assert after, "request counter or session gauges did not settle after the generation"

    def delta(name, **lab):
        return sample_value(after, name, **lab) - sample_value(before, name, **lab)

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
    drafter = scrape(stack.metrics_ports["drafter"])
    assert sample_value(drafter, "specd_draft_latency_seconds_count") >= delta("specd_draft_latency_seconds_count")
    assert sample_value(drafter, "specd_drafter_version_info", version=stats.drafter_version) == 1

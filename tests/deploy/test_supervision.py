"""A service that dies is seen and recovered: `specd up`'s supervisor (LocalStack) restarts it on its port,
the coordinator re-admits it through its health watch, and new requests wait for it instead of failing;
a model thread that dies turns its service NOT_SERVING and ends the process."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
from conftest import hf_greedy
from faults_support import log_tail, run_streams
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specd.stack import LocalStack
from specdec.client import SpecdClient
from specdec.config import load_settings
from specdec.sampling_params import SamplingParams, sampling_to_proto
from specdec.v1 import verifier_pb2, verifier_pb2_grpc
from verifier_svc.server import build_servicer, start

PROMPTS = [[5, 17, 99, 3, 42, 8], [200, 1, 1, 7, 33, 19, 64, 2, 250], [11, 12, 13], [90, 180, 45, 135, 7]]
NEW_TOKENS = 96
FAULT_AFTER = 16
RECOVERY_BOUND_S = 120.0  # the new request's deadline: recovery must fit in it


def test_a_verifier_killed_by_sigsegv_is_restarted_and_serves_new_requests(tiny_dirs, tmp_path, record_property):
    dirs = tiny_dirs["llama"]
    expected = [hf_greedy(dirs["target"], prompt, NEW_TOKENS) for prompt in PROMPTS]
    stack = LocalStack(dirs["target"], dirs["close"], threads_verifier=1, threads_drafter=1, log_dir=str(tmp_path))
    crashed = {}

    def segfault_the_verifier() -> None:
        crashed["process"] = stack.processes["verifier"]
        crashed["at"] = time.monotonic()
        os.kill(crashed["process"].pid, signal.SIGSEGV)  # as a fault in the kernel library would

    try:
        address = stack.start(timeout_s=120)
        outcomes = run_streams(address, PROMPTS, NEW_TOKENS, fault=segfault_the_verifier, fault_after=FAULT_AFTER)
        assert crashed["process"].wait(30) == -signal.SIGSEGV
        with SpecdClient(address, timeout_s=RECOVERY_BOUND_S) as client:
            served = client.generate(token_ids=PROMPTS[0], max_new_tokens=NEW_TOKENS).token_ids
        recovery_s = time.monotonic() - crashed["at"]
    finally:
        stack.stop()
    verifier_log = log_tail(tmp_path / "verifier.log", chars=1_000_000)
    record_property("recovery_s", round(recovery_s, 2))
    print(f"verifier SIGSEGV to the first new request served: {recovery_s:.2f} s")

    # In flight at the kill, with no other replica: each stream failed with a clear UNAVAILABLE or completed.
    for outcome, want in zip(outcomes, expected):
        assert (outcome.error.startswith("UNAVAILABLE") if outcome.error else outcome.token_ids == want), outcome
    assert any(outcome.error for outcome in outcomes)  # the kill did land mid-stream
    assert "Fatal Python error: Segmentation fault" in verifier_log  # faulthandler's report, with the stacks
    assert "verifier died (signal SIGSEGV); restarting it" in verifier_log
    assert [(r.name, r.exit) for r in stack.restarts] == [("verifier", "signal SIGSEGV")]
    assert served == expected[0]
    assert recovery_s < RECOVERY_BOUND_S


def test_a_service_stopped_on_purpose_stays_stopped(tiny_dirs, tmp_path):
    dirs = tiny_dirs["llama"]
    stack = LocalStack(dirs["target"], "none", threads_verifier=1, threads_drafter=1, log_dir=str(tmp_path))
    try:
        stack.start(timeout_s=120)
        stack.kill("verifier", signal.SIGKILL)
        first = stack.processes["coordinator"]
        first.send_signal(signal.SIGTERM)  # drains and exits 0: asked to stop, not a crash
        assert first.wait(30) == 0
    finally:
        stack.stop()
    assert stack.restarts == [] and stack.processes["coordinator"] is first


def test_a_verifier_whose_model_thread_dies_fails_its_calls_turns_not_serving_and_stops(tiny_dirs):
    async def scenario():
        settings = load_settings("verifier", {"model": tiny_dirs["llama"]["target"]}, environ={})
        servicer = build_servicer(settings)
        running = await start(settings, servicer)
        scheduler = servicer.core.scheduler

        def broken_step(verifies, prefills):
            raise SystemError("a bug outside the forward pass")

        scheduler._run_step = broken_step
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await verifier_pb2_grpc.VerifierStub(channel).Prefill(verifier_pb2.PrefillRequest(
                    session_id="s", token_ids=PROMPTS[0], sampling=sampling_to_proto(SamplingParams()),
                    max_new_tokens=4), timeout=30)
            status = (await asyncio.wait_for(watch.read(), 30)).status
        await asyncio.wait_for(running.server.wait_for_termination(), 30)
        return refused.value, status, running.failure

    refused, status, failure = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "thread died" in refused.details()
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "verifier-steps thread died" in failure

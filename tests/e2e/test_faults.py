"""Faults injected under load: four concurrent greedy streams through the public client while a service
process is killed or stopped. Every fault must cost 0 failed requests and leave each output identical
to the no-fault run; the tracing and training side must recover on its own."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from types import SimpleNamespace

import grpc
import pytest
from conftest import hf_greedy
from faults_support import (
    RedisProcess,
    assert_survived,
    kill_mid_batch,
    log_tail,
    run_streams,
    start_trainer,
    stop_process,
    wait_until,
)

from specd.stack import LocalStack
from specdec.client import SpecdClient
from specdec.traces import DEFAULT_STREAM, iter_traces
from specdec.v1 import verifier_pb2, verifier_pb2_grpc

PROMPTS = [[5, 17, 99, 3, 42, 8], [200, 1, 1, 7, 33, 19, 64, 2, 250], [11, 12, 13], [90, 180, 45, 135, 7]]
NEW_TOKENS = 96
FAULT_AFTER = 16  # tokens every stream has received when the fault is injected
TRAINER_GROUP = "specd-trainers"  # `specd train`'s default consumer group


@contextmanager
def running(stack: LocalStack):
    try:
        yield stack.start(timeout_s=120)
    finally:
        stack.stop()


def stack_for(dirs: dict, log_dir, coordinator_args: tuple[str, ...] = (), **kwargs) -> LocalStack:
    # pearl asks the drafter every round and no lookup block stands in for it, so every stream meets a fault
    # on the drafter's path
    return LocalStack(dirs["target"], dirs["close"], threads_verifier=1, threads_drafter=1, log_dir=str(log_dir),
                      coordinator_args=["--policy", "pearl", "--lookup-draft-tokens", "0", *coordinator_args],
                      **kwargs)


@pytest.fixture(scope="module")
def traced(tiny_dirs, tmp_path_factory):
    """A stack whose coordinator traces every verified block to a Redis server the tests can kill."""
    directory = tmp_path_factory.mktemp("traced")
    server = RedisProcess(directory / "redis")
    stack = stack_for(tiny_dirs["llama"], directory, coordinator_args=["--redis-url", server.url, "--trace-top-k", "4"])
    try:
        with running(stack):
            yield SimpleNamespace(stack=stack, redis=server, directory=directory)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference(traced, tiny_dirs):
    """The four streams with no fault: the outputs every faulted run must reproduce."""
    outcomes = run_streams(traced.stack.address, PROMPTS, NEW_TOKENS)
    assert [o.error for o in outcomes] == [""] * len(PROMPTS)
    expected = [hf_greedy(tiny_dirs["llama"]["target"], prompt, NEW_TOKENS) for prompt in PROMPTS]
    assert [o.token_ids for o in outcomes] == expected  # the no-fault run is the target's own greedy output
    return expected


def group_info(client, group: str) -> dict | None:
    try:
        groups = client.xinfo_groups(DEFAULT_STREAM)
    except Exception:  # noqa: BLE001 - the stream itself may not exist (yet)
        return None
    return next((g for g in groups if g["name"].decode() == group), None)


def has_delivered(client, group: str) -> bool:
    info = group_info(client, group)
    return info is not None and info["last-delivered-id"] != b"0-0"


def active_sessions(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return verifier_pb2_grpc.VerifierStub(channel).Info(verifier_pb2.InfoRequest(), timeout=5).active_sessions


def test_drafter_sigkill_falls_back_to_target_only_decoding(tiny_dirs, reference, tmp_path):
    stack = stack_for(tiny_dirs["llama"], tmp_path, coordinator_args=["--drafter-timeout-s", "1",
                                                                      "--drafter-retry-s", "30"])
    with running(stack) as address:
        outcomes = run_streams(address, PROMPTS, NEW_TOKENS, fault=lambda: stack.kill("drafter"),
                               fault_after=FAULT_AFTER)
    assert_survived(outcomes, reference, NEW_TOKENS)
    assert all(o.stats.fallback_steps > 0 for o in outcomes)
    assert sum(o.stats.accepted_tokens for o in outcomes) > 0  # they were speculating before the kill


def test_verifier_sigkill_re_prefills_sessions_on_the_other_replica(tiny_dirs, reference, tmp_path):
    stack = stack_for(tiny_dirs["llama"], tmp_path, verifier_count=2)
    victim = {}

    def kill_the_busier_verifier() -> None:
        sessions = {name: active_sessions(stack.ports[name]) for name in ("verifier0", "verifier1")}
        victim["name"] = max(sessions, key=sessions.get)
        victim["sessions"] = sessions[victim["name"]]
        stack.kill(victim["name"])

    with running(stack) as address:
        outcomes = run_streams(address, PROMPTS, NEW_TOKENS, fault=kill_the_busier_verifier, fault_after=FAULT_AFTER)
        other = "verifier1" if victim["name"] == "verifier0" else "verifier0"
        wait_until(lambda: active_sessions(stack.ports[other]) == 0, 10, "the moved sessions to be released")
    assert_survived(outcomes, reference, NEW_TOKENS)
    assert victim["sessions"] >= 2  # four sessions on two replicas: the busier one held at least two


def test_verifier_sigterm_keeps_serving_open_sessions_to_the_end(tiny_dirs, reference, tmp_path):
    stack = stack_for(tiny_dirs["llama"], tmp_path)
    with running(stack) as address:
        verifier = stack.processes["verifier"]
        outcomes = run_streams(address, PROMPTS, NEW_TOKENS, fault=lambda: verifier.send_signal(signal.SIGTERM),
                               fault_after=FAULT_AFTER)
        assert_survived(outcomes, reference, NEW_TOKENS)
        assert verifier.wait(30) == 0, log_tail(tmp_path / "verifier.log")


def test_redis_sigkill_and_restart_keeps_serving_and_tracing_resumes(traced, reference):
    client = traced.redis.client()
    before = {}

    def restart_redis() -> None:
        before["traces"] = client.xlen(DEFAULT_STREAM)
        traced.redis.restart_empty()

    outcomes = run_streams(traced.stack.address, PROMPTS, NEW_TOKENS, fault=restart_redis, fault_after=FAULT_AFTER)
    assert_survived(outcomes, reference, NEW_TOKENS)
    assert before["traces"] > 0  # tracing was on before the kill
    with SpecdClient(traced.stack.address) as specd:
        after = specd.generate(token_ids=PROMPTS[0], max_new_tokens=16, request_id="after-restart")
    assert after.token_ids == reference[0][:16]
    wait_until(lambda: any(r.request_id == "after-restart" for _, r in iter_traces(client)), 20,
               "the coordinator to trace to the restarted Redis")
    client.close()


def test_trainer_sigkill_mid_batch_leaves_its_traces_to_another_worker(traced, reference, tiny_dirs, tmp_path):
    client = traced.redis.client()
    group = "faults-reclaim"
    drafter = tiny_dirs["llama"]["close"]
    doomed = start_trainer(traced.redis.url, drafter, tmp_path, "doomed", "--consumer-group", group)
    survivor = start_trainer(traced.redis.url, drafter, tmp_path, "survivor", "--consumer-group", group,
                             "--claim-idle-ms", "100")
    stranded: set[str] = set()
    try:
        wait_until(lambda: doomed.poll() is None and has_delivered(client, group), 90,
                   f"the trainers to join {group}; {log_tail(tmp_path / 'doomed.log')}")
        outcomes = run_streams(traced.stack.address, PROMPTS, NEW_TOKENS, fault_after=FAULT_AFTER,
                               fault=lambda: stranded.update(kill_mid_batch(doomed, client, DEFAULT_STREAM, group,
                                                                            "doomed")))
        assert stranded  # it died holding traces it had read and not acknowledged

        def stranded_still_pending() -> set[str]:
            pending = client.xpending_range(DEFAULT_STREAM, group, min="-", max="+", count=10_000)
            return stranded & {p["message_id"].decode() for p in pending}

        wait_until(lambda: not stranded_still_pending(), 60,
                   f"the survivor to claim the stranded traces; {log_tail(tmp_path / 'survivor.log')}")
        assert survivor.poll() is None
        consumers = {c["name"].decode(): c for c in client.xinfo_consumers(DEFAULT_STREAM, group)}
        assert consumers["doomed"]["pending"] == 0 and "survivor" in consumers
    finally:
        stop_process(doomed)
        stop_process(survivor)
        client.close()
    assert_survived(outcomes, reference, NEW_TOKENS)


def test_redis_restarted_empty_under_a_trainer_recreates_its_group(traced, reference, tiny_dirs, tmp_path):
    client = traced.redis.client()
    trainer = start_trainer(traced.redis.url, tiny_dirs["llama"]["close"], tmp_path, "steady")
    try:
        wait_until(lambda: trainer.poll() is None and has_delivered(client, TRAINER_GROUP), 90,
                   f"the trainer to consume traces; {log_tail(tmp_path / 'steady.log')}")
        outcomes = run_streams(traced.stack.address, PROMPTS, NEW_TOKENS, fault=traced.redis.restart_empty,
                               fault_after=FAULT_AFTER)
        assert_survived(outcomes, reference, NEW_TOKENS)
        with SpecdClient(traced.stack.address) as specd:
            specd.generate(token_ids=PROMPTS[1], max_new_tokens=16)  # traces that certainly follow the restart
        wait_until(lambda: has_delivered(client, TRAINER_GROUP), 30,
                   f"the trainer to recreate {TRAINER_GROUP} and read new traces; {log_tail(tmp_path / 'steady.log')}")
        assert trainer.poll() is None
        consumers = {c["name"].decode() for c in client.xinfo_consumers(DEFAULT_STREAM, TRAINER_GROUP)}
        assert consumers == {"steady"}
    finally:
        stop_process(trainer)
        client.close()

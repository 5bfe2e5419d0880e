"""SIGTERM drains finish work: a verifier or coordinator told to stop mid-stream reports NOT_SERVING
(its health service still answering), refuses new work, and completes the streams it holds."""

from __future__ import annotations

import signal
import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specd.stack import LocalStack
from specdec.v1 import generation_pb2_grpc
from specdec.wire.client import build_request

torch.set_num_threads(1)

PROMPTS = [[5, 6, 7], [11, 12, 13, 14], [40, 3, 9], [77, 1, 2, 3, 4]]
NEW_TOKENS = 200
VERIFIER_WAIT_S = 1.0


def _health(address: str) -> int:
    """The overall health status; raises grpc.RpcError if the server no longer answers."""
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status


def _requests() -> list:
    return [build_request(token_ids=prompt, max_new_tokens=NEW_TOKENS, mode="overlapped", ignore_eos=True)
            for prompt in PROMPTS]


@pytest.fixture
def stack(tiny_dirs, tmp_path):
    dirs = tiny_dirs["llama"]
    # A request that finds its only verifier draining waits VERIFIER_WAIT_S for another, then hears why.
    running = LocalStack(dirs["target"], dirs["close"], threads_verifier=1, threads_drafter=1, log_dir=str(tmp_path),
                         extra_env={"SPECD_GRACE_PERIOD_S": "90"},
                         # streams as long as they ran before lookup blocks and smartspec's target-only rounds sped
                         # them up: NEW_TOKENS must outlast the signal and the refused request's wait
                         coordinator_args=["--verifier-wait-s", str(VERIFIER_WAIT_S), "--lookup-draft-tokens", "0",
                                           "--policy", "pearl"])
    running.start(timeout_s=120)
    yield running
    running.stop()


def _sigterm_mid_stream(stack: LocalStack, service: str) -> tuple[list[list[int]], list[list[int]], grpc.RpcError]:
    """Outputs of the requests run without a fault, then run concurrently with `service` signalled once all
    four stream; and the error a new request gets while it drains."""
    with grpc.insecure_channel(stack.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        reference = [list(stub.Generate(request, timeout=120).token_ids) for request in _requests()]
        outputs: list[list[int]] = [[] for _ in PROMPTS]
        streaming = [threading.Event() for _ in PROMPTS]

        def stream(index: int, request) -> None:
            for chunk in stub.GenerateStream(request, timeout=180, metadata=[("x-client-id", f"c{index}")]):
                outputs[index].extend(chunk.token_ids)
                streaming[index].set()

        threads = [threading.Thread(target=stream, args=pair) for pair in enumerate(_requests())]
        for thread in threads:
            thread.start()
        assert all(event.wait(60) for event in streaming)
        address = f"127.0.0.1:{stack.ports[service]}"
        stack.processes[service].send_signal(signal.SIGTERM)
        while _health(address) == health_pb2.HealthCheckResponse.SERVING:
            pass  # every check is answered, SERVING until the signal lands, NOT_SERVING after
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(build_request(token_ids=[9, 9, 9], max_new_tokens=4), timeout=30)
        assert all(len(tokens) < NEW_TOKENS for tokens in outputs), "a stream ended before the drain began"
        for thread in threads:
            thread.join(180)
    assert stack.processes[service].wait(60) == 0
    return reference, outputs, refused.value


def test_a_draining_verifier_finishes_its_sessions(stack):
    reference, outputs, refused = _sigterm_mid_stream(stack, "verifier")
    assert outputs == reference
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.details(), refused.details()
    assert f"127.0.0.1:{stack.ports['verifier']}" in refused.details()


def test_a_draining_coordinator_finishes_its_streams(stack):
    reference, outputs, refused = _sigterm_mid_stream(stack, "coordinator")
    assert outputs == reference
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.details(), refused.details()

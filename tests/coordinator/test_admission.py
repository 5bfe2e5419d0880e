"""The coordinator's admission queue: requests past max_concurrency wait in order, honour their deadlines
while they wait, leave when cancelled, and past max_queued get RESOURCE_EXHAUSTED with a retry hint."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch
from conftest import InProcessStack

from coordinator.admission import AdmissionQueue, QueueFull, QueueTimeout
from specdec import metrics
from specdec.v1 import generation_pb2_grpc
from specdec.wire.client import build_request

torch.set_num_threads(1)


# -- the queue alone ---------------------------------------------------------------------------------

def test_slots_pass_to_waiters_in_arrival_order():
    async def scenario():
        queue = AdmissionQueue(max_running=1, max_queued=3)
        first = await queue.enter(None)
        order = []

        async def wait(name):
            admitted = await queue.enter(None)
            order.append(name)
            await asyncio.sleep(0.01)
            queue.leave(admitted)

        waiters = [asyncio.ensure_future(wait(name)) for name in "abc"]
        await asyncio.sleep(0.01)
        assert queue.queued == 3 and queue.running == 1
        with pytest.raises(QueueFull) as full:
            await queue.enter(None)
        assert full.value.retry_after_s > 0
        queue.leave(first)
        await asyncio.gather(*waiters)
        assert order == ["a", "b", "c"] and queue.running == 0 and queue.queued == 0

    asyncio.run(scenario())


def test_a_waiter_leaves_the_queue_at_its_deadline_or_when_cancelled():
    async def scenario():
        queue = AdmissionQueue(max_running=1, max_queued=2)
        holder = await queue.enter(None)
        with pytest.raises(QueueTimeout):
            await queue.enter(0.05)
        cancelled = asyncio.ensure_future(queue.enter(None))
        await asyncio.sleep(0.01)
        assert queue.queued == 1
        cancelled.cancel()
        await asyncio.sleep(0.01)
        assert queue.queued == 0
        queue.leave(holder)
        assert queue.running == 0
        await queue.enter(0.0)  # a free slot is taken at once, even with no time left
        assert queue.running == 1

    asyncio.run(scenario())


# -- over gRPC ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_coordinator(tiny_dirs):
    stack = InProcessStack(tiny_dirs["llama"]["target"], None,
                           coordinator_overrides={"max_concurrency": 1, "max_queued": 1})
    yield stack
    stack.close()


def _queued() -> float:
    return metrics.QUEUE_DEPTH._value.get()  # noqa: SLF001 - the gauge's value in this process


def _wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_full_queue_answers_resource_exhausted_and_the_server_keeps_serving(small_coordinator):
    with grpc.insecure_channel(small_coordinator.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        long_request = build_request(token_ids=[5, 6, 7], max_new_tokens=300, mode="target_only", ignore_eos=True)
        results: dict[str, list[int]] = {}
        running = threading.Event()

        def stream(name: str, request) -> None:
            tokens = []
            for chunk in stub.GenerateStream(request, timeout=120, metadata=[("x-client-id", name)]):
                tokens.extend(chunk.token_ids)
                running.set()
            results[name] = tokens

        first = threading.Thread(target=stream, args=("first", long_request))
        first.start()
        assert running.wait(60)
        short = build_request(token_ids=[9, 8, 7], max_new_tokens=5, mode="target_only", ignore_eos=True)

        # Waits in the queue past its deadline: DEADLINE_EXCEEDED, and it leaves the queue.
        with pytest.raises(grpc.RpcError) as late:
            stub.Generate(short, timeout=0.3, metadata=[("x-client-id", "late")])
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _wait_until(lambda: _queued() == 0, 5)

        # Cancelled while queued: it leaves the queue.
        cancelled = stub.GenerateStream(short, timeout=60, metadata=[("x-client-id", "cancelled")])
        assert _wait_until(lambda: _queued() == 1, 5)
        cancelled.cancel()
        assert _wait_until(lambda: _queued() == 0, 5)

        queued = threading.Thread(target=stream, args=("queued", short))
        queued.start()
        assert _wait_until(lambda: _queued() == 1, 5)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(short, timeout=30, metadata=[("x-client-id", "refused")])
        error = refused.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in about" in error.details()
        trailing = dict(error.trailing_metadata())
        assert int(trailing["retry-after-ms"]) > 0 and trailing["x-request-id"] == short.request_id

        first.join(120)
        queued.join(120)
        assert len(results["first"]) == 300 and len(results["queued"]) == 5
        assert len(stub.Generate(short, timeout=30).token_ids) == 5
        assert _queued() == 0

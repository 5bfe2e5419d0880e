"""A caller that cancels or runs out of deadline frees the KV sessions it holds on the verifier and the drafter,
also while its prefill is still on the wire, and the services keep serving."""

from __future__ import annotations

import time

import grpc
import pytest
from production_stacks import (
    AUTH,
    GREEDY,
    PROMPT,
    TOKEN,
    channel_to,
    open_sessions,
    rpc_error,
    sample_value,
    scrape,
    wait_until,
)
from production_stacks import plain_stack, stack  # noqa: F401 - fixtures

from specdec.config import load_settings
from specdec.v1 import generation_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from specdec.wire.client import SpecdClient, build_request


@pytest.mark.parametrize("mode", ["sequential", "overlapped"])
def test_cancelling_a_stream_frees_kv_on_drafter_and_verifier(stack, mode):
    before = scrape(stack.metrics_ports["coordinator"])
    client = SpecdClient(stack.address, token=TOKEN)
    call = client.stream(token_ids=PROMPT, max_new_tokens=450, mode=mode, policy="static")
    received = 0
    for chunk in call:
        received += len(chunk.token_ids)
        if received >= 10:
            break
    assert open_sessions(stack, AUTH) == (1, 1)  # mid-stream: one session on each backend
    call.cancel()
    cancelled_at = time.monotonic()
    assert wait_until(lambda: open_sessions(stack, AUTH) == (0, 0), timeout=1.0), \
        f"sessions still open 1s after the cancel: {open_sessions(stack, AUTH)}"
    assert time.monotonic() - cancelled_at < 1.0
    labels = dict(mode=mode, policy="static", status="cancelled")
    assert wait_until(lambda: sample_value(scrape(stack.metrics_ports["coordinator"]), "specd_requests_total", **labels)
                       - sample_value(before, "specd_requests_total", **labels) == 1, timeout=1.0)
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
        stub = generation_pb2_grpc.GenerationStub(channel_to(plain_stack, "slow-coordinator"))
        request = build_request(token_ids=PROMPT, max_new_tokens=8)
        if how == "cancel":
            call = stub.GenerateStream(request, timeout=30)
            # The verifier has opened the session and finished the prefill (a few ms for this prompt); its
            # answer is still on the wire, so the coordinator has not heard back when the caller gives up.
            assert wait_until(lambda: open_sessions(plain_stack) == (1, 0), timeout=0.45)
            time.sleep(0.05)
            call.cancel()
        else:
            assert rpc_error(lambda: stub.Generate(request, timeout=0.2)).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: open_sessions(plain_stack) == (0, 0), timeout=3.0), open_sessions(plain_stack)
    finally:
        plain_stack.run(proxy.close())


def test_deadline_exceeded_frees_sessions_and_service_keeps_serving(stack):
    stub = generation_pb2_grpc.GenerationStub(channel_to(stack, "coordinator"))
    for call in (lambda r: stub.GenerateStream(r, metadata=AUTH, timeout=0.3),
                 lambda r: stub.Generate(r, metadata=AUTH, timeout=0.3)):
        request = build_request(token_ids=PROMPT, max_new_tokens=450, mode="overlapped")
        started = time.monotonic()
        error = rpc_error(lambda: call(request))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.0
        assert wait_until(lambda: open_sessions(stack, AUTH) == (0, 0), timeout=1.0), open_sessions(stack, AUTH)
    with SpecdClient(stack.address, token=TOKEN) as client:
        result = client.generate(token_ids=PROMPT, max_new_tokens=8, policy="pearl")  # drafts every round
    assert len(result.token_ids) == 8 and result.finish_reason == "FINISH_REASON_LENGTH"
    # A client's deadline is not the drafter's fault: the drafter was not marked down for it.
    assert result.stats["fallback_steps"] == 0 and result.stats["drafted_tokens"] > 0


def test_verifier_releases_a_prefill_abandoned_at_its_deadline(plain_stack):
    """A caller whose Prefill hits its deadline never learns the session id was opened; the verifier must not
    keep the KV until the TTL."""
    verifier = verifier_pb2_grpc.VerifierStub(channel_to(plain_stack, "verifier0"))
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
    assert wait_until(lambda: open_sessions(plain_stack)[0] == 0, timeout=1.0), open_sessions(plain_stack)
    # Still serving.
    verifier.Prefill(verifier_pb2.PrefillRequest(session_id="ok", token_ids=[1, 2, 3], sampling=GREEDY,
                                                 max_new_tokens=4), timeout=5)
    assert verifier.Release(verifier_pb2.ReleaseRequest(session_id="ok"), timeout=5).released
    assert wait_until(lambda: open_sessions(plain_stack)[0] == 0, timeout=1.0)

"""What a round's Verify call costs beyond the verifier's own work, with many sessions at once, as
one unary call per round and over the coordinator's multiplexed VerifyStream.

    python -m bench.transport_cost                       # 1, 8 and 16 sessions on the bundled target, both ways
    python -m bench.transport_cost --sessions 1,8 --rounds 20 --transports stream --target /path/to/model

Starts a verifier process on loopback and drives N sessions concurrently from one asyncio client,
each doing target-only Verify rounds back to back (what a coordinator does per round), either as
unary Verify calls or through one `coordinator.verify_stream.VerifyStream` that all sessions share.
Per call, transport = the client's wall time - the time the verifier reports (queue + compute); the
table gives its mean and p50 per session per round, beside the batched pass time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from coordinator.verify_stream import VerifyStream
from specd.stack import check_health, free_port
from specdec.sampling_params import SamplingParams, sampling_to_proto
from specdec.v1 import verifier_pb2, verifier_pb2_grpc


async def _session(stub, verify, index: int, prompt: list[int], rounds: int,
                   start: asyncio.Event) -> list[tuple[float, float, int]]:
    """(transport ms, pass ms, sessions in the pass) per round of one session."""
    session_id = f"transport-{index}"
    response = await stub.Prefill(verifier_pb2.PrefillRequest(session_id=session_id, token_ids=prompt,
                                                              sampling=sampling_to_proto(SamplingParams()),
                                                              max_new_tokens=rounds + 1))
    committed = response.committed_len
    await start.wait()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        result = await verify(verifier_pb2.VerifyRequest(session_id=session_id, committed_len=committed))
        wall_ms = (time.perf_counter() - started) * 1e3
        committed = result.committed_len
        timing = result.timing
        samples.append((wall_ms - timing.queue_ms - timing.compute_ms, timing.compute_ms, timing.batch_sessions))
    await stub.Release(verifier_pb2.ReleaseRequest(session_id=session_id))
    return samples


async def _level(addr: str, transport_kind: str, sessions: int, rounds: int) -> dict:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = verifier_pb2_grpc.VerifierStub(channel)
        stream = VerifyStream(stub, [])

        async def verify(request):
            return await (stream.verify(request, None) if transport_kind == "stream" else stub.Verify(request))

        start = asyncio.Event()
        tasks = [asyncio.ensure_future(_session(stub, verify, i, [(7 * i + j) % 1000 + 10 for j in range(40)], rounds,
                                                start))
                 for i in range(sessions)]
        await asyncio.sleep(0.5 + 0.2 * sessions)  # prefills done
        start.set()
        results = [sample for task in await asyncio.gather(*tasks) for sample in task]
        stream.close()
    transport = [r[0] for r in results]
    return {"transport": transport_kind, "sessions": sessions, "calls": len(results),
            "transport_ms_mean": statistics.fmean(transport),
            "transport_ms_p50": statistics.median(transport), "pass_ms_p50": statistics.median(r[1] for r in results),
            "sessions_per_pass_mean": statistics.fmean(r[2] for r in results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--sessions", default="1,8,16")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--transports", default="unary,stream", help="unary: a Verify call per round; stream: one "
                                                                     "VerifyStream for every session")
    args = parser.parse_args(argv)
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="specd-transport-")) / "verifier.log"
    verifier = subprocess.Popen([sys.executable, "-m", "specd.cli", "serve", "verifier", "--port", str(port),
                                 "--model", args.target, "--threads", str(args.threads), "--metrics-port", "0"],
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not check_health(f"127.0.0.1:{port}", timeout_s=1.0):
            if verifier.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the verifier did not start; see {log}")
            time.sleep(0.5)
        rows = [asyncio.run(_level(f"127.0.0.1:{port}", kind, int(n), args.rounds))
                for n in args.sessions.split(",") for kind in args.transports.split(",")]
    finally:
        verifier.terminate()
        verifier.wait(30)
    print("| sessions | transport | calls | transport ms per call (mean) | p50 | verifier pass ms (p50) "
          "| sessions per pass |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['sessions']} | {row['transport']} | {row['calls']} | {row['transport_ms_mean']:.2f} | {row['transport_ms_p50']:.2f} "
              f"| {row['pass_ms_p50']:.1f} | {row['sessions_per_pass_mean']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

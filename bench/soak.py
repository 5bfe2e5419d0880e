"""Soak run: a local stack under steady concurrent load for a fixed time, watching errors, latency and memory.

    python -m bench.soak --minutes 30                                   # bundled target, n-gram drafter
    python -m bench.soak --minutes 1 --target path/to/model --drafter ngram --clients 2
    python -m bench.soak --minutes 10 --clients 16 --drafter smollm2-135m-eagle         # as `specd up --drafter ...`

Starts the stack `specd up` starts (LocalStack on loopback: verifier, drafter, coordinator as supervised
processes, the same --mode and --policy defaults), then --clients threads each
send requests back to back through the public client, cycling through the prompt suite (every category)
from different offsets; every fourth request samples (temperature 0.8, top-p 0.95, seeded), the rest are
greedy. After --minutes no new request starts; requests in flight finish (each is bounded by
--request-timeout-s) and the stack stops. Every --sample-s the resident memory (VmRSS in
/proc/<pid>/status) of each service is sampled.

After the load each distinct prompt is decoded once in mode target_only, and every greedy answer must
equal it token for token. Reports requests, errors by gRPC status code, greedy mismatches, p50/p99 latency of the requests that succeeded, and per
service RSS at the start and end with its least-squares slope in MB/min, over the whole run and over its
second half (growth that persists after warm-up is the one that matters). The table is printed and the
full report written to <out>/results.json. The target's tokenizer applies its chat template to the
prompts, so the target must carry one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench.report import percentile
from bench.run import Prompt, read_prompts
from specd.stack import LocalStack, default_threads
from specdec.client import SpecdClient
from specdec.config import DEFAULT_POLICY

HERE = Path(__file__).resolve().parent
SAMPLED_EVERY = 4  # every fourth request samples instead of decoding greedily
SAMPLING = {"temperature": 0.8, "top_p": 0.95}


@dataclass
class Request:
    client: int
    prompt_id: str
    sampled: bool
    start_s: float  # from the start of the load
    latency_s: float
    status: str  # "OK", a gRPC status code name, or the exception's class name
    new_tokens: int = 0
    token_ids: list[int] | None = None  # a greedy answer's, kept to check against target-only decoding


@dataclass
class RssSample:
    service: str
    t_s: float  # from the start of the load
    rss_mb: float


def rss_mb(pid: int) -> float | None:
    """Resident memory of a live process in MB (VmRSS), None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None  # a zombie has no VmRSS line


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute; 0.0 with fewer than two distinct times."""
    if len({t for t, _ in points}) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    covariance = sum((t - mean_t) * (y - mean_y) for t, y in points)
    variance = sum((t - mean_t) ** 2 for t, _ in points)
    return 60.0 * covariance / variance


def rss_trend(samples: list[RssSample]) -> dict:
    """Start, end and peak RSS of one service, with its slope over the run and over the run's second half."""
    points = [(s.t_s, s.rss_mb) for s in samples]
    middle = (points[0][0] + points[-1][0]) / 2
    return {"start_mb": points[0][1], "end_mb": points[-1][1], "peak_mb": max(y for _, y in points),
            "slope_mb_per_min": slope_per_min(points),
            "second_half_slope_mb_per_min": slope_per_min([p for p in points if p[0] >= middle]),
            "samples": len(points)}


def summarise(requests: list[Request], samples: list[RssSample], seconds: float) -> dict:
    ok = [r for r in requests if r.status == "OK"]
    errors: dict[str, int] = {}
    for r in requests:
        if r.status != "OK":
            errors[r.status] = errors.get(r.status, 0) + 1
    latencies = [r.latency_s for r in ok]
    services = sorted({s.service for s in samples})
    return {
        "seconds": seconds, "requests": len(requests), "ok": len(ok), "errors": dict(sorted(errors.items())),
        "requests_per_min": 60.0 * len(requests) / seconds if seconds > 0 else 0.0,
        "tokens_per_s": sum(r.new_tokens for r in ok) / seconds if seconds > 0 else 0.0,
        "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
        "rss": {name: rss_trend([s for s in samples if s.service == name]) for name in services},
    }


def markdown_table(summary: dict) -> str:
    errors = ", ".join(f"{code} {count}" for code, count in summary["errors"].items()) or "none"
    lines = [f"{summary['requests']} requests in {summary['seconds'] / 60:.1f} min "
             f"({summary['requests_per_min']:.1f}/min, {summary['tokens_per_s']:.1f} tok/s); errors: {errors}; "
             f"latency p50 {summary['latency_p50_s']:.2f} s, p99 {summary['latency_p99_s']:.2f} s", "",
             "| service | RSS start (MB) | RSS end (MB) | peak (MB) | slope (MB/min) | second-half slope (MB/min) |",
             "|---|---|---|---|---|---|"]
    for name, trend in summary["rss"].items():
        lines.append(f"| {name} | {trend['start_mb']:.1f} | {trend['end_mb']:.1f} | {trend['peak_mb']:.1f} | "
                     f"{trend['slope_mb_per_min']:+.2f} | {trend['second_half_slope_mb_per_min']:+.2f} |")
    return "\n".join(lines)


class Load:
    """Client threads sending requests until a deadline, and a sampler of each service's RSS."""

    def __init__(self, address: str, pids: dict[str, int], prompts: list[Prompt], clients: int,
                 max_new_tokens: int, request_timeout_s: float, sample_s: float):
        self.address, self.pids, self.prompts = address, pids, prompts
        self.clients, self.max_new_tokens = clients, max_new_tokens
        self.request_timeout_s, self.sample_s = request_timeout_s, sample_s
        self.requests: list[Request] = []
        self.samples: list[RssSample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = 0.0

    def run(self, seconds: float) -> float:
        """Drives the load for `seconds`; returns the wall time until the last request finished."""
        self._started = time.monotonic()
        deadline = self._started + seconds
        self._sample()
        sampler = threading.Thread(target=self._sample_until_stopped, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=self._client, args=(c, deadline)) for c in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._stop.set()
        sampler.join()
        self._sample()
        return time.monotonic() - self._started

    def _client(self, client: int, deadline: float) -> None:
        offset = client * len(self.prompts) // self.clients  # clients start at different prompts
        # Each thread is a client of its own, as separate callers are to the per-client concurrency limit.
        with SpecdClient(self.address, timeout_s=self.request_timeout_s, client_id=f"soak-{client}") as connection:
            sent = 0
            while time.monotonic() < deadline:
                prompt = self.prompts[(offset + sent) % len(self.prompts)]
                sampled = sent % SAMPLED_EVERY == SAMPLED_EVERY - 1
                options = {**SAMPLING, "seed": sent} if sampled else {}
                start = time.monotonic()
                status, new_tokens, token_ids = "OK", 0, None
                try:
                    result = connection.generate(prompt.text, max_new_tokens=self.max_new_tokens, **options)
                    new_tokens = len(result.token_ids)
                    token_ids = None if sampled else result.token_ids
                except grpc.RpcError as err:
                    status = err.code().name
                except Exception as err:  # noqa: BLE001 - a soak counts every failure and keeps going
                    status = type(err).__name__
                with self._lock:
                    self.requests.append(Request(client, prompt.id, sampled, start - self._started,
                                                 time.monotonic() - start, status, new_tokens, token_ids))
                sent += 1

    def _sample(self) -> None:
        now = time.monotonic() - self._started
        for name, pid in self.pids.items():
            rss = rss_mb(pid)
            if rss is not None:
                self.samples.append(RssSample(name, now, rss))

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.sample_s):
            self._sample()


def greedy_mismatches(address: str, requests: list[Request], prompts: list[Prompt], max_new_tokens: int,
                      timeout_s: float) -> dict:
    """Every greedy answer set against the target's own greedy decoding of its prompt (mode target_only, asked
    once per prompt after the load): the soak's check that speculation under load changed no token."""
    text = {p.id: p.text for p in prompts}
    greedy = [r for r in requests if r.token_ids is not None]
    reference: dict[str, list[int]] = {}
    with SpecdClient(address, timeout_s=timeout_s) as connection:
        for prompt_id in sorted({r.prompt_id for r in greedy}):
            reference[prompt_id] = connection.generate(text[prompt_id], max_new_tokens=max_new_tokens,
                                                       mode="target_only").token_ids
    wrong = [r for r in greedy if r.token_ids != reference[r.prompt_id]]
    return {"greedy_checked": len(greedy), "greedy_mismatches": len(wrong),
            "mismatched_prompts": sorted({r.prompt_id for r in wrong})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, required=True, help="how long to send requests")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", default="ngram", help="ngram, a preset (smollm2-135m-eagle), a model directory or "
                                                          "'none'")
    parser.add_argument("--mode", default="overlapped", choices=["sequential", "overlapped", "target_only"])
    parser.add_argument("--policy", default=DEFAULT_POLICY, help="the coordinator's policy (default: the one specd up serves)")
    parser.add_argument("--prompt-lookup", action="store_true", help="as specd up --prompt-lookup")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients, each sending back to back")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", default=str(HERE / "prompts" / "suite.jsonl"))
    parser.add_argument("--request-timeout-s", type=float, default=120.0)
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--threads-verifier", type=int, default=default_threads()[0])
    parser.add_argument("--threads-drafter", type=int, default=default_threads()[1])
    parser.add_argument("--out", default=str(HERE / "results" / "soak"))
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1:
        parser.error("--minutes must be positive and --clients at least 1")

    prompts = read_prompts(Path(args.prompts), None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_dir = tempfile.mkdtemp(prefix="specd-soak-")
    # The stack `specd up` starts: the same coordinator and drafter arguments, supervised alike.
    stack = LocalStack(args.target, args.drafter, threads_verifier=args.threads_verifier,
                       threads_drafter=args.threads_drafter, log_dir=log_dir,
                       coordinator_args=["--mode", args.mode, "--policy", args.policy],
                       drafter_args=["--prompt-lookup"] if args.prompt_lookup else None)
    print(f"bench.soak: starting the stack (logs in {log_dir})", file=sys.stderr, flush=True)
    try:
        address = stack.start(timeout_s=600)
        pids = {name: process.pid for name, process in stack.processes.items()}
        load = Load(address, pids, prompts, args.clients, args.max_new_tokens, args.request_timeout_s, args.sample_s)
        print(f"bench.soak: {args.clients} clients for {args.minutes:g} min", file=sys.stderr, flush=True)
        seconds = load.run(args.minutes * 60)
        equality = greedy_mismatches(address, load.requests, prompts, args.max_new_tokens, args.request_timeout_s)
        exit_codes = {name: process.poll() for name, process in stack.processes.items()}
        crashes = [asdict(restart) for restart in stack.restarts]
    finally:
        stack.stop()

    summary = {**summarise(load.requests, load.samples, seconds), **equality}
    command = "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "target": args.target,
            "drafter": args.drafter, "mode": args.mode, "policy": args.policy, "prompt_lookup": args.prompt_lookup,
            "clients": args.clients, "max_new_tokens": args.max_new_tokens,
            "minutes": args.minutes, "prompts": len(prompts), "threads_verifier": args.threads_verifier,
            "threads_drafter": args.threads_drafter,
            # None: still running when the load ended; a number: the service died during the run.
            "service_exit_codes": exit_codes,
            # Services that died and the supervisor restarted (each one a crash, whatever the requests saw).
            "crashes": crashes}
    (out / "results.json").write_text(json.dumps({
        "meta": meta, "summary": summary, "requests": [asdict(r) for r in load.requests],
        "rss_samples": [asdict(s) for s in load.samples]}, indent=1))
    print(markdown_table(summary))
    print(f"greedy answers checked against target-only: {summary['greedy_checked']}, "
          f"mismatches: {summary['greedy_mismatches']}")
    if crashes:
        print(f"bench.soak: {len(crashes)} service crash(es), restarted: {crashes}", file=sys.stderr)
    print(f"bench.soak: wrote {out / 'results.json'}", file=sys.stderr)
    failed = summary["errors"] or summary["greedy_mismatches"] or crashes
    return 1 if failed or any(code is not None for code in exit_codes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

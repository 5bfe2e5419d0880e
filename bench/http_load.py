"""What the OpenAI-compatible HTTP tier costs: the same greedy requests through specd's HTTP API, through
its gRPC API, and through vLLM's own OpenAI server, at each concurrency level.

    python -m bench.http_load                                   # 1, 8 and 16 clients (the lead's run)
    python -m bench.http_load --clients 1,2 --per-client 1 --max-tokens 8 --out bench/out/http-smoke

The load generator is the `openai` AsyncOpenAI client, one streaming request per client at a time, back to
back: the external tools (guidellm, AIPerf) install from PyPI, but this keeps one client loop for every
HTTP system. The gRPC rows reuse bench.load's client threads. Every request sends the same token-id prompt
with ignore_eos, so each yields --max-tokens tokens, and the HTTP rows must return the gRPC rows' tokens.
vLLM (`vllm serve` from bench/setup_vllm.sh's virtualenv) runs when that virtualenv exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.load import (
    DEFAULT_VLLM_VENV,
    HERE,
    System,
    Timed,
    chat_ids,
    level_summary,
    markdown_table,
    plan_level,
    read_prompts,
    run_specd_level,
)
from specd.stack import UP_POLICY, LocalStack, check_http_health, default_threads, free_port
from specdec.conversion import materialise
from specdec.sources import load_tokenizer, resolve_source

SPECD_HTTP, SPECD_GRPC, VLLM_HTTP = "specd HTTP", "specd gRPC", "vLLM HTTP"


async def _http_level(base_url: str, model: str, name: str, prompts: list[list[int]], plan: list[list[int]],
                      max_tokens: int, extra: dict) -> list[Timed]:
    """One AsyncOpenAI client per simulated client, its requests streamed back to back from a common start."""
    import openai

    started = time.perf_counter()

    async def client_loop(client: int) -> list[Timed]:
        timed = []
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=os.environ.get("SPECD_AUTH_TOKEN", "-"),
                                      max_retries=0, timeout=600) as api:
            for prompt in plan[client]:
                tokens: list[int] = []
                ttft = 0.0
                start = time.perf_counter()
                stream = await api.completions.create(
                    model=model, prompt=prompts[prompt], max_tokens=max_tokens, temperature=0, stream=True,
                    user=f"bench-http-{client}", extra_body={"ignore_eos": True, "return_token_ids": True, **extra})
                async for chunk in stream:
                    ids = (chunk.choices[0].model_extra.get("token_ids") or []) if chunk.choices else []
                    if ids and not tokens:
                        ttft = time.perf_counter() - start
                    tokens.extend(ids)
                timed.append(Timed(name, len(plan), client, prompt, start - started, ttft,
                                   time.perf_counter() - start, tokens))
        return timed

    levels = await asyncio.gather(*[client_loop(c) for c in range(len(plan))])
    return [t for client in levels for t in client]


def run_http_level(base_url: str, model: str, name: str, prompts: list[list[int]], plan: list[list[int]],
                   max_tokens: int, extra: dict | None = None) -> list[Timed]:
    return asyncio.run(_http_level(base_url, model, name, prompts, plan, max_tokens, extra or {}))


class VllmServer:
    """vLLM's OpenAI server on `model_dir`, on the same cores, from its own virtualenv."""

    def __init__(self, venv: Path, model_dir: Path, threads: int, log_path: Path):
        self.port = free_port()
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
        self.log = open(log_path, "w")
        self.process = subprocess.Popen([str(venv / "bin" / "vllm"), "serve", str(model_dir), "--port", str(self.port),
                                         "--served-model-name", "target", "--dtype", "float32"],
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 900.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check_http_health(self.base_url):
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}; see {self.log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not ready within {timeout_s:g}s; see {self.log.name}")
            time.sleep(1.0)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", default="smollm2-135m-eagle")
    parser.add_argument("--policy", default=UP_POLICY)
    parser.add_argument("--clients", default="1,8,16")
    parser.add_argument("--per-client", type=int, default=4, help="requests each client sends per level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=Path, default=HERE / "prompts" / "suite.jsonl")
    parser.add_argument("--vllm-venv", type=Path, default=Path(os.environ.get("SPECD_VLLM_VENV", DEFAULT_VLLM_VENV)))
    parser.add_argument("--out", type=Path, default=HERE / "out" / "http")
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.clients.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)

    rows = read_prompts(args.prompts, max(levels) * args.per_client)
    tokenizer = load_tokenizer(args.target)
    prompts = [chat_ids(tokenizer, row["prompt"]) for row in rows]
    plans = {n: plan_level(n, args.per_client, n, len(prompts)) for n in levels}
    verifier_threads, drafter_threads = default_threads()
    system = System(SPECD_GRPC, "specd", args.drafter, args.policy)
    timed: dict[str, dict[int, list[Timed]]] = {SPECD_HTTP: {}, SPECD_GRPC: {}}

    stack = LocalStack(args.target, args.drafter, verifier_threads, drafter_threads, log_dir=str(args.out),
                       coordinator_args=["--policy", args.policy], http=True)
    try:
        stack.start()
        warm = plan_level(1, 1, 1, len(prompts))
        run_specd_level(stack.address, system, prompts, warm, 8)
        for n in levels:  # HTTP and gRPC alternate per level, so drift on a shared machine hits both
            timed[SPECD_HTTP][n] = run_http_level(stack.http_url, args.target, SPECD_HTTP, prompts, plans[n],
                                                  args.max_tokens, {"speculation": {"policy": args.policy}})
            timed[SPECD_GRPC][n] = run_specd_level(stack.address, system, prompts, plans[n], args.max_tokens)
            print(f"{n} clients: " + ", ".join(f"{name} {level_summary(by_level[n])['tokens_per_s']:.1f} tok/s"
                                               for name, by_level in timed.items()), file=sys.stderr, flush=True)
    finally:
        stack.stop()

    if (args.vllm_venv / "bin" / "vllm").exists():
        server = VllmServer(args.vllm_venv, materialise(resolve_source(args.target)), verifier_threads,
                            args.out / "vllm.log")
        try:
            server.wait_ready()
            timed[VLLM_HTTP] = {n: run_http_level(server.base_url, "target", VLLM_HTTP, prompts, plans[n],
                                                  args.max_tokens) for n in levels}
        finally:
            server.stop()
    else:
        print(f"no vLLM in {args.vllm_venv} (bench/setup_vllm.sh installs it): its rows are left out", file=sys.stderr)

    # The HTTP tier relays the gRPC answer: any difference in tokens is a bug, not noise.
    grpc_tokens = {(t.clients, t.client, t.prompt): t.token_ids for ts in timed[SPECD_GRPC].values() for t in ts}
    differing = [(t.clients, t.client, t.prompt) for ts in timed[SPECD_HTTP].values() for t in ts
                 if grpc_tokens.get((t.clients, t.client, t.prompt), t.token_ids) != t.token_ids]
    summary = {name: {n: level_summary(requests) for n, requests in by_level.items()}
               for name, by_level in timed.items()}
    overhead = {n: 1 - summary[SPECD_HTTP][n]["tokens_per_s"] / summary[SPECD_GRPC][n]["tokens_per_s"] for n in levels}
    report = {"target": args.target, "drafter": args.drafter, "policy": args.policy, "max_tokens": args.max_tokens,
              "per_client": args.per_client, "summary": summary, "http_overhead": overhead,
              "token_mismatches": differing}
    (args.out / "http_load.json").write_text(json.dumps(report, indent=2))
    print(markdown_table(summary, levels))
    print("\nHTTP throughput cost vs gRPC: " + ", ".join(f"{n} clients {overhead[n]:+.1%}" for n in levels))
    if differing:
        print(f"{len(differing)} HTTP requests returned other tokens than gRPC: {differing[:5]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

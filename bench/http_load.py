"""What the OpenAI-compatible HTTP tier costs: the same greedy requests through specd's HTTP API, through
its gRPC API, and through vLLM's own OpenAI server, at each concurrency level.

    python -m bench.http_load --results-md bench/RESULTS.md     # 1, 8 and 16 clients (the full run)
    python -m bench.http_load --clients 1,2 --per-client 1 --max-tokens 8 --out bench/out/http-smoke

Two load generators drive the HTTP rows. The `openai` AsyncOpenAI client, one streaming request per client
at a time, back to back, sends every request as the chat template's token ids with ignore_eos, so each
yields --max-tokens tokens and its tokens must equal the gRPC rows'. guidellm, the external tool
(bench/setup_guidellm.sh installs it into a virtualenv of its own), runs its concurrent profile at each
level against specd's HTTP tier and, when bench/setup_vllm.sh's virtualenv exists, against `vllm serve`
on the same model: the same prompts as text to /v1/completions, the same output token count (its
ignore_eos), the bundled tokenizer files, nothing from the network. The gRPC rows reuse bench.load's
client threads. Every row's tokens/s is the level's output tokens over its wall time; the ratios are
against specd's gRPC row. A row whose tool is not installed is left out.
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
    ratio_table,
    read_prompts,
    run_specd_level,
)
from specd.results import update_results_md
from specd.stack import LocalStack, check_http_health, default_threads, free_port
from specdec.config import DEFAULT_POLICY
from specdec.models.conversion import materialise
from specdec.models.sources import load_tokenizer, resolve_source

SPECD_GRPC = "specd gRPC"
SPECD_HTTP = "specd HTTP (openai client)"
SPECD_GUIDELLM = "specd HTTP (guidellm)"
VLLM_HTTP = "vLLM HTTP (openai client)"
VLLM_GUIDELLM = "vLLM HTTP (guidellm)"
DEFAULT_GUIDELLM_VENV = Path(os.environ.get("SPECD_BENCH_TOOLS", Path.home() / ".cache" / "specd" / "bench-tools")) \
    / "guidellm"
# Keep the tool off the network: the tokenizer comes from the converted model's directory.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}


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


class Guidellm:
    """guidellm 0.8's `run` from its own virtualenv: one scenario file and one JSON report per level."""

    def __init__(self, venv: Path, tokenizer_dir: Path, work: Path):
        self.venv, self.tokenizer_dir, self.work = venv, tokenizer_dir, work.resolve()

    @staticmethod
    def installed(venv: Path) -> bool:
        return (venv / "bin" / "guidellm").exists()

    def version(self) -> str:
        out = subprocess.run([str(self.venv / "bin" / "python"), "-c",
                              "from importlib.metadata import version; print(version('guidellm'))"],
                             capture_output=True, text=True)
        return out.stdout.strip() or "?"

    def run_level(self, base_url: str, model: str, name: str, texts: list[str], clients: int,
                  max_tokens: int) -> dict:
        """`clients` concurrent streams sending the level's prompts once each; a level_summary-shaped dict."""
        tag = f"{name.split()[0].lower()}-{clients}"
        data, scenario, report = (self.work / f"guidellm-{tag}.{ext}" for ext in ("jsonl", "scenario.json", "json"))
        data.write_text("".join(json.dumps({"prompt": text, "output_tokens_count": max_tokens}) + "\n"
                                for text in texts))
        scenario.write_text(json.dumps({"spec": {
            "backend": {"kind": "openai_http", "target": base_url, "model": model,
                        "request_format": "/v1/completions", "timeout": 600},
            "profile": {"kind": "concurrent", "streams": clients},
            "constraints": [{"kind": "max_requests", "count": len(texts)}],
            "tokenizer": {"kind": "huggingface_auto", "model": str(self.tokenizer_dir)},
            "data": [{"kind": "json_file", "path": str(data)}],
            "data_loader": {"kind": "pytorch", "shuffle": False},
            "outputs": [{"kind": "json", "path": str(report)}],
        }}, indent=1))
        report.unlink(missing_ok=True)
        with open(self.work / f"guidellm-{tag}.log", "w") as log:
            code = subprocess.run([str(self.venv / "bin" / "guidellm"), "run", "--scenario", str(scenario),
                                   "--disable-console-interactive"], env={**os.environ, **OFFLINE_ENV},
                                  cwd=self.work, stdout=log, stderr=subprocess.STDOUT).returncode
        if code or not report.exists():
            raise RuntimeError(f"guidellm exited with {code}; see {log.name}")
        return guidellm_summary(json.loads(report.read_text()), len(texts))


def guidellm_summary(report: dict, expected: int) -> dict:
    """A guidellm JSON report's one benchmark as level_summary's keys: output tokens over its measured
    duration, request latency and time-to-first-token percentiles of the successful requests."""
    (benchmark,) = report["benchmarks"]
    metrics = benchmark["metrics"]
    totals = metrics["request_totals"]
    if totals["successful"] != expected:
        raise RuntimeError(f"guidellm: {totals['successful']} of {expected} requests succeeded ({totals})")
    latency = metrics["request_latency"]["successful"]["percentiles"]
    ttft = metrics["time_to_first_token_ms"]["successful"]["percentiles"]
    tokens = metrics["output_token_count"]["successful"]["total_sum"]
    wall = benchmark["duration"]
    return {"requests": totals["successful"], "tokens": int(tokens), "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_s": latency["p50"], "p99_s": latency["p99"],
            "ttft_p50_s": ttft["p50"] / 1000, "ttft_p99_s": ttft["p99"] / 1000,
            "guidellm_output_tokens_per_s_mean": metrics["output_tokens_per_second"]["successful"]["mean"]}


class VllmServer:
    """vLLM's OpenAI server on `model_dir`, on the same cores, from its own virtualenv."""

    def __init__(self, venv: Path, model_dir: Path, threads: int, log_path: Path):
        self.port = free_port()
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
        self.log = open(log_path, "w")
        # The server module, not the `vllm` script: that one asks for the "vllm" distribution's version, and
        # the CPU build's distribution is "vllm-cpu".
        self.process = subprocess.Popen([str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
                                         "--model", str(model_dir), "--port", str(self.port),
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


def venv_version(venv: Path, *dists: str) -> str:
    """The installed version of the first of `dists` found in `venv` ("" when none is)."""
    code = ("from importlib.metadata import version, PackageNotFoundError\n"
            f"for d in {list(dists)!r}:\n"
            "    try:\n        print(version(d)); break\n    except PackageNotFoundError:\n        pass")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", default="smollm2-135m-eagle")
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    parser.add_argument("--clients", default="1,8,16")
    parser.add_argument("--per-client", type=int, default=4, help="requests each client sends per level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=Path, default=HERE / "prompts" / "suite.jsonl")
    parser.add_argument("--vllm-venv", type=Path, default=Path(os.environ.get("SPECD_VLLM_VENV", DEFAULT_VLLM_VENV)),
                        help="vLLM's virtualenv (bench/setup_vllm.sh); its rows are left out when absent")
    parser.add_argument("--guidellm-venv", type=Path,
                        default=Path(os.environ.get("SPECD_GUIDELLM_VENV", DEFAULT_GUIDELLM_VENV)),
                        help="guidellm's virtualenv (bench/setup_guidellm.sh); its rows are left out when absent")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "http")
    parser.add_argument("--results-md", default="", help="write the tables into this RESULTS.md's http section")
    args = parser.parse_args(argv)
    command = "python -m bench.http_load " + " ".join(argv if argv is not None else sys.argv[1:])
    levels = [int(n) for n in args.clients.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    started_s = time.monotonic()

    rows = read_prompts(args.prompts, max(levels) * args.per_client)
    tokenizer = load_tokenizer(args.target)
    prompts = [chat_ids(tokenizer, row["prompt"]) for row in rows]
    plans = {n: plan_level(n, args.per_client, n, len(prompts)) for n in levels}
    # guidellm sends text: the same chat-templated prompts, in the order the clients send them.
    texts = [tokenizer.decode(ids) for ids in prompts]
    level_texts = {n: [texts[plans[n][c][k]] for k in range(len(plans[n][0])) for c in range(n)] for n in levels}
    model_dir = materialise(resolve_source(args.target))  # tokenizer files for guidellm, the model for vLLM
    verifier_threads, drafter_threads = default_threads()
    system = System(SPECD_GRPC, "specd", args.drafter, args.policy)
    timed: dict[str, dict[int, list[Timed]]] = {SPECD_GRPC: {}, SPECD_HTTP: {}}
    tool_rows: dict[str, dict[int, dict]] = {}  # guidellm's, already summarised
    failures: list[str] = []

    guidellm = None
    if Guidellm.installed(args.guidellm_venv):
        work = args.out / "guidellm"
        work.mkdir(exist_ok=True)
        guidellm = Guidellm(args.guidellm_venv, model_dir, work)
    else:
        print(f"no guidellm in {args.guidellm_venv} (bench/setup_guidellm.sh installs it): its rows are left out",
              file=sys.stderr)

    def tool_level(name: str, base_url: str, model: str, n: int) -> None:
        try:
            tool_rows.setdefault(name, {})[n] = guidellm.run_level(base_url, model, name, level_texts[n], n,
                                                                   args.max_tokens)
        except RuntimeError as err:
            failures.append(f"{name} at {n} clients: {err}")
            print(failures[-1], file=sys.stderr, flush=True)

    def progress(n: int, names: list[str]) -> None:
        cells = [f"{name} {level_summary(timed[name][n])['tokens_per_s']:.1f}" for name in names if name in timed]
        cells += [f"{name} {tool_rows[name][n]['tokens_per_s']:.1f}" for name in names
                  if n in tool_rows.get(name, {})]
        print(f"{n} clients: " + ", ".join(cells) + f" tok/s ({time.monotonic() - started_s:.0f}s)",
              file=sys.stderr, flush=True)

    stack = LocalStack(args.target, args.drafter, verifier_threads, drafter_threads, log_dir=str(args.out),
                       coordinator_args=["--policy", args.policy], http=True)
    try:
        stack.start()
        warm = plan_level(1, 1, 1, len(prompts))
        run_specd_level(stack.address, system, prompts, warm, 8)
        for n in levels:  # the rows alternate per level, so drift on a shared machine hits them all
            timed[SPECD_HTTP][n] = run_http_level(stack.http_url, args.target, SPECD_HTTP, prompts, plans[n],
                                                  args.max_tokens, {"speculation": {"policy": args.policy}})
            if guidellm:
                tool_level(SPECD_GUIDELLM, stack.http_url, args.target, n)
            timed[SPECD_GRPC][n] = run_specd_level(stack.address, system, prompts, plans[n], args.max_tokens)
            progress(n, [SPECD_GRPC, SPECD_HTTP, SPECD_GUIDELLM])
    finally:
        stack.stop()

    vllm_version = ""
    if (args.vllm_venv / "bin" / "vllm").exists():
        vllm_version = venv_version(args.vllm_venv, "vllm", "vllm-cpu")
        server = VllmServer(args.vllm_venv, model_dir, verifier_threads, args.out / "vllm.log")
        try:
            server.wait_ready()
            timed[VLLM_HTTP] = {}
            for n in levels:
                timed[VLLM_HTTP][n] = run_http_level(server.base_url, "target", VLLM_HTTP, prompts, plans[n],
                                                     args.max_tokens)
                if guidellm:
                    tool_level(VLLM_GUIDELLM, server.base_url, "target", n)
                progress(n, [VLLM_HTTP, VLLM_GUIDELLM])
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
    summary.update({name: by_level for name, by_level in tool_rows.items() if set(by_level) == set(levels)})
    order = [SPECD_GRPC, SPECD_HTTP, SPECD_GUIDELLM, VLLM_HTTP, VLLM_GUIDELLM]
    summary = {name: summary[name] for name in order if name in summary}
    http_rows = [name for name in (SPECD_HTTP, SPECD_GUIDELLM) if name in summary]
    overhead = {name: {n: 1 - summary[name][n]["tokens_per_s"] / summary[SPECD_GRPC][n]["tokens_per_s"]
                       for n in levels} for name in http_rows}
    tools = {"guidellm": guidellm.version() if guidellm else "", "vllm": vllm_version}
    report = {"command": command, "target": args.target, "drafter": args.drafter, "policy": args.policy,
              "max_tokens": args.max_tokens, "per_client": args.per_client, "tools": tools, "summary": summary,
              "http_overhead": overhead, "token_mismatches": differing, "failures": failures,
              "seconds": round(time.monotonic() - started_s)}
    (args.out / "http_load.json").write_text(json.dumps(report, indent=2))
    requests = ", ".join(f"{n} clients {sum(map(len, plans[n]))}" for n in levels)
    tables = "\n\n".join([
        f"Cells: aggregate output tokens/s; request latency p50 / p99; time to first token p50 / p99. "
        f"{args.max_tokens} new tokens per request (ignore_eos), requests per level: {requests}.",
        markdown_table(summary, levels),
        f"Aggregate tokens/s against {SPECD_GRPC}:",
        ratio_table(summary, levels, [SPECD_GRPC]),
        "HTTP throughput cost against gRPC: " + "; ".join(
            f"{name}: " + ", ".join(f"{n} clients {overhead[name][n]:+.1%}" for n in levels) for name in http_rows)
        + f". HTTP requests whose tokens differ from gRPC's: {len(differing)}."])
    print(tables)
    if args.results_md:
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        used = ", ".join(f"{tool} {version}" for tool, version in tools.items() if version)
        update_results_md(Path(args.results_md), "\n\n".join([
            f"## HTTP API: specd's OpenAI-compatible tier against its gRPC API"
            + (" and vLLM's OpenAI server" if vllm_version else "") + f" on `{args.target}` (generated by `{command}`)",
            f"- Machine: {os.cpu_count()} logical CPUs shared by the clients, the load tools and every service\n"
            f"- Date: {date}\n- specd: drafter {args.drafter}, policy {args.policy}"
            + (f"\n- Tools: {used}" if used else "")
            + f"\n- Prompts: the first {len(prompts)} of the suite with the chat template, as token ids (openai "
              "client, gRPC) or their text (guidellm, concurrent profile, one stream per client)",
            tables]), name="http")
    if failures:
        print(f"{len(failures)} guidellm runs failed: their rows are left out", file=sys.stderr)
    if differing:
        print(f"{len(differing)} HTTP requests returned other tokens than gRPC: {differing[:5]}", file=sys.stderr)
    return 1 if differing or failures else 0


if __name__ == "__main__":
    sys.exit(main())

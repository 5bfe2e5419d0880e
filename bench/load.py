"""Concurrency sweep: aggregate throughput and latency of specd, transformers and vLLM under N clients.

    python -m bench.load                                         # the default sweep (make bench-load)
    python -m bench.load --clients 1,2 --requests 2 --max-new-tokens 8 --out bench/out/load --results-md ''

Per level N, N client threads each send greedy requests (ignore_eos, so every request yields
--max-new-tokens tokens) back to back, after one warm-up request each. Systems, one after another:
- specd target-only and specd with each --drafter (and its --policy), through the public gRPC API
  (SpecdClient against a LocalStack), one client connection per thread;
- transformers' batched `generate` in this process: the N clients' requests as one left-padded batch;
- vLLM's CPU build, when its virtualenv exists (bench/setup_vllm.sh), through bench/vllm_runner.py:
  N requests in flight, continuously batched.
Every system gets the same --threads cores: specd's verifier all of them, its drafter's threads sharing them.
Every output is checked against transformers' unbatched greedy output of the same prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.report import percentile
from specd.results import update_results_md
from specd.stack import LocalStack, default_threads
from specdec.client import SpecdClient
from specdec.config import DEFAULT_POLICY
from specdec.models.conversion import materialise
from specdec.models.loader import load_model
from specdec.models.sources import resolve_source

HERE = Path(__file__).resolve().parent
DEFAULT_VLLM_VENV = Path.home() / ".cache" / "specd" / "vllm-venv"
TARGET_ONLY = "specd target-only"
VLLM = "vllm"
WARMUP_TOKENS = 8


@dataclass(frozen=True)
class System:
    name: str
    kind: str          # specd | hf | vllm
    drafter: str = ""  # specd: a drafter spec, or "none"
    policy: str = ""


@dataclass
class Timed:
    """One request as its client saw it."""
    system: str
    clients: int
    client: int
    prompt: int        # index into the prompt list
    start_s: float     # from the start of the level
    ttft_s: float
    latency_s: float
    token_ids: list[int]


def read_prompts(path: Path, count: int, category: str = "chat") -> list[dict]:
    """The first `count` prompts of `category`, then the file's other prompts in order if it has fewer."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ordered = [r for r in rows if r["category"] == category] + [r for r in rows if r["category"] != category]
    return ordered[:count]


def chat_ids(tokenizer, text: str) -> list[int]:
    """The token ids the coordinator sends its verifier for a user prompt (its chat template)."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


def plan_level(clients: int, per_client: int, minimum: int, prompt_count: int) -> list[list[int]]:
    """Per client, the prompt indices it sends in order. Request i of the level is client i % clients's and
    uses prompt i % prompt_count, so transformers' k-th batch holds the k-th request of every client."""
    rounds = max(per_client, math.ceil(minimum / clients))
    return [[(k * clients + c) % prompt_count for k in range(rounds)] for c in range(clients)]


def level_summary(requests: list[Timed]) -> dict:
    """Aggregate tokens/s over the level's wall time (first send to last reply), latency and TTFT percentiles."""
    wall = max(r.start_s + r.latency_s for r in requests) - min(r.start_s for r in requests)
    tokens = sum(len(r.token_ids) for r in requests)
    latencies, ttfts = [r.latency_s for r in requests], [r.ttft_s for r in requests]
    return {"requests": len(requests), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99)}


def mismatches(requests: list[Timed], reference: dict[int, list[int]], prompt_ids: list[str]) -> list[dict]:
    """Requests whose greedy tokens differ from the unbatched transformers output, with where they part."""
    bad = []
    for r in requests:
        expected = reference[r.prompt]
        if r.token_ids != expected:
            first = next((i for i, (a, b) in enumerate(zip(r.token_ids, expected)) if a != b),
                         min(len(r.token_ids), len(expected)))
            bad.append({"system": r.system, "clients": r.clients, "prompt": prompt_ids[r.prompt],
                        "first_difference": first, "got": r.token_ids[first:first + 4],
                        "expected": expected[first:first + 4]})
    return bad


# -- runners ----------------------------------------------------------------------------------------------

def run_specd_level(address: str, system: System, prompts: list[list[int]], plan: list[list[int]],
                    max_new_tokens: int) -> list[Timed]:
    """N threads, one connection each, sending their requests back to back from a common start."""
    mode = "target_only" if system.drafter == "none" else ""  # "": the coordinator's own (overlapped)
    timed: list[Timed] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(plan))
    started = [0.0]

    def client_loop(client: int) -> None:
        try:
            with SpecdClient(address) as connection:
                # Its own client id: the coordinator caps concurrent requests per client, by peer address otherwise.
                connection.metadata.append(("x-client-id", f"bench-load-{client}"))
                if barrier.wait() == 0:
                    started[0] = time.perf_counter()
                barrier.wait()
                for prompt in plan[client]:
                    tokens: list[int] = []
                    ttft = 0.0
                    start = time.perf_counter()
                    for chunk in connection.stream(token_ids=prompts[prompt], max_new_tokens=max_new_tokens,
                                                   ignore_eos=True, mode=mode, policy=system.policy,
                                                   exclude_from_training=True):
                        if chunk.token_ids and not tokens:
                            ttft = time.perf_counter() - start
                        tokens.extend(chunk.token_ids)
                    timed.append(Timed(system.name, len(plan), client, prompt, start - started[0], ttft,
                                       time.perf_counter() - start, tokens))
        except BaseException as err:  # re-raised in the caller's thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(len(plan))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return timed


def hf_greedy(model, batch: list[list[int]], max_new_tokens: int, pad_id: int) -> tuple[list[list[int]], float]:
    """Left-padded batched greedy generate that ignores EOS; (new tokens per row, seconds to the first token)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    first_token = FirstTokenTimer()
    with torch.inference_mode():
        # eos_token_id=[]: no stop token (None would fall back to the model's generation config).
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=[], pad_token_id=pad_id, streamer=first_token)
    return out[:, width:].tolist(), first_token.seconds()


class FirstTokenTimer:
    """A generate streamer that notes when the first new tokens arrive (its first put() is the prompt)."""

    def __init__(self):
        self.start, self.first, self.puts = time.perf_counter(), 0.0, 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass

    def seconds(self) -> float:
        return self.first - self.start


def run_hf_level(model, name: str, prompts: list[list[int]], plan: list[list[int]], max_new_tokens: int,
                 pad_id: int) -> list[Timed]:
    """Batch k holds the k-th request of every client; the clients wait for their batch together."""
    timed = []
    started = time.perf_counter()
    for k in range(len(plan[0])):
        indices = [queue[k] for queue in plan]
        start = time.perf_counter()
        outputs, ttft = hf_greedy(model, [prompts[i] for i in indices], max_new_tokens, pad_id)
        latency = time.perf_counter() - start
        timed += [Timed(name, len(plan), c, i, start - started, ttft, latency, tokens)
                  for c, (i, tokens) in enumerate(zip(indices, outputs))]
    return timed


def run_vllm(venv: Path, model_dir: Path, prompts: list[list[int]], plans: list[list[list[int]]],
             max_new_tokens: int, threads: int, work: Path) -> tuple[str, list[list[Timed]]]:
    """All levels in one vLLM process in its own virtualenv; (vLLM version, timed requests per level)."""
    job, result = work / "vllm-job.json", work / "vllm-result.json"
    job.write_text(json.dumps({"model": str(model_dir), "prompts": prompts, "max_new_tokens": max_new_tokens,
                               "warmup_tokens": WARMUP_TOKENS, "levels": [{"plan": plan} for plan in plans]}))
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
    with open(work / "vllm.log", "w") as log:
        code = subprocess.run([str(venv / "bin" / "python"), str(HERE / "vllm_runner.py"), str(job), str(result)],
                              env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f"bench/vllm_runner.py exited with {code}; see {work / 'vllm.log'}")
    data = json.loads(result.read_text())
    levels = [[Timed(VLLM, level["clients"], r["client"], r["prompt"], r["start_s"], r["ttft_s"], r["latency_s"],
                     r["token_ids"]) for r in level["requests"]] for level in data["levels"]]
    return data["vllm_version"], levels


# -- report -----------------------------------------------------------------------------------------------

def markdown_table(summary: dict[str, dict[int, dict]], levels: list[int]) -> str:
    head = "| system | " + " | ".join(f"{n} client{'s' if n > 1 else ''}" for n in levels) + " |"
    lines = [head, "|---" * (len(levels) + 1) + "|"]
    for system, by_level in summary.items():
        cells = []
        for n in levels:
            s = by_level[n]
            cells.append(f"**{s['tokens_per_s']:.1f}** tok/s; {s['p50_s']:.2f} / {s['p99_s']:.2f} s; "
                         f"TTFT {s['ttft_p50_s']:.2f} / {s['ttft_p99_s']:.2f} s")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(summary: dict[str, dict[int, dict]], levels: list[int], baselines: list[str]) -> str:
    """Aggregate tokens/s of every system divided by each baseline's, per level."""
    baselines = [b for b in baselines if b in summary]
    head = "| system | " + " | ".join(f"{n} client{'s' if n > 1 else ''}" for n in levels) + " |"
    lines = [head, "|---" * (len(levels) + 1) + "|"]
    for system, by_level in summary.items():
        cells = [" / ".join(f"{by_level[n]['tokens_per_s'] / summary[b][n]['tokens_per_s']:.2f}x" for b in baselines)
                 for n in levels]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_table(summary: dict[str, dict[int, dict]], levels: list[int], bad: list[dict], meta: dict) -> str:
    """The legend, both tables and the greedy check, as table.md and RESULTS.md show them."""
    baselines = [b for b in (VLLM, TARGET_ONLY) if b in summary]
    specd_bad = [m for m in bad if m["system"].startswith("specd")]
    listed = "".join(f"\n- {m['system']} at {m['clients']} clients, {m['prompt']}: token {m['first_difference']} is "
                     f"{m['got']}, expected {m['expected']}" for m in bad)
    return "\n\n".join([
        f"Cells: aggregate tokens/s; request latency p50 / p99; time to first token p50 / p99. "
        f"{meta['max_new_tokens']} new tokens per request (ignore_eos), requests per level: "
        + ", ".join(f"{n} clients {meta['requests_per_level'][n]}" for n in levels) + ".",
        markdown_table(summary, levels),
        f"Aggregate tokens/s against {' / '.join(baselines)}:",
        ratio_table(summary, levels, baselines),
        f"Greedy mismatches against transformers' unbatched output: {len(bad)} ({len(specd_bad)} of them specd's)"
        + (f"\n{listed}" if bad else "")])


def plot(summary: dict[str, dict[int, dict]], levels: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (throughput, latency) = plt.subplots(1, 2, figsize=(12, 4.5))
    for system, by_level in summary.items():
        throughput.plot(levels, [by_level[n]["tokens_per_s"] for n in levels], marker="o", label=system)
        latency.plot(levels, [by_level[n]["p50_s"] for n in levels], marker="o", label=system)
    for axis, label in ((throughput, "aggregate tokens/s"), (latency, "p50 request latency (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(n) for n in levels])
        axis.set_xlabel("concurrent clients")
        axis.set_yscale("log" if axis is latency else "linear")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    throughput.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine(threads: int) -> str:
    """Logical CPUs, physical cores and the threads each system got; no CPU model name."""
    cores = set()
    try:
        physical = core = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                physical = value.strip()
            elif key.strip() == "core id":
                core = value.strip()
                cores.add((physical, core))
    except OSError:
        pass
    return (f"{os.cpu_count()} logical CPUs, {len(cores) or '?'} physical cores, {platform.system()} "
            f"{platform.release()}, torch {torch.__version__}, {threads} thread(s) per system")


# -- main -------------------------------------------------------------------------------------------------

def build_systems(drafters: list[str], policies: list[str], with_vllm: bool) -> list[System]:
    """Target-only first, then one specd row per drafter with its policy (the i-th --policy, else the default)."""
    systems = [System(TARGET_ONLY, "specd", "none", "")]
    for i, drafter in enumerate(drafters):
        policy = policies[i] if i < len(policies) else DEFAULT_POLICY
        if drafter != "none":  # target-only runs anyway
            systems.append(System(f"specd [{drafter}, {policy}]", "specd", drafter, policy))
    systems.append(System("transformers batched generate", "hf"))
    if with_vllm:
        systems.append(System(VLLM, "vllm"))
    return systems


@dataclass(frozen=True)
class Sweep:
    """What every system runs: the same prompts, per level the same plan, tokens and cores."""
    target: str
    model: torch.nn.Module     # the target in this process: transformers' rows and the reference outputs
    pad_id: int
    prompts: list[list[int]]
    plans: dict[int, list[list[int]]]  # by number of clients
    max_new_tokens: int
    threads: int
    threads_drafter: int
    threads_verifier: int      # 0: --threads
    vllm_venv: Path
    work: Path                 # service logs and vLLM's job files


def run_system(sweep: Sweep, system: System) -> tuple[dict[int, list[Timed]], str]:
    """Every level of one system, each after its warm-up (one short request per client);
    (timed requests by level, the vLLM version for vLLM's row)."""
    levels = list(sweep.plans)
    warmups = {n: [queue[:1] for queue in plan] for n, plan in sweep.plans.items()}
    if system.kind == "vllm":
        version, per_level = run_vllm(sweep.vllm_venv, materialise(resolve_source(sweep.target)), sweep.prompts,
                                      list(sweep.plans.values()), sweep.max_new_tokens, sweep.threads, sweep.work)
        return dict(zip(levels, per_level)), version
    if system.kind == "hf":
        timed = {}
        for n in levels:
            run_hf_level(sweep.model, system.name, sweep.prompts, warmups[n], WARMUP_TOKENS, sweep.pad_id)
            timed[n] = run_hf_level(sweep.model, system.name, sweep.prompts, sweep.plans[n], sweep.max_new_tokens,
                                    sweep.pad_id)
        return timed, ""
    target_only = system.drafter == "none"
    drafter_threads = 0 if target_only else sweep.threads_drafter
    stack = LocalStack(sweep.target, system.drafter, threads_verifier=sweep.threads_verifier or sweep.threads,
                       threads_drafter=max(1, drafter_threads), log_dir=str(sweep.work),
                       coordinator_args=["--mode", "target_only"] if target_only else None)
    try:
        address = stack.start(timeout_s=600)
        timed = {}
        for n in levels:
            run_specd_level(address, system, sweep.prompts, warmups[n], WARMUP_TOKENS)
            timed[n] = run_specd_level(address, system, sweep.prompts, sweep.plans[n], sweep.max_new_tokens)
        return timed, ""
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", action="append",
                        help="ngram, a preset or a drafter model directory (repeatable; default: ngram and "
                             "smollm2-135m-eagle); target-only always runs")
    parser.add_argument("--policy", action="append", default=[],
                        help=f"policy of the drafter at the same position (default {DEFAULT_POLICY}, as `specd up`)")
    parser.add_argument("--clients", default="1,2,4,8,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=2, help="requests per client per level")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--prompts", default=str(HERE / "prompts" / "suite.jsonl"))
    parser.add_argument("--prompt-count", type=int, default=16, help="chat prompts first, then the file's others")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores each system gets")
    parser.add_argument("--threads-drafter", type=int, default=default_threads()[1],
                        help="specd's drafter's threads, sharing the cores (default as `specd up`)")
    parser.add_argument("--threads-verifier", type=int, default=0,
                        help="specd's verifier's threads (default --threads, as `specd up`)")
    parser.add_argument("--vllm-venv", default=os.environ.get("SPECD_VLLM_VENV", str(DEFAULT_VLLM_VENV)),
                        help="vLLM's virtualenv (bench/setup_vllm.sh); its row is left out when absent")
    parser.add_argument("--out", default=str(HERE / "results" / "load"))
    parser.add_argument("--results-md", default=str(HERE / "RESULTS.md"), help="'' leaves RESULTS.md alone")
    args = parser.parse_args(argv)

    levels = [int(n) for n in args.clients.split(",") if n]
    drafters = args.drafter or ["ngram", "smollm2-135m-eagle"]
    venv = Path(args.vllm_venv)
    with_vllm = (venv / "bin" / "python").exists()
    if not with_vllm:
        print(f"bench.load: no vLLM virtualenv at {venv} (bench/setup_vllm.sh makes one); its row is left out",
              file=sys.stderr)
    systems = build_systems(drafters, args.policy, with_vllm)
    command = "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    target = load_model(args.target)
    tokenizer = target.tokenizer
    rows = read_prompts(Path(args.prompts), args.prompt_count)
    prompt_names = [row["id"] for row in rows]
    prompts = [chat_ids(tokenizer, row["prompt"]) for row in rows]
    plans = {n: plan_level(n, args.requests, args.min_requests, len(prompts)) for n in levels}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else target.eos_token_ids[0]

    started = time.monotonic()
    used = sorted({i for plan in plans.values() for queue in plan for i in queue})
    reference = {i: hf_greedy(target.model, [prompts[i]], args.max_new_tokens, pad_id)[0][0] for i in used}
    print(f"reference outputs of {len(used)} prompts, {time.monotonic() - started:.0f}s", flush=True)

    sweep = Sweep(args.target, target.model, pad_id, prompts, plans, args.max_new_tokens, args.threads,
                  args.threads_drafter, args.threads_verifier, venv, Path(tempfile.mkdtemp(prefix="specd-load-")))
    timed: dict[str, dict[int, list[Timed]]] = {}
    vllm_version = ""
    for system in systems:
        timed[system.name], version = run_system(sweep, system)
        vllm_version = version or vllm_version
        for n in levels:
            s = level_summary(timed[system.name][n])
            print(f"{system.name}: {n} clients {s['tokens_per_s']:.1f} tok/s, p50 {s['p50_s']:.2f}s, "
                  f"TTFT p50 {s['ttft_p50_s']:.2f}s ({time.monotonic() - started:.0f}s)", flush=True)

    summary = {name: {n: level_summary(by_level[n]) for n in levels} for name, by_level in timed.items()}
    every = [r for by_level in timed.values() for requests in by_level.values() for r in requests]
    bad = mismatches(every, reference, prompt_names)
    specd_bad = [m for m in bad if m["system"].startswith("specd")]
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    meta = {"command": command, "machine": machine(args.threads), "date": date, "target": args.target,
            "systems": [asdict(s) for s in systems], "clients": levels, "max_new_tokens": args.max_new_tokens,
            "prompts": prompt_names, "requests_per_level": {n: sum(map(len, plans[n])) for n in levels},
            "threads": args.threads, "threads_drafter": args.threads_drafter,
            "threads_verifier": args.threads_verifier or args.threads, "vllm_version": vllm_version,
            "seconds": round(time.monotonic() - started)}
    (out / "results.json").write_text(json.dumps({
        "meta": meta, "summary": summary, "mismatches": bad,
        "requests": [asdict(r) for r in every]}, indent=1))
    title = (f"{args.target}: greedy, {args.max_new_tokens} tokens per request, {args.threads} thread(s) per system "
             f"({date})")
    plot(summary, levels, out / "load.png", title)
    table = report_table(summary, levels, bad, meta)
    (out / "table.md").write_text(table + "\n")
    print(table)
    if args.results_md:
        results_md = Path(args.results_md)
        image = os.path.relpath(out / "load.png", results_md.parent)
        update_results_md(results_md, "\n\n".join([
            f"## Load: concurrent clients on `{args.target}` (generated by `{command}`)",
            f"- Machine: {meta['machine']}\n- Date: {date}\n- Systems, one after another: "
            + ", ".join(s.name for s in systems) + (f" (vLLM {vllm_version}, CPU build)" if vllm_version else "")
            + f"; prompts: the first {len(prompts)} of the suite, chat first, with the chat template; each client "
            f"sends its requests back to back after one warm-up.",
            table, f"![load]({image})"]), name="load")
    if specd_bad:
        print(f"GREEDY MISMATCH in specd: {specd_bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

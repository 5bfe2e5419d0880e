"""Concurrency sweep: aggregate throughput and latency of specd, transformers and vLLM under N clients.

    python -m bench.load                                         # the default sweep (make bench-load)
    python -m bench.load --workloads grounded --drafter ngram    # one workload, one drafter
    python -m bench.load --clients 1,2 --requests 2 --max-new-tokens 8 --out bench/out/load --results-md ''

Workloads (--workloads, default chat,grounded), each with its own prompts and new-token count
(--max-new-tokens overrides both):
- chat: the suite's chat prompts, 48 new tokens;
- grounded: the suite's grounded prompts (a quoted passage to summarise, rewrite or extract from), then
  its code prompts that quote a snippet to change or explain; 96 new tokens.
Per workload and level N, N client threads each send greedy requests (ignore_eos, so every request
yields the workload's token count) back to back, after one warm-up request each. Systems, one after another,
each started once and running every workload in turn, as a deployment sees them (the verifier's measured
pass costs and the coordinator's learned state carry from one workload to the next):
- specd target-only and specd with each --drafter (and its --policy), through the public gRPC API
  (SpecdClient against a LocalStack), one client connection per thread;
- transformers' batched `generate` in this process: the N clients' requests as one left-padded batch;
- vLLM's CPU build, when its virtualenv exists (bench/setup_vllm.sh), through bench/vllm_runner.py:
  N requests in flight, continuously batched, Intel OpenMP preloaded as its CPU guide says; plain, and
  with its n-gram speculation (--vllm-ngram).
Every system gets the same --threads cores: specd's verifier all of them, its drafter's threads sharing them.
Every output is checked against transformers' unbatched greedy output of the same prompt and token count.
Writes --out/<workload>/{results.json,table.md,load.png}, --out/speedup.png (each specd speculative
row's tokens/s over target-only's) and RESULTS.md sections load-<workload> and load-speedup.
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
LOOKUP_ONLY = "lookup"  # a specd row with no drafter service: the coordinator's own prompt lookup drafts
VLLM = "vllm"
VLLM_NGRAM_CONFIG = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
VLLM_NGRAM = f"vllm n-gram (k={VLLM_NGRAM_CONFIG['num_speculative_tokens']})"
WARMUP_TOKENS = 8


@dataclass(frozen=True)
class System:
    name: str
    kind: str          # specd | hf | vllm
    drafter: str = ""  # specd: a drafter spec, "none" (target-only) or LOOKUP_ONLY; vllm: "ngram" or ""
    policy: str = ""


@dataclass(frozen=True)
class Workload:
    name: str
    category: str                # the suite's category its prompts come from
    fill_from: tuple[str, ...]   # categories that fill in next when it has fewer than --prompt-count
    max_new_tokens: int          # its default; --max-new-tokens overrides


WORKLOADS = {"chat": Workload("chat", "chat", (), 48),
             "grounded": Workload("grounded", "grounded", ("code",), 96)}


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


def quotes_snippet(row: dict) -> bool:
    return "```" in row["prompt"]


def read_prompts(path: Path, count: int, category: str = "chat", fill_from: tuple[str, ...] = ()) -> list[dict]:
    """The first `count` prompts of `category`; if it has fewer, then those of `fill_from` (per category, the
    ones quoting a fenced snippet first), then the file's others in order."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ordered = [r for r in rows if r["category"] == category]
    for fill in fill_from:
        matching = [r for r in rows if r["category"] == fill]
        ordered += [r for r in matching if quotes_snippet(r)] + [r for r in matching if not quotes_snippet(r)]
    ordered += [r for r in rows if r not in ordered]
    return ordered[:count]


def workload_prompts(path: Path, count: int, workload: Workload) -> list[dict]:
    return read_prompts(path, count, workload.category, workload.fill_from)


def prompt_legend(rows: list[dict], workload: Workload) -> str:
    """The prompts' categories in order, e.g. `12 grounded, then 4 code prompts of the suite`."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["category"]] = counts.get(row["category"], 0) + 1
    filled = [c for c in workload.fill_from if c in counts]
    return (", then ".join(f"{count} {category}" for category, count in counts.items()) + " prompts of the suite"
            + (f" ({', '.join(filled)}: those quoting a snippet first)" if filled else ""))


def workload_tokens(workload: Workload, max_new_tokens: int | None) -> int:
    """--max-new-tokens when given, else the workload's own count."""
    return workload.max_new_tokens if max_new_tokens is None else max_new_tokens


def parse_workloads(text: str) -> list[Workload]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        raise ValueError(f"unknown workload(s) {unknown or text!r}; known: {', '.join(WORKLOADS)}")
    return [WORKLOADS[name] for name in names]


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


def run_vllm(venv: Path, model_dir: Path, system: System, runs: list[WorkloadRun], threads: int,
             work: Path) -> tuple[str, dict[str, list[list[Timed]]]]:
    """Every workload's levels in one vLLM process in its own virtualenv;
    (vLLM version, timed requests per level by workload)."""
    slug = "ngram" if system.drafter == "ngram" else "plain"
    job, result, log_path = (work / f"vllm-{slug}-{name}" for name in ("job.json", "result.json", "log.txt"))
    spec = {"speculative_config": VLLM_NGRAM_CONFIG} if system.drafter == "ngram" else {}
    workloads = [{"name": run.workload.name, "prompts": run.prompts, "max_new_tokens": run.max_new_tokens,
                  "levels": [{"plan": plan} for plan in run.plans.values()]} for run in runs]
    job.write_text(json.dumps({"name": system.name, "model": str(model_dir), "warmup_tokens": WARMUP_TOKENS,
                               **spec, "workloads": workloads}))
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
    iomp = venv / "lib" / "libiomp5.so"
    if iomp.exists():  # Intel OpenMP preloaded, as vLLM's CPU install guide sets up (its speculation needs it)
        env["LD_PRELOAD"] = " ".join(filter(None, [str(iomp), os.environ.get("LD_PRELOAD", "")]))
    with open(log_path, "w") as log:
        code = subprocess.run([str(venv / "bin" / "python"), str(HERE / "vllm_runner.py"), str(job), str(result)],
                              env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f"bench/vllm_runner.py exited with {code}; see {log_path}")
    data = json.loads(result.read_text())
    timed = {workload["name"]: [[Timed(system.name, level["clients"], r["client"], r["prompt"], r["start_s"],
                                       r["ttft_s"], r["latency_s"], r["token_ids"]) for r in level["requests"]]
                                for level in workload["levels"]]
             for workload in data["workloads"]}
    return data["vllm_version"], timed


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


def speedups(summary: dict[str, dict[int, dict]], levels: list[int],
             baseline: str = TARGET_ONLY) -> dict[str, dict[int, float]]:
    """Per specd speculative row and level, its aggregate tokens/s over the baseline's."""
    return {name: {n: by_level[n]["tokens_per_s"] / summary[baseline][n]["tokens_per_s"] for n in levels}
            for name, by_level in summary.items() if name.startswith("specd") and name != baseline}


def report_table(summary: dict[str, dict[int, dict]], levels: list[int], bad: list[dict], meta: dict) -> str:
    """The legend, the tables (one ratio table per baseline present) and the greedy check, as table.md and
    RESULTS.md show them."""
    baselines = [b for b in (TARGET_ONLY, VLLM, VLLM_NGRAM) if b in summary]
    specd_bad = [m for m in bad if m["system"].startswith("specd")]
    listed = "".join(f"\n- {m['system']} at {m['clients']} clients, {m['prompt']}: token {m['first_difference']} is "
                     f"{m['got']}, expected {m['expected']}" for m in bad)
    ratios = [part for b in baselines
              for part in (f"Aggregate tokens/s against {b}:", ratio_table(summary, levels, [b]))]
    return "\n\n".join([
        f"Cells: aggregate tokens/s; request latency p50 / p99; time to first token p50 / p99. "
        f"{meta['max_new_tokens']} new tokens per request (ignore_eos), requests per level: "
        + ", ".join(f"{n} clients {meta['requests_per_level'][n]}" for n in levels) + ".",
        markdown_table(summary, levels),
        *ratios,
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


LINE_STYLES = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}


def plot_speedup(by_workload: dict[str, dict[str, dict[int, float]]], levels: list[int], path: Path,
                 title: str) -> None:
    """One line per specd speculative row and workload (a colour per row, a line style per workload)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 4.5))
    colours = {}
    for style, (workload, rows) in zip(list(LINE_STYLES) * len(by_workload), by_workload.items()):
        for system, by_level in rows.items():
            colour = colours.setdefault(system, f"C{len(colours)}")
            axis.plot(levels, [by_level[n] for n in levels], marker="o", linestyle=style, color=colour,
                      label=f"{system}, {workload}")
    axis.axhline(1.0, color="black", linewidth=1)
    axis.set_xscale("log", base=2)
    axis.set_xticks(levels, [str(n) for n in levels])
    axis.set_xlabel("concurrent clients")
    axis.set_ylabel(f"aggregate tokens/s over {TARGET_ONLY}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
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

def build_systems(drafters: list[str], policies: list[str], with_vllm: bool, vllm_ngram: bool = False,
                  with_transformers: bool = True) -> list[System]:
    """Target-only first, then one specd row per drafter with its policy (the i-th --policy, else the default),
    then the baselines: transformers, vLLM and (vllm_ngram) vLLM with its n-gram speculation."""
    systems = [System(TARGET_ONLY, "specd", "none", "")]
    for i, drafter in enumerate(drafters):
        policy = policies[i] if i < len(policies) else DEFAULT_POLICY
        if drafter != "none":  # target-only runs anyway
            systems.append(System(f"specd [{drafter}, {policy}]", "specd", drafter, policy))
    if with_transformers:
        systems.append(System("transformers batched generate", "hf"))
    if with_vllm:
        systems.append(System(VLLM, "vllm"))
        if vllm_ngram:
            systems.append(System(VLLM_NGRAM, "vllm", "ngram"))
    return systems


@dataclass(frozen=True)
class WorkloadRun:
    """One workload as every system runs it: the same prompts, per level the same plan and token count."""
    workload: Workload
    prompt_names: list[str]
    legend: str                        # which prompts, for the report
    prompts: list[list[int]]
    plans: dict[int, list[list[int]]]  # by number of clients
    max_new_tokens: int


@dataclass(frozen=True)
class Sweep:
    """What every system runs: the workloads, on the same cores."""
    target: str
    model: torch.nn.Module     # the target in this process: transformers' rows and the reference outputs
    pad_id: int
    runs: list[WorkloadRun]
    threads: int
    threads_drafter: int
    threads_verifier: int      # 0: --threads
    vllm_venv: Path
    work: Path                 # service logs and vLLM's job files


def warmups(run: WorkloadRun) -> dict[int, list[list[int]]]:
    """Per level, one request per client."""
    return {n: [queue[:1] for queue in plan] for n, plan in run.plans.items()}


def vllm_installed(venv: Path) -> bool:
    """The virtualenv has a Python and a vllm package (not one whose install is still under way)."""
    return (venv / "bin" / "python").exists() and any(venv.glob("lib/python*/site-packages/vllm/__init__.py"))


def run_system(sweep: Sweep, system: System) -> tuple[dict[str, dict[int, list[Timed]]], str]:
    """Every workload's levels on one start of the system, each level after its warm-up;
    (timed requests by workload and level, the vLLM version for vLLM's rows)."""
    if system.kind == "vllm":
        version, per_workload = run_vllm(sweep.vllm_venv, materialise(resolve_source(sweep.target)), system,
                                         sweep.runs, sweep.threads, sweep.work)
        timed = {run.workload.name: dict(zip(run.plans, per_workload[run.workload.name])) for run in sweep.runs}
        return timed, version
    if system.kind == "hf":
        timed = {}
        for run in sweep.runs:
            timed[run.workload.name] = {}
            for n, plan in run.plans.items():
                run_hf_level(sweep.model, system.name, run.prompts, warmups(run)[n], WARMUP_TOKENS, sweep.pad_id)
                timed[run.workload.name][n] = run_hf_level(sweep.model, system.name, run.prompts, plan,
                                                           run.max_new_tokens, sweep.pad_id)
        return timed, ""
    target_only = system.drafter == "none"
    service = "none" if system.drafter == LOOKUP_ONLY else system.drafter
    drafter_threads = 0 if service == "none" else sweep.threads_drafter
    stack = LocalStack(sweep.target, service, threads_verifier=sweep.threads_verifier or sweep.threads,
                       threads_drafter=max(1, drafter_threads), log_dir=str(sweep.work),
                       coordinator_args=["--mode", "target_only"] if target_only else None)
    try:
        address = stack.start(timeout_s=600)
        timed = {}
        for run in sweep.runs:
            timed[run.workload.name] = {}
            for n, plan in run.plans.items():
                run_specd_level(address, system, run.prompts, warmups(run)[n], WARMUP_TOKENS)
                timed[run.workload.name][n] = run_specd_level(address, system, run.prompts, plan,
                                                              run.max_new_tokens)
        return timed, ""
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", action="append",
                        help=f"ngram, a preset, a drafter model directory, or {LOOKUP_ONLY!r} (no drafter service: "
                             "the coordinator's prompt lookup alone) (repeatable; default: ngram and "
                             "smollm2-135m-eagle); target-only always runs")
    parser.add_argument("--policy", action="append", default=[],
                        help=f"policy of the drafter at the same position (default {DEFAULT_POLICY}, as `specd up`)")
    parser.add_argument("--workloads", default="chat,grounded",
                        help=f"comma-separated, run in this order on each system ({', '.join(WORKLOADS)})")
    parser.add_argument("--clients", default="1,2,4,8,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=2, help="requests per client per level")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="per request, every workload (default: the workload's own, " + ", ".join(
                            f"{w.name} {w.max_new_tokens}" for w in WORKLOADS.values()) + ")")
    parser.add_argument("--prompts", default=str(HERE / "prompts" / "suite.jsonl"))
    parser.add_argument("--prompt-count", type=int, default=16,
                        help="prompts per workload: its category first, then its fill-in categories, then the others")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores each system gets")
    parser.add_argument("--threads-drafter", type=int, default=default_threads()[1],
                        help="specd's drafter's threads, sharing the cores (default as `specd up`)")
    parser.add_argument("--threads-verifier", type=int, default=0,
                        help="specd's verifier's threads (default --threads, as `specd up`)")
    parser.add_argument("--vllm-venv", default=os.environ.get("SPECD_VLLM_VENV", str(DEFAULT_VLLM_VENV)),
                        help="vLLM's virtualenv (bench/setup_vllm.sh); its rows are left out when absent")
    parser.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                        help="transformers' batched generate row (slow; the greedy reference is computed either way)")
    parser.add_argument("--vllm-ngram", action=argparse.BooleanOptionalAction, default=True,
                        help=f"also vLLM with n-gram speculation ({VLLM_NGRAM_CONFIG}), when vLLM is present")
    parser.add_argument("--out", default=str(HERE / "results" / "load"))
    parser.add_argument("--results-md", default=str(HERE / "RESULTS.md"), help="'' leaves RESULTS.md alone")
    args = parser.parse_args(argv)
    try:
        workloads = parse_workloads(args.workloads)
    except ValueError as err:
        parser.error(str(err))

    levels = [int(n) for n in args.clients.split(",") if n]
    drafters = args.drafter or ["ngram", "smollm2-135m-eagle"]
    venv = Path(args.vllm_venv)
    with_vllm = vllm_installed(venv)
    if not with_vllm:
        print(f"bench.load: no vLLM installed in {venv} (bench/setup_vllm.sh installs it); its rows are left out",
              file=sys.stderr)
    systems = build_systems(drafters, args.policy, with_vllm, args.vllm_ngram, args.transformers)
    command = "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)

    torch.set_num_threads(args.threads)
    target = load_model(args.target)
    tokenizer = target.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else target.eos_token_ids[0]
    started = time.monotonic()
    runs, references = [], {}
    for workload in workloads:
        rows = workload_prompts(Path(args.prompts), args.prompt_count, workload)
        prompts = [chat_ids(tokenizer, row["prompt"]) for row in rows]
        run = WorkloadRun(workload, [row["id"] for row in rows], prompt_legend(rows, workload), prompts,
                          {n: plan_level(n, args.requests, args.min_requests, len(prompts)) for n in levels},
                          workload_tokens(workload, args.max_new_tokens))
        used = sorted({i for plan in run.plans.values() for queue in plan for i in queue})
        references[workload.name] = {i: hf_greedy(target.model, [prompts[i]], run.max_new_tokens, pad_id)[0][0]
                                     for i in used}
        runs.append(run)
        print(f"{workload.name}: reference outputs of {len(used)} prompts, {time.monotonic() - started:.0f}s",
              flush=True)

    sweep = Sweep(args.target, target.model, pad_id, runs, args.threads, args.threads_drafter,
                  args.threads_verifier, venv, Path(tempfile.mkdtemp(prefix="specd-load-")))
    timed: dict[str, dict[str, dict[int, list[Timed]]]] = {run.workload.name: {} for run in runs}
    vllm_version = ""
    for system in systems:
        by_workload, version = run_system(sweep, system)
        vllm_version = version or vllm_version
        for name, by_level in by_workload.items():
            timed[name][system.name] = by_level
            for n in levels:
                s = level_summary(by_level[n])
                print(f"{system.name} [{name}]: {n} clients {s['tokens_per_s']:.1f} tok/s, p50 {s['p50_s']:.2f}s, "
                      f"TTFT p50 {s['ttft_p50_s']:.2f}s ({time.monotonic() - started:.0f}s)", flush=True)

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results_md = Path(args.results_md) if args.results_md else None
    specd_bad, speedup = [], {}
    for run in runs:
        name = run.workload.name
        directory = out / name
        directory.mkdir(parents=True, exist_ok=True)
        summary = {system: {n: level_summary(by_level[n]) for n in levels} for system, by_level in timed[name].items()}
        speedup[name] = speedups(summary, levels)
        every = [r for by_level in timed[name].values() for requests in by_level.values() for r in requests]
        bad = mismatches(every, references[name], run.prompt_names)
        specd_bad += [{"workload": name, **m} for m in bad if m["system"].startswith("specd")]
        meta = {"command": command, "machine": machine(args.threads), "date": date, "target": args.target,
                "workload": asdict(run.workload), "systems": [asdict(s) for s in systems], "clients": levels,
                "max_new_tokens": run.max_new_tokens, "prompts": run.prompt_names,
                "requests_per_level": {n: sum(map(len, run.plans[n])) for n in levels},
                "threads": args.threads, "threads_drafter": args.threads_drafter,
                "threads_verifier": args.threads_verifier or args.threads, "vllm_version": vllm_version,
                "vllm_ngram_config": VLLM_NGRAM_CONFIG if any(s.name == VLLM_NGRAM for s in systems) else None,
                "seconds": round(time.monotonic() - started)}
        (directory / "results.json").write_text(json.dumps({
            "meta": meta, "summary": summary, "speedup_over_target_only": speedup[name], "mismatches": bad,
            "requests": [asdict(r) for r in every]}, indent=1))
        plot(summary, levels, directory / "load.png",
             f"{args.target}, {name}: greedy, {run.max_new_tokens} tokens per request, {args.threads} thread(s) "
             f"per system ({date})")
        table = report_table(summary, levels, bad, meta)
        (directory / "table.md").write_text(table + "\n")
        print(f"\n{name}:\n{table}")
        if results_md:
            image = os.path.relpath(directory / "load.png", results_md.parent)
            in_turn = (f", each running the workloads {', '.join(r.workload.name for r in runs)} in turn"
                       if len(runs) > 1 else "")
            update_results_md(results_md, "\n\n".join([
                f"## Load, {name} workload: concurrent clients on `{args.target}` (generated by `{command}`)",
                f"- Machine: {meta['machine']}\n- Date: {date}\n- Systems, one after another{in_turn}: "
                + ", ".join(s.name for s in systems) + (f" (vLLM {vllm_version}, CPU build)" if vllm_version else "")
                + f"\n- Prompts: {run.legend}, with the chat template; each client sends its requests "
                f"back to back after one warm-up.",
                table, f"![load, {name}]({image})"]), name=f"load-{name}")

    styles = ", ".join(f"{style} {run.workload.name}" for style, run in zip(LINE_STYLES.values(), runs))
    plot_speedup(speedup, levels, out / "speedup.png",
                 f"{args.target}: specd's speculative rows over target-only ({date})")
    if results_md:
        update_results_md(results_md, "\n\n".join([
            f"## Load: specd's speculative rows over target-only on `{args.target}` (generated by `{command}`)",
            f"Aggregate tokens/s of each speculative row divided by {TARGET_ONLY}'s at the same level; {styles}.",
            f"![load speedup]({os.path.relpath(out / 'speedup.png', results_md.parent)})"]), name="load-speedup")
    if specd_bad:
        print(f"GREEDY MISMATCH in specd: {specd_bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Single-stream speed on a GGUF target: specd's rows and llama.cpp's on the same file, in the same run.

    python -m bench.single_stream --results-md bench/RESULTS.md        # every system, both workloads
    python -m bench.single_stream --workloads code-edit --systems target-only,lookup,llama,llama-lookup
    python -m bench.single_stream --prompts-per-workload 1 --max-new-tokens 16 --systems target-only,lookup \\
        --out /tmp/single-stream --results-md ''

One client, one request at a time, greedy, --max-new-tokens new tokens per request (ignore_eos), every prompt
through the target's chat template. Workloads (--workloads, default chat,code-edit):
- chat: the suite's chat prompts (bench/prompts/suite.jsonl), short questions;
- code-edit: bench/prompts/code_edit.jsonl, each quoting 250-500 tokens of Python or JavaScript and asking for it
  changed (rename, add a parameter, fix a bug, add type hints, rewrite loops, switch to logging), so the answer
  copies much of the quote.
Systems (--systems, default all), each started once before the first request, each with --threads cores:
- target-only: specd with no drafter service, coordinator --mode target_only;
- lookup: specd with no drafter service: the coordinator's own prompt lookup, policy marginal;
- draft: specd with the --drafter service and the coordinator's lookup, policy marginal (the drafter's threads,
  --threads-drafter, share the cores);
- llama: llama-server on the target GGUF (-t --threads, -c 4096, one slot), its native /completion endpoint with
  the same token ids, streamed;
- llama-draft: the same with the --drafter GGUF as its draft model (at most 8, at least 1 token a round);
- llama-lookup: the same with its prompt-lookup speculation (--llama-lookup-args, default ngram-simple).
llama.cpp is the build of bench/setup_llamacpp.sh, found where bench.verify_cost finds llama-bench
($SPECD_LLAMACPP_DIR); a llama.cpp row whose binary, model file or option is missing is skipped, the reason printed.
Every system gets one warm-up request (a prompt of its own); then each prompt goes to every system in turn, the
order rotating by one system from prompt to prompt, so drift on a shared machine hits every system alike. No KV is
reused between requests (specd's verifier prefix caching off, llama.cpp's cache_prompt false) unless --prompt-cache.
Tokens/s of a request: its new tokens over the time from sending it to its last token arriving, as the client sees
it (specd: the gRPC stream; llama.cpp: the HTTP stream); beside it each system's own figure (specd's stats
tokens_per_s, llama.cpp's decode-only predicted_per_second). specd's speculative rows must give specd
target-only's tokens exactly (counted, exit 1 otherwise); llama.cpp's tokens are compared for information only,
its numerics differ from specd's.
Writes --out/{results.json,table.md} and, with --results-md, the RESULTS.md section single-stream-<target>.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from bench.load import chat_ids, machine
from bench.verify_cost import LLAMA_BENCH
from specd.results import update_results_md
from specd.stack import LocalStack, exit_on_sigterm, free_port
from specdec.client import SpecdClient
from specdec.models.sources import ModelLoadError, load_tokenizer, resolve_source
from specdec.wire.client import stats_dict

HERE = Path(__file__).resolve().parent
LLAMACPP_BIN = LLAMA_BENCH.parent  # llama.cpp's tools sit beside llama-bench
POLICY = "marginal"
WARMUP_TOKENS = 8
WARMUP_PROMPT = "Say hello in one short sentence."  # not a measured prompt: nothing of it is cached for them
LLAMA_CONTEXT = 4096
LLAMA_DRAFT_MAX, LLAMA_DRAFT_MIN = 8, 1
LLAMA_LOOKUP_ARGS = "--spec-type ngram-simple"

TARGET_ONLY, LOOKUP, DRAFT = "target-only", "lookup", "draft"
LLAMA, LLAMA_DRAFT, LLAMA_LOOKUP = "llama", "llama-draft", "llama-lookup"
SYSTEMS = (TARGET_ONLY, LOOKUP, DRAFT, LLAMA, LLAMA_DRAFT, LLAMA_LOOKUP)
SPECD_SYSTEMS = (TARGET_ONLY, LOOKUP, DRAFT)


@dataclass(frozen=True)
class Workload:
    name: str
    path: Path
    category: str
    legend: str


WORKLOADS = {
    "chat": Workload("chat", HERE / "prompts" / "suite.jsonl", "chat", "the suite's chat prompts"),
    "code-edit": Workload("code-edit", HERE / "prompts" / "code_edit.jsonl", "code-edit",
                          "bench/prompts/code_edit.jsonl: 250-500 tokens of quoted code to change"),
}


@dataclass
class Reply:
    """One measured request as its client saw it."""
    system: str            # a key of SYSTEMS
    workload: str
    prompt: str            # the prompt's id
    position: int          # where the system came in this prompt's rotation
    token_ids: list[int]
    latency_s: float       # sending to the last token's arrival
    ttft_s: float
    stats: dict = field(default_factory=dict)  # specd's GenerationStats, or llama.cpp's timings

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.latency_s if self.latency_s > 0 else 0.0


def system_names(drafter: str) -> dict[str, str]:
    """Each system's row name in the report."""
    return {TARGET_ONLY: "specd target-only", LOOKUP: f"specd lookup ({POLICY})",
            DRAFT: f"specd {drafter} + lookup ({POLICY})", LLAMA: "llama.cpp",
            LLAMA_DRAFT: f"llama.cpp + {drafter} draft (max {LLAMA_DRAFT_MAX})",
            LLAMA_LOOKUP: "llama.cpp lookup"}


def parse_names(text: str, known: Iterable[str], what: str) -> list[str]:
    """Comma-separated names, each known, in the order given."""
    known = list(known)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown or text!r}; known: {', '.join(known)}")
    return names


def rotation(systems: list[str], index: int) -> list[str]:
    """The order prompt `index` visits the systems in: the list turned left by `index`."""
    shift = index % len(systems)
    return systems[shift:] + systems[:shift]


def read_prompts(workload: Workload, count: int) -> list[dict]:
    rows = [json.loads(line) for line in workload.path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["category"] == workload.category][:count]


# -- llama.cpp ----------------------------------------------------------------------------------------------

def sse_events(lines: Iterable[bytes | str]) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream's `data:` lines, up to `[DONE]`."""
    for line in lines:
        text = line.decode() if isinstance(line, bytes) else line
        text = text.strip()
        if not text.startswith("data:"):
            continue
        payload = text[len("data:"):].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def merge_llama_chunks(chunks: list[dict]) -> dict:
    """llama-server /completion chunks (streamed, or the one reply) as tokens, text and timings. Streamed, every
    chunk carries its new tokens and the final one (stop: true) only the timings; unstreamed, the one reply has all."""
    tokens: list[int] = []
    text, timings = "", {}
    for chunk in chunks:
        tokens += chunk.get("tokens") or []
        text += chunk.get("content") or ""
        timings = chunk.get("timings") or timings
    return {"token_ids": tokens, "text": text, "timings": timings}


def llama_request(token_ids: list[int], max_new_tokens: int, cache_prompt: bool = False) -> dict:
    """The /completion body: greedy, exactly max_new_tokens (EOS ignored), streamed with the token ids;
    cache_prompt: reuse the KV of the prefix it shares with the slot's previous prompt."""
    return {"prompt": token_ids, "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1,
            "ignore_eos": True, "cache_prompt": cache_prompt, "return_tokens": True, "stream": True}


def llama_flags(system: str, help_text: str, draft_gguf: Path | None, lookup_args: str) -> tuple[list[str], str]:
    """(the llama-server flags that make `system`, '') or ([], why it cannot run), from that build's --help."""
    if system == LLAMA:
        return [], ""
    if system == LLAMA_DRAFT:
        if draft_gguf is None:
            return [], "the drafter is not a GGUF file"
        if "--spec-draft-n-max" in help_text:  # newer builds renamed the draft flags
            spec_type = ["--spec-type", "draft-simple"] if "draft-simple" in help_text else []
            return ["-md", str(draft_gguf), *spec_type, "--spec-draft-n-max", str(LLAMA_DRAFT_MAX),
                    "--spec-draft-n-min", str(LLAMA_DRAFT_MIN)], ""
        if "--draft-max" in help_text:
            return ["-md", str(draft_gguf), "--draft-max", str(LLAMA_DRAFT_MAX),
                    "--draft-min", str(LLAMA_DRAFT_MIN)], ""
        return [], "this llama-server lists no draft-model flags (--spec-draft-n-max or --draft-max)"
    flags = shlex.split(lookup_args)
    missing = [flag for flag in flags if flag.startswith("-") and flag not in help_text]
    if "--spec-type" in flags:
        value = flags[flags.index("--spec-type") + 1] if flags.index("--spec-type") + 1 < len(flags) else ""
        if value not in help_text:
            missing.append(value)
    if missing:
        return [], f"this llama-server's --help lists no {', '.join(missing)} (prompt lookup in the server)"
    return flags, ""


class LlamaServer:
    """llama-server on loopback, one slot, its /completion endpoint streamed."""

    def __init__(self, binary: Path, gguf: Path, threads: int, flags: list[str], log_path: Path,
                 cache_prompt: bool = False):
        self.port = free_port()
        self.cache_prompt = cache_prompt
        self.command = [str(binary), "-m", str(gguf), "-t", str(threads), "-c", str(LLAMA_CONTEXT), "-np", "1",
                        "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 600.0) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with code {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:  # 503 while the model loads
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"llama-server not healthy within {timeout_s}s; see {self.log_path}")

    def generate(self, token_ids: list[int], max_new_tokens: int) -> tuple[list[int], float, float, dict]:
        """(new tokens, seconds to the last token, seconds to the first, llama.cpp's timings)."""
        body = json.dumps(llama_request(token_ids, max_new_tokens, self.cache_prompt)).encode()
        request = urllib.request.Request(f"{self.url}/completion", data=body,
                                         headers={"Content-Type": "application/json"})
        chunks: list[dict] = []
        first = last = 0.0
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            for chunk in sse_events(response):
                if chunk.get("tokens"):
                    last = time.perf_counter() - start
                    first = first or last
                chunks.append(chunk)
        merged = merge_llama_chunks(chunks)
        return merged["token_ids"], last, first, merged["timings"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- specd --------------------------------------------------------------------------------------------------

class SpecdSystem:
    """One LocalStack and one client connection to its coordinator."""

    def __init__(self, system: str, target: str, drafter: str, threads: int, threads_drafter: int, log_dir: Path,
                 prefix_caching: bool = False):
        target_only = system == TARGET_ONLY
        self.mode = "target_only" if target_only else ""   # "": the coordinator's own (overlapped)
        self.policy = "" if target_only else POLICY
        stack_log = log_dir / system
        stack_log.mkdir(parents=True, exist_ok=True)
        self.stack = LocalStack(target, drafter if system == DRAFT else "none", threads_verifier=threads,
                                threads_drafter=threads_drafter, log_dir=str(stack_log),
                                extra_env={"SPECD_PREFIX_CACHING": str(prefix_caching).lower()},  # the verifier's
                                coordinator_args=["--mode", "target_only"] if target_only else ["--policy", POLICY])
        self.client: SpecdClient | None = None

    def start(self) -> None:
        self.client = SpecdClient(self.stack.start(timeout_s=600), client_id="bench-single-stream")

    def generate(self, token_ids: list[int], max_new_tokens: int) -> tuple[list[int], float, float, dict]:
        """(new tokens, seconds to the last token, seconds to the first, specd's GenerationStats)."""
        tokens: list[int] = []
        first = last = 0.0
        stats: dict = {}
        start = time.perf_counter()
        for chunk in self.client.stream(token_ids=token_ids, max_new_tokens=max_new_tokens, ignore_eos=True,
                                        mode=self.mode, policy=self.policy, exclude_from_training=True):
            if chunk.token_ids:
                last = time.perf_counter() - start
                first = first or last
                tokens.extend(chunk.token_ids)
            if chunk.done:
                stats = stats_dict(chunk.stats)
        return tokens, last, first, stats

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.stack.stop()


# -- summary and report -------------------------------------------------------------------------------------

def first_difference(got: list[int], expected: list[int]) -> int | None:
    """Index of the first token where the lists part (the shorter one's length if one is a prefix); None if equal."""
    if got == expected:
        return None
    return next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))


def mismatches(replies: list[Reply]) -> list[dict]:
    """specd's speculative replies whose tokens differ from specd target-only's for the same workload and prompt."""
    expected = {(r.workload, r.prompt): r.token_ids for r in replies if r.system == TARGET_ONLY}
    bad = []
    for r in replies:
        if r.system not in SPECD_SYSTEMS or r.system == TARGET_ONLY or (r.workload, r.prompt) not in expected:
            continue
        want = expected[(r.workload, r.prompt)]
        index = first_difference(r.token_ids, want)
        if index is not None:
            bad.append({"system": r.system, "workload": r.workload, "prompt": r.prompt, "first_difference": index,
                        "got": r.token_ids[index:index + 4], "expected": want[index:index + 4]})
    return bad


def summarise(replies: list[Reply]) -> dict:
    """One system on one workload: tokens/s (median of its requests, and all tokens over all their time), TTFT,
    its own tokens/s figure, and the speculation counters its stats carry."""
    tokens = sum(len(r.token_ids) for r in replies)
    seconds = sum(r.latency_s for r in replies)
    summary = {"requests": len(replies), "tokens": tokens, "seconds": seconds,
               "tokens_per_s_median": statistics.median(r.tokens_per_s for r in replies),
               "tokens_per_s_aggregate": tokens / seconds if seconds > 0 else 0.0,
               "ttft_median_s": statistics.median(r.ttft_s for r in replies)}

    def total(key: str) -> float:
        return sum(float(r.stats.get(key) or 0) for r in replies)

    if any("predicted_per_second" in r.stats for r in replies):  # llama.cpp's timings
        summary["own_tokens_per_s_median"] = statistics.median(float(r.stats.get("predicted_per_second") or 0)
                                                               for r in replies)
        summary["prompt_ms_median"] = statistics.median(float(r.stats.get("prompt_ms") or 0) for r in replies)
        if total("draft_n"):
            summary["drafted_tokens"] = int(total("draft_n"))
            summary["accepted_tokens"] = int(total("draft_n_accepted"))
            summary["acceptance"] = total("draft_n_accepted") / total("draft_n")
    elif any("rounds" in r.stats for r in replies):  # specd's GenerationStats
        summary["own_tokens_per_s_median"] = statistics.median(float(r.stats.get("tokens_per_s") or 0)
                                                               for r in replies)
        summary["rounds"], summary["lookup_rounds"] = int(total("rounds")), int(total("lookup_rounds"))
        summary["tokens_per_round"] = total("new_tokens") / total("rounds") if total("rounds") else 0.0
        if total("drafted_tokens"):
            summary["drafted_tokens"], summary["accepted_tokens"] = (int(total("drafted_tokens")),
                                                                     int(total("accepted_tokens")))
            summary["acceptance"] = total("accepted_tokens") / total("drafted_tokens")
            summary["lookup_drafted_tokens"] = int(total("lookup_drafted_tokens"))
            summary["lookup_accepted_tokens"] = int(total("lookup_accepted_tokens"))
        blocks = [float(r.stats["mean_block_length"]) for r in replies if r.stats.get("mean_block_length")]
        if blocks:
            summary["mean_block_length"] = statistics.mean(blocks)
    return summary


def ratio(summary: dict[str, dict], system: str, baseline: str) -> str:
    if baseline not in summary or not summary[baseline]["tokens_per_s_aggregate"]:
        return "–"
    return f"{summary[system]['tokens_per_s_aggregate'] / summary[baseline]['tokens_per_s_aggregate']:.2f}x"


def markdown_table(summary: dict[str, dict], names: dict[str, str]) -> str:
    """One row per system of one workload, in the order of `summary`."""
    lines = ["| system | tok/s median | tok/s aggregate | vs specd target-only | vs llama.cpp | own tok/s median "
             "| acceptance | lookup rounds | tokens / round | mean block | TTFT median |",
             "|---" * 11 + "|"]
    for system, s in summary.items():
        acceptance = (f"{s['acceptance']:.0%} ({s['accepted_tokens']}/{s['drafted_tokens']})"
                      if "acceptance" in s else "–")
        lookup = f"{s['lookup_rounds']} of {s['rounds']}" if "rounds" in s else "–"
        per_round = f"{s['tokens_per_round']:.2f}" if "tokens_per_round" in s else "–"
        block = f"{s['mean_block_length']:.1f}" if "mean_block_length" in s else "–"
        own = f"{s['own_tokens_per_s_median']:.1f}" if "own_tokens_per_s_median" in s else "–"
        lines.append(f"| {names[system]} | **{s['tokens_per_s_median']:.2f}** | {s['tokens_per_s_aggregate']:.2f} "
                     f"| {ratio(summary, system, TARGET_ONLY)} | {ratio(summary, system, LLAMA)} | {own} "
                     f"| {acceptance} | {lookup} | {per_round} | {block} | {s['ttft_median_s']:.2f} s |")
    return "\n".join(lines)


def agreement(replies: list[Reply], names: dict[str, str], systems: list[str]) -> str:
    """For information: in how many prompts each llama.cpp row gave specd target-only's tokens."""
    expected = {(r.workload, r.prompt): r.token_ids for r in replies if r.system == TARGET_ONLY}
    parts = []
    for system in systems:
        if system in SPECD_SYSTEMS:
            continue
        mine = [r for r in replies if r.system == system and (r.workload, r.prompt) in expected]
        if not mine:
            continue
        same = sum(r.token_ids == expected[(r.workload, r.prompt)] for r in mine)
        firsts = [first_difference(r.token_ids, expected[(r.workload, r.prompt)]) for r in mine]
        parted = sorted(i for i in firsts if i is not None)
        parts.append(f"{names[system]} {same} of {len(mine)}"
                     + (f" (the others part at token {', '.join(map(str, parted))})" if parted else ""))
    if not parts:
        return ""
    return "llama.cpp's tokens equal to specd target-only's, for information: " + "; ".join(parts) + "."


def workload_report(workload: Workload, summary: dict[str, dict], replies: list[Reply], bad: list[dict],
                    names: dict[str, str], systems: list[str]) -> str:
    """A workload's table, its legend, specd's greedy check and llama.cpp's agreement."""
    checked = [s for s in systems if s in SPECD_SYSTEMS and s != TARGET_ONLY]
    check = ""
    if checked and TARGET_ONLY not in systems:
        check = "specd's speculative tokens not checked: target-only did not run"
    elif checked:
        check = (f"specd's speculative tokens against target-only's: {len(bad)} mismatch{'es' * (len(bad) != 1)}"
                 + "".join(f"\n- {names[m['system']]}, {m['prompt']}: token {m['first_difference']} is {m['got']}, "
                           f"expected {m['expected']}" for m in bad))
    prompts = len({r.prompt for r in replies})
    return "\n\n".join(part for part in [
        f"### {workload.name}: {prompts} prompt{'s' * (prompts != 1)} ({workload.legend})",
        markdown_table(summary, names), check, agreement(replies, names, systems)] if part)


LEGEND = ("tok/s: new tokens over the time from sending the request to its last token arriving (median of the "
          "prompts; aggregate: all tokens over all that time); vs: aggregate tok/s over that row's. Own tok/s: "
          "specd's stats tokens_per_s; llama.cpp's predicted_per_second (decode only, prompt excluded). Acceptance: "
          "accepted over drafted tokens; lookup rounds: specd's rounds whose block came from the coordinator's "
          "prompt lookup; tokens / round: new tokens per verify round; mean block: specd's draft tokens per round "
          "that verified one (mean of the prompts).")


# -- main ---------------------------------------------------------------------------------------------------

def gguf_path(spec: str) -> Path | None:
    """The GGUF file a model spec resolves to, or None (not a GGUF, or not installed)."""
    try:
        source = resolve_source(spec)
    except ModelLoadError:
        return None
    return source.directory / source.gguf_file if source.gguf_file else None


def shown_command(command: list[str]) -> str:
    """A llama-server command line as the report shows it: the binary and the model files by name, no address."""
    words = []
    for i, word in enumerate(command):
        if word in ("--host", "--port") or (i and command[i - 1] in ("--host", "--port")):
            continue
        words.append(Path(word).name if i == 0 or word.endswith(".gguf") else word)
    return " ".join(words)


def start_llama(system: str, target_gguf: Path | None, draft_gguf: Path | None, threads: int, lookup_args: str,
                log_dir: Path, help_text: list[str], cache_prompt: bool) -> tuple[LlamaServer | None, str]:
    """(a started llama-server for `system`, '') or (None, why not). help_text holds llama-server --help once read."""
    binary = LLAMACPP_BIN / "llama-server"
    if not binary.exists():
        return None, f"no {binary} (bash bench/setup_llamacpp.sh builds it)"
    if target_gguf is None:
        return None, "the target is not a GGUF file"
    if not help_text:
        result = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=120)
        help_text.append(result.stdout + result.stderr)
    flags, why = llama_flags(system, help_text[0], draft_gguf, lookup_args)
    if why:
        return None, why
    server = LlamaServer(binary, target_gguf, threads, flags, log_dir / f"{system}.log", cache_prompt)
    try:
        server.start()
    except RuntimeError as err:
        server.stop()
        return None, str(err)
    return server, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="qwen2.5-coder-1.5b", help="a GGUF target (preset, .gguf or directory)")
    parser.add_argument("--drafter", default="qwen2.5-coder-0.5b",
                        help="the draft model of the draft and llama-draft rows (a GGUF for llama.cpp)")
    parser.add_argument("--workloads", default="chat,code-edit", help=f"comma-separated ({', '.join(WORKLOADS)})")
    parser.add_argument("--prompts-per-workload", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="cores each system gets")
    parser.add_argument("--threads-drafter", type=int, default=0,
                        help="specd's drafter's threads, sharing the cores (default: a quarter of --threads, at "
                             "least 1, as specd.stack.default_threads gives the drafter a quarter of the cores)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated ({', '.join(SYSTEMS)})")
    parser.add_argument("--llama-lookup-args", default=LLAMA_LOOKUP_ARGS,
                        help="llama-server flags of the llama-lookup row")
    parser.add_argument("--prompt-cache", action=argparse.BooleanOptionalAction, default=False,
                        help="reuse the KV of earlier prompts' shared prefixes (specd's verifier prefix caching, "
                             "llama.cpp's cache_prompt); off: every system computes every prompt in full")
    parser.add_argument("--out", default=str(HERE / "results" / "single_stream"))
    parser.add_argument("--results-md", default="", help="a results page to update (bench/RESULTS.md); '' none")
    args = parser.parse_args(argv)
    try:
        workloads = [WORKLOADS[name] for name in parse_names(args.workloads, WORKLOADS, "workload")]
        wanted = parse_names(args.systems, SYSTEMS, "system")
    except ValueError as err:
        parser.error(str(err))
    exit_on_sigterm()
    threads_drafter = args.threads_drafter or max(1, args.threads // 4)
    names = system_names(args.drafter)
    command = "python -m bench.single_stream " + " ".join(shlex.quote(a) for a in
                                                           (argv if argv is not None else sys.argv[1:]))
    started = time.monotonic()

    tokenizer = load_tokenizer(args.target)
    prompts = {w.name: [(row["id"], chat_ids(tokenizer, row["prompt"]))
                        for row in read_prompts(w, args.prompts_per_workload)] for w in workloads}
    work = Path(tempfile.mkdtemp(prefix="specd-single-stream-"))
    target_gguf, draft_gguf = gguf_path(args.target), gguf_path(args.drafter)
    runners: dict[str, SpecdSystem | LlamaServer] = {}
    skipped: dict[str, str] = {}
    llama_help: list[str] = []
    try:
        for system in wanted:
            if system in SPECD_SYSTEMS:
                runner = SpecdSystem(system, args.target, args.drafter, args.threads, threads_drafter, work,
                                     args.prompt_cache)
                runners[system] = runner  # stopped in `finally` even if it fails to start
                runner.start()
            else:
                server, why = start_llama(system, target_gguf, draft_gguf, args.threads, args.llama_lookup_args,
                                          work, llama_help, args.prompt_cache)
                if server is None:
                    skipped[system] = why
                    print(f"{names[system]}: skipped, {why}", file=sys.stderr, flush=True)
                    continue
                runners[system] = server
            print(f"{names[system]}: started ({time.monotonic() - started:.0f}s)", flush=True)
        systems = [s for s in wanted if s in runners]
        if not systems:
            print("bench.single_stream: no system to run", file=sys.stderr)
            return 2
        warmup = chat_ids(tokenizer, WARMUP_PROMPT)
        for system in systems:
            runners[system].generate(warmup, WARMUP_TOKENS)

        replies: list[Reply] = []
        index = 0
        for workload in workloads:
            for prompt_id, token_ids in prompts[workload.name]:
                for position, system in enumerate(rotation(systems, index)):
                    tokens, latency, ttft, stats = runners[system].generate(token_ids, args.max_new_tokens)
                    reply = Reply(system, workload.name, prompt_id, position, tokens, latency, ttft, stats)
                    replies.append(reply)
                    print(f"{workload.name} {prompt_id} {names[system]}: {len(tokens)} tokens, "
                          f"{reply.tokens_per_s:.2f} tok/s, TTFT {ttft:.2f}s ({time.monotonic() - started:.0f}s)",
                          flush=True)
                index += 1
    finally:
        for runner in runners.values():
            runner.stop()

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    summary = {w.name: {s: summarise([r for r in replies if r.workload == w.name and r.system == s])
                        for s in systems} for w in workloads}
    bad = mismatches(replies)
    meta = {"command": command, "machine": machine(args.threads), "date": date, "target": args.target,
            "drafter": args.drafter, "threads": args.threads, "threads_drafter": threads_drafter,
            "max_new_tokens": args.max_new_tokens, "prompt_cache": args.prompt_cache, "policy": POLICY,
            "systems": {s: names[s] for s in systems}, "skipped": skipped,
            "llama_commands": {s: runners[s].command for s in systems if isinstance(runners[s], LlamaServer)},
            "prompts": {name: [p for p, _ in rows] for name, rows in prompts.items()},
            "seconds": round(time.monotonic() - started)}
    sections = [workload_report(w, summary[w.name], [r for r in replies if r.workload == w.name],
                                [m for m in bad if m["workload"] == w.name], names, systems) for w in workloads]
    skipped_line = "; ".join(f"{names[s]}: {why}" for s, why in skipped.items())
    header = "\n".join([
        f"- Machine: {meta['machine']}, drafter threads {threads_drafter}",
        f"- Date: {date}",
        f"- {args.max_new_tokens} new tokens per request (greedy, ignore_eos), one request at a time, every prompt "
        f"through the chat template; prompts in turn, each to every system, the order rotating by prompt; "
        + ("KV of shared prompt prefixes reused (specd's prefix caching, llama.cpp's cache_prompt)" if args.prompt_cache
           else "no KV reused between requests (specd's prefix caching and llama.cpp's cache_prompt off)"),
        *[f"- {names[s]}: `{shown_command(line)}`" for s, line in meta["llama_commands"].items()],
        *([f"- Skipped: {skipped_line}"] if skipped else [])])
    table = "\n\n".join([header, LEGEND, *sections])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "mismatches": bad,
                                                  "replies": [asdict(r) for r in replies]}, indent=1))
    (out / "table.md").write_text(table + "\n")
    print("\n" + table)
    if args.results_md:
        update_results_md(Path(args.results_md), "\n\n".join([
            f"## Single stream on `{args.target}`: specd and llama.cpp (generated by `{command}`)", table]),
            name=f"single-stream-{args.target}")
    if bad:
        print(f"GREEDY MISMATCH in specd: {len(bad)} replies differ from target-only's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side benchmark: HF target-only, HF assisted, specd sequential and specd overlapped per policy.

A diagnostic mode (e) runs specd without drafting, to separate the cost of
the service topology from the cost of speculation.

    python -m bench.run --quick                 # CI smoke run, under 3 minutes
    python -m bench.run                         # the full suite, for people
    python -m bench.run --drafter ngram --drafter /path/to/drafter/checkpoint

All modes run on the same machine, prompts and models, interleaved per
prompt (the mode order rotates) so that drift hits every mode alike. specd
runs as separate processes (`specd up` topology) with one torch thread
each for verifier and drafter; the HF baselines run in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.hf_eagle import eagle_assisted
from bench.measure import Sample, run_hf, run_specd
from bench.report import category_table, markdown_table, mismatches, plot, round_table, summarise
from specd.results import update_results_md
from specd.stack import LocalStack
from specdec.client import SpecdClient
from specdec.config import POLICY_NAMES
from specdec.models.loader import load_model

POLICIES = list(POLICY_NAMES)
BASELINE = "(a) hf target-only"
OWN_BASELINE = "(e) specd target-only"  # what speculation adds is measured against this
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str


@dataclass(frozen=True)
class Mode:
    name: str
    kind: str            # hf | hf-assisted | specd
    drafter: str = ""
    pipeline: str = ""   # sequential | overlapped
    policy: str = ""


def read_prompts(path: Path, per_category: int | None) -> list[Prompt]:
    prompts, counts = [], {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        counts[row["category"]] = counts.get(row["category"], 0) + 1
        if per_category is None or counts[row["category"]] <= per_category:
            prompts.append(Prompt(row["id"], row["category"], row["prompt"]))
    return prompts


LOOKUP_SUFFIX = "+lookup"  # a model drafter that drafts prompt-lookup matches first (--prompt-lookup)


def drafter_label(spec: str) -> str:
    model = spec.removesuffix(LOOKUP_SUFFIX)
    return "ngram" if spec == "ngram" else (Path(model).name or model) + spec[len(model):]


def reads_target_features(spec: str) -> bool:
    """Whether `spec` is a feature-level (EAGLE) drafter, which HF assisted generation drives through
    bench.hf_eagle rather than as an assistant model."""
    if spec == "ngram":
        return False
    from transformers import AutoConfig

    from specdec.models.conversion import materialise
    from specdec.models.eagle import is_feature_drafter
    from specdec.models.sources import resolve_source

    return is_feature_drafter(AutoConfig.from_pretrained(materialise(resolve_source(spec.removesuffix(LOOKUP_SUFFIX)))))


def build_modes(drafters: list[str], policies: list[str], sequential_policy: str,
                feature_drafters: frozenset[str] = frozenset()) -> list[Mode]:
    # (e) isolates the cost of the service topology itself: same path as specd, no drafting.
    modes = [Mode(BASELINE, "hf"), Mode(OWN_BASELINE, "specd", drafters[0], "target_only", "static")]
    for spec in drafters:
        label = drafter_label(spec)
        # HF has no prompt-lookup hybrid (its plain run is the model's (b)).
        if not spec.endswith(LOOKUP_SUFFIX):
            modes.append(Mode(f"(b) hf assisted [{label}]", "hf-eagle" if spec in feature_drafters else "hf-assisted",
                              spec))
        modes.append(Mode(f"(c) specd sequential [{label}, {sequential_policy}]", "specd", spec, "sequential",
                          sequential_policy))
        for policy in policies:
            modes.append(Mode(f"(d) specd overlapped [{label}, {policy}]", "specd", spec, "overlapped", policy))
    return modes


def machine() -> str:
    """The CPU as /proc/cpuinfo names it, with family/model: VMs often say only "AMD EPYC", and
    CPU generations differ a lot in how fast torch's BLAS and specd's kernel run."""
    cpu = platform.processor() or platform.machine()
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
        fields = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in first_cpu if ":" in line)}
        flags = set(fields.get("flags", "").split())
        cpu = (f"{fields.get('model name', cpu)} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
               f"{', AVX-512' if 'avx512f' in flags else ''})")
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one prompt per category, 32 tokens (CI smoke)")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", action="append", help="ngram, a drafter model, or MODEL+lookup (prompt lookup first; repeatable; default ngram)")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="comma-separated NAME[:DRAFT_LENGTH]; the length overrides the coordinator's draft_length")
    parser.add_argument("--sequential-policy", default="static", help="NAME[:DRAFT_LENGTH] of the (c) mode")
    parser.add_argument("--prompts", default=str(HERE / "prompts" / "suite.jsonl"))
    parser.add_argument("--per-category", type=int, default=None, help="prompts per category (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10, help="HF prompt_lookup_num_tokens for (b)")
    parser.add_argument("--eagle-draft-tokens", type=int, default=1,
                        help="draft length of (b) with a feature-level drafter (static, like the specd rows at :1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each specd model service and of HF")
    parser.add_argument("--out", default=None, help="directory for results.json and speedup.png")
    parser.add_argument("--results-md", default=None, help="Markdown file whose bench section is replaced")
    args = parser.parse_args(argv)

    drafters = args.drafter or ["ngram"]
    per_category = args.per_category if args.per_category is not None else (1 if args.quick else None)
    max_new_tokens = args.max_new_tokens or (32 if args.quick else 128)
    out = Path(args.out or (HERE / ("results-quick" if args.quick else "results/speed")))
    out.mkdir(parents=True, exist_ok=True)
    results_md = Path(args.results_md) if args.results_md else (None if args.quick else HERE / "RESULTS.md")
    prompts = read_prompts(Path(args.prompts), per_category)
    feature_drafters = frozenset(spec for spec in drafters if reads_target_features(spec))
    modes = build_modes(drafters, [p for p in args.policies.split(",") if p], args.sequential_policy, feature_drafters)
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])

    torch.set_num_threads(args.threads)
    target = load_model(args.target)
    tokenizer = target.tokenizer
    assistants = {spec: load_model(spec, tokenizer_from=args.target).model for spec in drafters
                  if spec != "ngram" and not spec.endswith(LOOKUP_SUFFIX)}
    stacks, clients = {}, {}
    log_dir = tempfile.mkdtemp(prefix="specd-bench-")
    try:
        for spec in drafters:
            lookup = spec.endswith(LOOKUP_SUFFIX)
            stacks[spec] = LocalStack(args.target, spec.removesuffix(LOOKUP_SUFFIX), threads_verifier=args.threads,
                                      threads_drafter=args.threads, log_dir=log_dir,
                                      drafter_args=["--prompt-lookup"] if lookup else None)
            clients[spec] = SpecdClient(stacks[spec].start(timeout_s=600))
        encoded = {p.id: tokenizer.apply_chat_template([{"role": "user", "content": p.text}],
                                                       add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"] for p in prompts}

        def run(mode: Mode, prompt: Prompt, tokens: int) -> Sample:
            ids = list(encoded[prompt.id])
            if mode.kind == "hf":
                return run_hf(mode.name, target.model, ids, tokens, prompt.id, prompt.category)
            if mode.kind == "hf-assisted":
                if mode.drafter == "ngram":
                    return run_hf(mode.name, target.model, ids, tokens, prompt.id, prompt.category,
                                  prompt_lookup=args.prompt_lookup_tokens)
                return run_hf(mode.name, target.model, ids, tokens, prompt.id, prompt.category,
                              assistant=assistants[mode.drafter])
            if mode.kind == "hf-eagle":
                with eagle_assisted(target.model, assistants[mode.drafter], args.eagle_draft_tokens) as made:
                    sample = run_hf(mode.name, target.model, ids, tokens, prompt.id, prompt.category,
                                    assistant=assistants[mode.drafter])
                drafter = made[0]
                sample.drafted, sample.accepted, sample.rounds = drafter.drafted, drafter.accepted, drafter.rounds
                sample.draft_ms = drafter.draft_s * 1e3
                return sample
            policy, _, length = mode.policy.partition(":")  # NAME[:DRAFT_LENGTH]
            return run_specd(mode.name, clients[mode.drafter], ids, tokens, prompt.id, prompt.category,
                             mode.pipeline, policy, int(length or 0))

        for mode in modes:  # warm-up: first-call costs (allocations, gRPC channels) stay out of the numbers
            run(mode, prompts[0], 8)
        samples: list[Sample] = []
        started = time.monotonic()
        for index, prompt in enumerate(prompts):
            rotation = index % len(modes)
            for mode in modes[rotation:] + modes[:rotation]:
                samples.append(run(mode, prompt, max_new_tokens))
            print(f"[{index + 1}/{len(prompts)}] {prompt.id} done, {time.monotonic() - started:.0f}s", flush=True)
    finally:
        for client in clients.values():
            client.close()
        for stack in stacks.values():
            stack.stop()

    rows = summarise(samples, BASELINE, OWN_BASELINE)
    bad = mismatches(samples, BASELINE)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    meta = {"command": command, "machine": machine(), "date": date, "target": args.target, "drafters": drafters,
            "max_new_tokens": max_new_tokens, "prompts": len(prompts), "threads": args.threads}
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": rows, "mismatches": bad,
                                                  "samples": [asdict(s) for s in samples]}, indent=1))
    title = f"specd on {args.target}: greedy, {len(prompts)} prompts x {max_new_tokens} tokens ({date})"
    plot(rows, out / "speedup.png", title)
    table, by_category, rounds = markdown_table(rows), category_table(rows), round_table(rows)
    print(table)
    print(by_category)
    print(rounds)
    if results_md is not None:
        image = os.path.relpath(out / "speedup.png", results_md.parent)
        update_results_md(results_md, "\n\n".join([
            f"## Speed: specd vs HF on `{args.target}` (generated by `{command}`)",
            f"- Machine: {meta['machine']}\n- Date: {date}\n- Greedy, {len(prompts)} prompts, "
            f"{max_new_tokens} new tokens each, {args.threads} torch thread(s) per model process; "
            f"modes interleaved per prompt.\n- Greedy mismatches against (a): {len(bad)}",
            table, "### By prompt category (speedup vs (a), acceptance rate)", by_category,
            "### Round costs (after the first token)", rounds, f"![speedup]({image})"]))
    if bad:
        print(f"GREEDY MISMATCH against {BASELINE}: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

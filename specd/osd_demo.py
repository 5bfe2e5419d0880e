"""Online speculative decoding, live: acceptance climbs on one traffic domain, drops on a shift, recovers.

    specd osd-demo                      # or: python -m specd.osd_demo
    specd osd-demo --requests-per-domain 150 --max-new-tokens 48

Starts the real topology (verifier, drafter following a checkpoint store,
coordinator publishing traces to an embedded Redis, and a `specd train`
worker), then streams requests from trainer/prompts/domain_a.jsonl followed
by domain_b.jsonl. Every request reports its acceptance rate, tokens/s and the
drafter version that served it; the run ends with a plot and a Markdown
section in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from specd.results import update_results_md
from specd.stack import LocalStack, exit_on_sigterm
from specdec import redisutil
from specdec.client import SpecdClient
from specdec.models.checkpoints import CheckpointStore
from trainer.eagle import ensure_base_version

HERE = Path(__file__).resolve().parent
PROMPTS = HERE.parent / "trainer" / "prompts"
BENCH = HERE.parent / "bench"  # a source checkout: the results page and its folders live there
WINDOW = 20


@dataclass
class Point:
    index: int
    domain: str
    prompt_id: str
    acceptance: float
    tokens_per_s: float
    drafted: int
    accepted: int
    drafter_version: str


def read_domain(path: Path) -> list[tuple[str, str]]:
    return [(row["id"], row["prompt"]) for row in map(json.loads, path.read_text().splitlines()) if row]


def pooled_acceptance(points: list[Point]) -> float:
    drafted = sum(p.drafted for p in points)
    return sum(p.accepted for p in points) / drafted if drafted else 0.0


def ensure_initial_drafter(store: CheckpointStore, target: str, layers: int) -> int:
    """A store without CURRENT gets a drafter initialised from the target's own layers, untrained."""
    if store.current() is not None:
        return store.current()
    from specdec.models.loader import load_model
    from trainer.bootstrap import init_drafter_from_target

    loaded = load_model(target)
    drafter = init_drafter_from_target(loaded.model, layers)
    version = store.publish(drafter, {"source": f"{layers} layers of {target}, untrained",
                                      "tokenizer_fingerprint": loaded.fingerprint, "target_version": loaded.version})
    store.promote(version, "osd-demo starting point")
    return version


def summary_lines(points: list[Point], domains: list[str]) -> list[str]:
    lines = []
    for domain in domains:
        part = [p for p in points if p.domain == domain]
        if len(part) < 2 * WINDOW:
            continue
        first, last = part[:WINDOW], part[-WINDOW:]
        lines.append(
            f"| {domain} | {len(part)} | {pooled_acceptance(first):.3f} | {pooled_acceptance(last):.3f} | "
            f"{pooled_acceptance(last) - pooled_acceptance(first):+.3f} | "
            f"{statistics.median(p.tokens_per_s for p in first):.1f} | "
            f"{statistics.median(p.tokens_per_s for p in last):.1f} | "
            f"{first[0].drafter_version} → {last[-1].drafter_version} |")
    return lines


def plot(points: list[Point], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    xs = [p.index for p in points]
    rolling = [pooled_acceptance(points[max(0, i - WINDOW + 1): i + 1]) for i in range(len(points))]
    top.plot(xs, [p.acceptance for p in points], ".", alpha=0.35, label="per request")
    top.plot(xs, rolling, "-", linewidth=2, label=f"pooled over last {WINDOW}")
    top.set_ylabel("acceptance rate")
    bottom.plot(xs, [p.tokens_per_s for p in points], ".", alpha=0.35)
    bottom.set_ylabel("tokens/s")
    bottom.set_xlabel("requests seen")
    for axis in (top, bottom):
        for i in range(1, len(points)):
            if points[i].domain != points[i - 1].domain:
                axis.axvline(points[i].index, color="red", linestyle="--")
            if points[i].drafter_version != points[i - 1].drafter_version:
                axis.axvline(points[i].index, color="grey", linewidth=0.5)
                if axis is top:
                    axis.text(points[i].index, 1.01, points[i].drafter_version, fontsize=7, rotation=90,
                              va="bottom", transform=axis.get_xaxis_transform())
    top.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specd osd-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--checkpoint-dir", default="", help="store to start from (default: a fresh one)")
    parser.add_argument("--drafter-layers", type=int, default=4, help="layers of a target-initialised drafter")
    parser.add_argument("--eagle", default="", help="start from this EAGLE drafter (a preset or directory) and "
                                                    "train it with `specd refine-eagle` instead of `specd train`")
    parser.add_argument("--refine-round-traces", type=int, default=60, help="new traces that start a refine-eagle round")
    parser.add_argument("--refine-traces", type=int, default=1_000, help="newest traces a refine-eagle round reads")
    parser.add_argument("--refine-epochs", type=float, default=2.0)
    parser.add_argument("--domains", default="domain_a,domain_b")
    parser.add_argument("--requests-per-domain", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--policy", default="static")
    parser.add_argument("--draft-length", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="traces per trainer step")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--publish-every", type=int, default=10)
    parser.add_argument("--loss", default="fkl")
    parser.add_argument("--holdout-fraction", type=float, default=0.1, help="share of requests the gate holds out")
    parser.add_argument("--max-trace-age-s", type=float, default=120.0,
                        help="the trainer skips traces older than this when it falls behind (0: never)")
    parser.add_argument("--holdout-half-life", type=int, default=128,
                        help="the gate's recency half-life, in held-out traces (0: all weigh the same)")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="the trainer's candidates average its weights with this decay per step (0: off)")
    parser.add_argument("--request-gap-s", type=float, default=0.0,
                        help="idle seconds after each request: lighter traffic leaves the trainer spare cycles")
    parser.add_argument("--out", default=str(BENCH / "results" / "osd"))
    parser.add_argument("--results-md", default=str(BENCH / "RESULTS.md"), help="'' to skip")
    parser.add_argument("--report-from", default="", help="only write the plot, table and section of a saved run "
                                                          "(its osd.json), with that run's options")
    args = parser.parse_args(argv)
    if args.report_from:
        saved = json.loads(Path(args.report_from).read_text())
        rerun = parser.parse_args(shlex.split(saved["command"])[2:])
        rerun.out, rerun.results_md = str(Path(args.report_from).parent), args.results_md
        report(rerun, saved)
        return 0
    exit_on_sigterm()

    workdir = Path(tempfile.mkdtemp(prefix="specd-osd-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    redis_client = redisutil.connect("embedded", state_directory=workdir / "redis")
    redis_url = redisutil.url_of(redis_client)
    store = CheckpointStore(args.checkpoint_dir or workdir / "checkpoints", redis_client=redis_client)
    first_version = (ensure_base_version(store, args.eagle, args.target) if args.eagle
                     else ensure_initial_drafter(store, args.target, args.drafter_layers))
    domains = [d for d in args.domains.split(",") if d]
    prompts = {d: read_domain(PROMPTS / f"{d}.jsonl") for d in domains}

    stack = LocalStack(args.target, str(store.path(first_version)), threads_verifier=1, threads_drafter=1,
                       log_dir=str(workdir),
                       drafter_args=["--checkpoint-dir", str(store.root), "--redis-url", redis_url,
                                     "--swap-poll-s", "1"],
                       coordinator_args=["--redis-url", redis_url, "--trace-sample-rate", "1.0"])
    trainer_log = open(workdir / "trainer.log", "ab")
    trainer_command = (
        ["refine-eagle", "--target", args.target, "--redis-url", redis_url, "--checkpoint-dir", str(store.root),
         "--eagle-window", str(args.refine_traces), "--eagle-round-traces", str(args.refine_round_traces),
         "--eagle-epochs", str(args.refine_epochs), "--eagle-lr", str(args.lr), "--eagle-batch-size", str(args.batch_size),
         "--holdout-fraction", str(args.holdout_fraction), "--threads", "1"] if args.eagle else
        ["train", "--target", args.target, "--redis-url", redis_url,
         "--checkpoint-dir", str(store.root), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
         "--publish-every", str(args.publish_every), "--loss", args.loss, "--threads", "1", "--metrics-port", "0",
         "--holdout-fraction", str(args.holdout_fraction), "--holdout-half-life", str(args.holdout_half_life),
         "--max-trace-age-s", str(args.max_trace_age_s), "--ema-decay", str(args.ema_decay)])
    trainer = subprocess.Popen([sys.executable, "-m", "specd.cli", *trainer_command],
                               stdout=trainer_log, stderr=trainer_log, start_new_session=True)
    points: list[Point] = []
    started_ms = int(time.time() * 1000)
    print(f"osd-demo: logs and state in {workdir}", file=sys.stderr, flush=True)
    try:
        client = SpecdClient(stack.start(timeout_s=600))
        for domain in domains:
            pool = prompts[domain]
            for i in range(args.requests_per_domain):
                prompt_id, text = pool[i % len(pool)]
                result = client.generate(text, max_new_tokens=args.max_new_tokens, policy=args.policy,
                                         draft_length=args.draft_length, request_id=f"osd-{len(points)}")
                stats = result.stats
                points.append(Point(len(points), domain, prompt_id, stats.get("acceptance_rate", 0.0),
                                    stats.get("tokens_per_s", 0.0), stats.get("drafted_tokens", 0),
                                    stats.get("accepted_tokens", 0), stats.get("drafter_version", "")))
                if len(points) % 10 == 0:
                    recent = points[-WINDOW:]
                    print(f"[{len(points)}] {domain} acceptance(last {len(recent)})={pooled_acceptance(recent):.3f} "
                          f"tok/s={statistics.median(p.tokens_per_s for p in recent):.1f} "
                          f"drafter={points[-1].drafter_version}", flush=True)
                if trainer.poll() is not None:
                    raise RuntimeError(f"the trainer exited with code {trainer.returncode}; see {workdir}/trainer.log")
                time.sleep(args.request_gap_s)
        client.close()
    finally:
        trainer.terminate()
        try:
            trainer.wait(30)
        except subprocess.TimeoutExpired:
            trainer.kill()
        stack.stop()

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    decisions = [d for d in store.decisions() if d.get("ts_ms", 0) >= started_ms]  # a reused store has older ones
    command = "specd osd-demo " + " ".join(argv if argv is not None else sys.argv[1:])
    saved = {"command": command, "date": date, "first_version": first_version, "decisions": decisions,
             "points": [asdict(p) for p in points]}
    (out / "osd.json").write_text(json.dumps(saved, indent=1))
    report(args, saved)
    return 0


def report(args: argparse.Namespace, saved: dict) -> None:
    """The plot, the table and (with --results-md) the RESULTS.md section of a run saved as osd.json."""
    out, domains = Path(args.out), [d for d in args.domains.split(",") if d]
    points = [Point(**p) for p in saved["points"]]
    decisions, command, date = saved["decisions"], saved["command"], saved["date"]
    plot(points, out / "osd.png", f"OSD on {args.target}: {', '.join(domains)} ({date})")
    table = ["| domain | requests | acceptance, first 20 | acceptance, last 20 | gain | tok/s p50, first 20 | "
             "tok/s p50, last 20 | drafter |", "|---|---|---|---|---|---|---|---|",
             *summary_lines(points, domains)]
    print("\n".join(table))
    if not args.results_md:
        return
    results_md = Path(args.results_md)
    image = os.path.relpath(out / "osd.png", results_md.parent)
    promoted = sum(1 for d in decisions if d["action"] == "promote")
    rejected = sum(1 for d in decisions if d["action"] == "reject")
    if args.eagle:
        title, name = "Online learning with the EAGLE drafter", "osd-eagle"
        trainer_text = (f"trainer: `specd refine-eagle`, a round per {args.refine_round_traces} new traces on the "
                        f"newest {args.refine_traces}, {args.refine_epochs:g} epochs at lr {args.lr}, batch "
                        f"{args.batch_size}, gate on {args.holdout_fraction:.0%} held-out requests")
    else:
        steps = max((d.get("metrics", {}).get("steps", 0) for d in decisions), default=0)
        title, name = "Online learning: domain shift", "osd"
        trainer_text = (f"trainer: {args.loss}, batch {args.batch_size}, lr {args.lr}, gate every "
                        f"{args.publish_every} steps on {args.holdout_fraction:.0%} held-out requests, recency "
                        f"half-life {args.holdout_half_life} traces, traces older than {args.max_trace_age_s:.0f} s "
                        f"skipped; weight average decay {args.ema_decay:g}; {steps} trainer steps")
    first = f"v{saved['first_version']}" if "first_version" in saved else points[0].drafter_version
    update_results_md(results_md, "\n\n".join([
        f"## {title} (generated by `{command}`)",
        f"- Date: {date}; target {args.target}; drafter starts as {first}"
        f"{f' ({args.eagle})' if args.eagle else ''}; greedy, {args.max_new_tokens} new tokens, policy "
        f"{args.policy} k={args.draft_length}; {trainer_text}; {args.request_gap_s:g} s idle after each request; "
        f"{promoted} checkpoints promoted, {rejected} rejected.",
        "\n".join(table), f"![osd]({image})"]), name=name)


if __name__ == "__main__":
    sys.exit(main())

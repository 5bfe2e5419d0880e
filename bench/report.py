"""Summaries, the Markdown table and the plot; pure functions of the samples."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from bench.measure import Sample


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def mismatches(samples: list[Sample], baseline: str) -> list[tuple[str, str]]:
    """(mode, prompt id) pairs whose greedy tokens differ from the baseline's."""
    reference = {s.prompt_id: s.token_ids for s in samples if s.mode == baseline}
    return [(s.mode, s.prompt_id) for s in samples
            if s.mode != baseline and s.prompt_id in reference and s.token_ids != reference[s.prompt_id]]


def summarise(samples: list[Sample], baseline: str, own_baseline: str | None = None) -> list[dict]:
    """Per mode; speedups against `baseline`, and the median prompt's against `own_baseline` (specd's
    own target-only decoding: what speculation itself adds) when that mode ran."""
    by_mode: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_mode[sample.mode].append(sample)
    base = by_mode[baseline]
    base_tps = _tokens_per_s(base)
    base_by_prompt = {s.prompt_id: s.tokens_per_s for s in base}
    own_by_prompt = {s.prompt_id: s.tokens_per_s for s in by_mode.get(own_baseline, [])}
    bad = mismatches(samples, baseline)
    rows = []
    for mode, group in by_mode.items():
        tps = _tokens_per_s(group)
        drafted = sum(s.drafted for s in group)
        rounds = sum(s.rounds for s in group)
        draft_ms = sum(s.draft_ms for s in group)
        per_prompt = [s.tokens_per_s / base_by_prompt[s.prompt_id] for s in group
                      if base_by_prompt.get(s.prompt_id)]
        per_prompt_own = [s.tokens_per_s / own_by_prompt[s.prompt_id] for s in group
                          if own_by_prompt.get(s.prompt_id)]
        gaps = [gap for s in group for gap in s.token_gaps_s]
        categories: dict[str, list[Sample]] = defaultdict(list)
        for s in group:
            categories[s.category].append(s)
        rows.append({
            "mode": mode,
            "prompts": len(group),
            "tokens": sum(len(s.token_ids) for s in group),
            "tokens_per_s": tps,
            "speedup": tps / base_tps if base_tps else 0.0,
            "median_prompt_speedup": statistics.median(per_prompt) if per_prompt else 0.0,
            "median_prompt_vs_own": statistics.median(per_prompt_own) if per_prompt_own else None,
            "acceptance_rate": sum(s.accepted for s in group) / drafted if drafted else None,
            "tokens_per_round": (sum(s.accepted for s in group) + rounds) / rounds if rounds else None,
            "ttft_ms_p50": 1e3 * percentile([s.ttft_s for s in group], 50),
            "itl_ms_p50": 1e3 * percentile(gaps, 50),
            "itl_ms_p95": 1e3 * percentile(gaps, 95),
            "hidden_draft_share": sum(s.hidden_draft_ms for s in group) / draft_ms if draft_ms else None,
            # What a round costs once the first token is out: what speculation has to pay for.
            "ms_per_round": 1e3 * sum(s.seconds - s.ttft_s for s in group) / rounds if rounds else None,
            "draft_ms_per_round": draft_ms / rounds if rounds else None,
            "early_verify_share": sum(s.early_verify_rounds for s in group) / rounds if rounds else None,
            "fallback_steps": sum(s.fallback_steps for s in group),
            "mismatches": sum(1 for m, _ in bad if m == mode),
            "speedup_by_category": {
                name: _tokens_per_s(items) / _tokens_per_s([b for b in base if b.category == name])
                for name, items in sorted(categories.items())
                if _tokens_per_s([b for b in base if b.category == name])
            },
            "acceptance_by_category": {
                name: (sum(s.accepted for s in items) / sum(s.drafted for s in items))
                for name, items in sorted(categories.items()) if sum(s.drafted for s in items)
            },
        })
    return rows


def _tokens_per_s(group: list[Sample]) -> float:
    seconds = sum(s.seconds for s in group)
    return sum(len(s.token_ids) for s in group) / seconds if seconds else 0.0


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    header = ("| mode | tok/s | speedup vs (a) | median prompt speedup | median prompt vs (e) | acceptance | "
              "tokens/round | TTFT p50 ms | ITL p50 ms | ITL p95 ms | draft hidden | fallbacks | greedy mismatches |")
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        own = r.get("median_prompt_vs_own")
        lines.append(
            f"| {r['mode']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['median_prompt_speedup']:.2f}x | "
            f"{'–' if own is None else f'{own:.2f}x'} | "
            f"{_fmt(r['acceptance_rate'])} | {_fmt(r['tokens_per_round'])} | {r['ttft_ms_p50']:.0f} | "
            f"{r['itl_ms_p50']:.1f} | {r['itl_ms_p95']:.1f} | {_fmt(r['hidden_draft_share'])} | "
            f"{r['fallback_steps']} | {r['mismatches']} |")
    return "\n".join(lines)


def round_table(rows: list[dict]) -> str:
    """Per specd mode: wall ms per round after the first token, tokens per round, draft-call ms per round."""
    lines = ["| mode | ms per round | tokens per round | draft ms per round | rounds verified without waiting |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r["ms_per_round"] is not None:
            lines.append(f"| {r['mode']} | {r['ms_per_round']:.1f} | {_fmt(r['tokens_per_round'])} | "
                         f"{_fmt(r['draft_ms_per_round'], 1)} | {_fmt(r.get('early_verify_share'))} |")
    return "\n".join(lines)


def category_table(rows: list[dict]) -> str:
    categories = sorted({c for r in rows for c in r["speedup_by_category"]})
    lines = ["| mode | " + " | ".join(f"{c} speedup (acceptance)" for c in categories) + " |",
             "|" + "---|" * (len(categories) + 1)]
    for r in rows:
        cells = []
        for c in categories:
            speed = r["speedup_by_category"].get(c)
            accept = r["acceptance_by_category"].get(c)
            cells.append(f"{_fmt(speed)}x ({_fmt(accept)})" if speed is not None else "–")
        lines.append(f"| {r['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = sorted({c for r in rows for c in r["speedup_by_category"]})
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 0.45 * len(rows) + 2.5))
    names = [r["mode"] for r in rows]
    left.barh(names, [r["speedup"] for r in rows], color="tab:blue")
    left.axvline(1.0, color="black", linewidth=0.8)
    left.set_xlabel("tokens/s speedup vs (a) target-only HF generate")
    left.invert_yaxis()
    height = 0.8 / max(1, len(categories))
    for index, category in enumerate(categories):
        right.barh([i + index * height for i in range(len(rows))],
                   [r["speedup_by_category"].get(category, 0.0) for r in rows], height=height, label=category)
    right.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))], names)
    right.axvline(1.0, color="black", linewidth=0.8)
    right.set_xlabel("speedup by prompt category")
    right.invert_yaxis()
    right.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Prints a saved run's round costs: python -m bench.report bench/results/speed/results.json"""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="round costs of a saved bench run (its results.json)")
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    run = json.loads(args.results.read_text())
    baseline = run["summary"][0]["mode"]
    print(round_table(summarise([Sample(**s) for s in run["samples"]], baseline)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

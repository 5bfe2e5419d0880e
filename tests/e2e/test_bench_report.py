"""The benchmark's arithmetic: gaps, percentiles, ratios and the greedy mismatch check."""

from __future__ import annotations

import pytest

from bench.measure import Sample, amortised_gaps
from bench.report import markdown_table, mismatches, percentile, round_table, summarise
from specd.results import update_results_md

BASE = "(a)"


def sample(mode, prompt_id, tokens, seconds, category="chat", drafted=0, accepted=0, rounds=0):
    return Sample(mode, prompt_id, category, tokens, seconds, 0.1, [0.05] * len(tokens), drafted, accepted, rounds)


def test_amortised_gaps_split_a_chunk_over_its_tokens():
    ttft, gaps = amortised_gaps([(1.5, 1), (1.7, 2), (1.8, 0), (2.0, 1)], start=1.0)
    assert ttft == pytest.approx(0.5)
    assert gaps == pytest.approx([0.1, 0.1, 0.3])


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile([], 50) == 0.0


def test_summary_ratios_and_mismatch_detection():
    samples = [
        sample(BASE, "p1", [1, 2, 3, 4], 2.0), sample(BASE, "p2", [5, 6], 1.0, category="code"),
        sample("fast", "p1", [1, 2, 3, 4], 1.0, drafted=6, accepted=3, rounds=2),
        sample("fast", "p2", [5, 6], 0.5, category="code", drafted=2, accepted=1, rounds=1),
        sample("wrong", "p1", [1, 2, 3, 9], 2.0), sample("wrong", "p2", [5, 6], 1.0, category="code"),
    ]
    assert mismatches(samples, BASE) == [("wrong", "p1")]
    rows = {r["mode"]: r for r in summarise(samples, BASE)}
    assert rows[BASE]["speedup"] == pytest.approx(1.0)
    assert rows["fast"]["speedup"] == pytest.approx(2.0)
    assert rows["fast"]["acceptance_rate"] == pytest.approx(4 / 8)
    assert rows["fast"]["tokens_per_round"] == pytest.approx((4 + 3) / 3)
    assert rows["fast"]["ms_per_round"] == pytest.approx(1e3 * (1.0 + 0.5 - 2 * 0.1) / 3)
    assert rows[BASE]["ms_per_round"] is None and "| fast | 433.3 | 2.33 |" in round_table(list(rows.values()))
    assert rows["fast"]["speedup_by_category"] == pytest.approx({"chat": 2.0, "code": 2.0})
    assert rows["wrong"]["mismatches"] == 1 and rows["fast"]["mismatches"] == 0
    assert "| fast | 4.0 | 2.00x |" in markdown_table(list(rows.values()))


def test_median_prompt_against_specds_own_target_only_decoding():
    samples = [sample(BASE, "p1", [1, 2], 2.0), sample(BASE, "p2", [1, 2], 2.0),
               sample("own", "p1", [1, 2], 1.0), sample("own", "p2", [1, 2], 0.5),
               sample("spec", "p1", [1, 2], 0.8), sample("spec", "p2", [1, 2], 0.5)]
    rows = {r["mode"]: r for r in summarise(samples, BASE, "own")}
    assert rows["spec"]["median_prompt_vs_own"] == pytest.approx((1.25 + 1.0) / 2)
    assert rows["spec"]["median_prompt_speedup"] == pytest.approx((2.5 + 4.0) / 2)
    assert "| spec | 3.1 | 3.08x | 3.25x | 1.12x |" in markdown_table(list(rows.values()))
    assert all(r["median_prompt_vs_own"] is None for r in summarise(samples, BASE))


def test_results_section_is_replaced_in_place(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nHand-written notes.\n")
    update_results_md(path, "first run")
    update_results_md(path, "other", name="osd")
    update_results_md(path, "second run")
    text = path.read_text()
    assert "Hand-written notes." in text and "second run" in text and "other" in text
    assert "first run" not in text

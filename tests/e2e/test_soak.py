"""bench.soak's arithmetic: RSS slopes, per-service trends, error counts and latency percentiles."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.soak import Request, RssSample, rss_mb, rss_trend, slope_per_min, summarise


def test_slope_is_megabytes_per_minute_of_a_least_squares_line():
    assert slope_per_min([(0, 100.0), (30, 101.0), (60, 102.0)]) == pytest.approx(2.0)
    assert slope_per_min([(0, 100.0), (60, 100.0), (120, 100.0)]) == 0.0
    assert slope_per_min([(0, 10.0), (60, 14.0), (120, 10.0), (180, 14.0)]) == pytest.approx(0.8)
    assert slope_per_min([(5, 100.0)]) == 0.0 and slope_per_min([(5, 100.0), (5, 120.0)]) == 0.0


def test_second_half_slope_ignores_warm_up_growth():
    # Grows 10 MB/min for two minutes, then stays flat for two: warm-up, not a leak.
    samples = [RssSample("verifier", t, 100.0 + min(t, 120) / 6) for t in range(0, 241, 30)]
    trend = rss_trend(samples)
    assert trend["start_mb"] == 100.0 and trend["end_mb"] == trend["peak_mb"] == 120.0
    assert trend["slope_mb_per_min"] > 4 and trend["second_half_slope_mb_per_min"] == 0.0
    assert trend["samples"] == 9


def test_summary_counts_errors_by_code_and_times_only_successes():
    requests = [Request(0, "chat-01", False, 0.0, 1.0, "OK", 10), Request(1, "code-01", True, 0.5, 3.0, "OK", 20),
                Request(0, "math-01", False, 1.0, 0.1, "UNAVAILABLE"), Request(1, "chat-02", False, 3.5, 9.0,
                                                                                 "DEADLINE_EXCEEDED"),
                Request(0, "chat-03", False, 1.1, 0.2, "UNAVAILABLE")]
    samples = [RssSample("coordinator", 0.0, 50.0), RssSample("coordinator", 60.0, 51.0)]
    summary = summarise(requests, samples, seconds=60.0)
    assert summary["requests"] == 5 and summary["ok"] == 2
    assert summary["errors"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 2}
    assert (summary["latency_p50_s"], summary["latency_p99_s"]) == (1.0, 3.0)
    assert summary["tokens_per_s"] == pytest.approx(0.5) and summary["requests_per_min"] == pytest.approx(5.0)
    assert summary["rss"]["coordinator"]["slope_mb_per_min"] == pytest.approx(1.0)


def test_rss_is_read_from_proc_and_none_once_the_process_is_gone():
    assert rss_mb(os.getpid()) > 1.0
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert rss_mb(child.pid) is None

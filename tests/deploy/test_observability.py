"""The Grafana dashboard queries only metrics specd exports, with their
labels, and docs/operations.md describes every setting and metric."""

from __future__ import annotations

import json
import re
from pathlib import Path

from specdec.config import SETTINGS_BY_ROLE

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "specd-dashboard.json"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

# Prometheus metrics the services export: name -> labels.
COUNTERS = {
    "specd_requests_total": {"mode", "policy", "status"},
    "specd_generated_tokens_total": set(),
    "specd_draft_tokens_total": {"policy"},
    "specd_accepted_tokens_total": {"policy"},
    "specd_position_drafted_total": {"position"},
    "specd_position_accepted_total": {"position"},
    "specd_fallback_steps_total": set(),
    "specd_trace_published_total": set(),
    "specd_trace_dropped_total": set(),
    "specd_trainer_steps_total": set(),
    "specd_prefix_cache_hit_tokens_total": {"service"},
    "specd_http_requests_total": {"endpoint", "status"},
}
GAUGES = {
    "specd_active_sessions": {"service"},
    "specd_kv_cache_bytes": {"service"},
    "specd_drafter_version_info": {"version"},
    "specd_trace_stream_lag": set(),
    "specd_trainer_loss": set(),
    "specd_queue_depth": set(),
    "specd_step_queue_depth": {"service"},
    "specd_http_open_requests": set(),
}
HISTOGRAMS = {
    "specd_accepted_length": {"policy"},
    "specd_ttft_seconds": set(),
    "specd_inter_token_seconds": set(),
    "specd_draft_latency_seconds": set(),
    "specd_verify_latency_seconds": set(),
    "specd_queue_wait_seconds": set(),
    "specd_step_rows": {"service", "kind"},
    "specd_step_sessions": {"service", "kind"},
    "specd_step_seconds": {"service", "kind"},
}
ALL_METRICS = {**COUNTERS, **GAUGES, **HISTOGRAMS}
TARGET_LABELS = {"instance", "job", "role"}  # added by Prometheus / our scrape config


PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "delta", "deriv", "exp", "floor",
    "group", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_sum",
    "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time", "ln", "log2", "log10",
    "max", "max_over_time", "min", "min_over_time", "predict_linear", "quantile", "quantile_over_time", "rate",
    "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev", "stdvar", "sum", "sum_over_time",
    "time", "timestamp", "topk", "vector", "label_values", "query_result",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                   "bool", "offset", "inf", "nan"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression refers to."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    labels: set[str] = set()
    for block in re.findall(r"\{([^}]*)\}", s):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", block))
    s = re.sub(r"\{[^}]*\}", " ", s)
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for group in re.findall(grouping, s):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    s = re.sub(grouping, " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    idents = set(re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*", s))
    metrics = {i for i in idents if i not in PROMQL_FUNCTIONS and i.lower() not in PROMQL_KEYWORDS}
    # label_values(metric, label): the second argument is a label.
    for metric, label in re.findall(r"label_values\(\s*([\w:]+)\s*,\s*(\w+)\s*\)", expr):
        metrics.discard(label)
        labels.add(label)
    return metrics, labels


def base_metric(name: str) -> str | None:
    if name in COUNTERS or name in GAUGES:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return None


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    out = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dash["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", query))
    return out


def test_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    ids = []
    for panel in dash["panels"]:
        ids.append(panel["id"])
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    used = set()
    for where, expr in dashboard_queries(dash):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{where}: unbalanced"
        metrics, labels = promql_names(expr)
        assert metrics, f"{where}: no metric in {expr!r}"
        allowed_labels = set(TARGET_LABELS)
        for metric in metrics:
            base = base_metric(metric)
            assert base, f"{where}: {metric} is not a metric specd exports"
            used.add(base)
            allowed_labels |= ALL_METRICS[base]
            if base in HISTOGRAMS:
                allowed_labels.add("le")
                assert metric != base, f"{where}: use {base}_bucket/_sum/_count"
        assert labels <= allowed_labels, f"{where}: labels {labels - allowed_labels} not on {metrics}"
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), f"{where}: quantile needs le buckets"
    assert used == set(ALL_METRICS), f"metrics without a panel: {sorted(set(ALL_METRICS) - used)}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("acceptance", "tokens/s", "time to first token", "draft vs verify", "fallback",
                  "active sessions", "kv cache", "drop rate", "trainer loss", "drafter version", "http api"):
        assert topic in titles, f"dashboard lacks a {topic!r} panel"


# --------------------------------------------------------------------------
# Operations guide
# --------------------------------------------------------------------------

def test_operations_doc_covers_settings_metrics_and_policies():
    text = OPERATIONS_DOC.read_text()
    missing = [f"SPECD_{f.upper()} ({role})" for role, schema in SETTINGS_BY_ROLE.items()
               for f in schema.model_fields if f"SPECD_{f.upper()}" not in text]
    assert not missing, ("docs/operations.md lacks settings; regenerate its configuration reference with "
                         "`python -c 'from specdec.config import settings_reference; print(settings_reference())'`: "
                         f"{missing}")
    for name in ALL_METRICS:
        assert name in text, f"docs/operations.md does not describe {name}"
    for word in ("static", "heuristic", "pearl", "adaedl", "specdecpp", "bild", "sequential", "overlapped",
                 "target_only", "specd checkpoints rollback", "docker-compose.cpu.yml", "overlays/gpu",
                 "overlays/cpu", "ReadWriteMany", "RayCluster", "NOT_SERVING", "SPECD_GRACE_PERIOD_S"):
        assert word in text, f"docs/operations.md does not mention {word}"

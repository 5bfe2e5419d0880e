"""Prometheus metrics shared by the services (one definition per name)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("specd_requests", "Generation requests", ["mode", "policy", "status"])
GENERATED_TOKENS = Counter("specd_generated_tokens", "Tokens returned to callers")
DRAFT_TOKENS = Counter("specd_draft_tokens", "Draft tokens sent to verification", ["policy"])
ACCEPTED_TOKENS = Counter("specd_accepted_tokens", "Draft tokens accepted by the target", ["policy"])
ACCEPTED_LENGTH = Histogram("specd_accepted_length", "Accepted draft tokens per verify round", ["policy"],
                            buckets=tuple(range(0, 17)))
POSITION_DRAFTED = Counter("specd_position_drafted", "Draft tokens verified, by draft slot", ["position"])
POSITION_ACCEPTED = Counter("specd_position_accepted", "Draft tokens accepted, by draft slot", ["position"])
TTFT = Histogram("specd_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS)
INTER_TOKEN = Histogram("specd_inter_token_seconds", "Time between streamed tokens", buckets=LATENCY_BUCKETS)
TOKENS_PER_SECOND = Histogram("specd_tokens_per_second", "Per-request decode throughput",
                              buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 200, 500, 1000))
DRAFT_LATENCY = Histogram("specd_draft_latency_seconds", "Drafter time per draft block", buckets=LATENCY_BUCKETS)
VERIFY_LATENCY = Histogram("specd_verify_latency_seconds", "Verifier round-trip per verify call", buckets=LATENCY_BUCKETS)
ACTIVE_SESSIONS = Gauge("specd_active_sessions", "Open sessions", ["service"])
KV_CACHE_BYTES = Gauge("specd_kv_cache_bytes", "KV-cache bytes held by sessions", ["service"])
FALLBACK_STEPS = Counter("specd_fallback_steps", "Target-only steps taken because the drafter failed")
QUEUE_DEPTH = Gauge("specd_queue_depth", "Requests waiting in the coordinator's admission queue")
QUEUE_WAIT = Histogram("specd_queue_wait_seconds", "Time a request waited for a slot before it ran",
                       buckets=LATENCY_BUCKETS)
UPSTREAM_ERRORS = Counter("specd_upstream_errors", "Failed calls to drafters and verifiers, by what the status says",
                          ["service", "failure", "code"])
DRAFTER_VERSION = Gauge("specd_drafter_version_info", "Drafter version in use (1 for the current one)", ["version"])
STEP_ROWS = Histogram("specd_step_rows", "Token rows in one batched forward pass", ["service", "kind"],
                      buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256, 512))
STEP_SESSIONS = Histogram("specd_step_sessions", "Sessions in one batched forward pass", ["service", "kind"],
                          buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
STEP_SECONDS = Histogram("specd_step_seconds", "Time of one batched forward pass", ["service", "kind"],
                         buckets=LATENCY_BUCKETS)
PREFIX_CACHE_HITS = Counter("specd_prefix_cache_hit_tokens", "Prompt tokens whose KV was shared from an earlier "
                            "prompt instead of computed", ["service"])
STEP_QUEUE = Gauge("specd_step_queue_depth", "Prefill and verify calls waiting for a forward pass", ["service"])
HTTP_REQUESTS = Counter("specd_http_requests", "OpenAI-compatible API requests answered, by endpoint and HTTP status",
                        ["endpoint", "status"])
HTTP_OPEN_REQUESTS = Gauge("specd_http_open_requests", "API requests the HTTP tier is generating or streaming")


def register(registry: CollectorRegistry, cls, name: str, doc: str, labels=()):
    """A metric on `registry`; one registered there earlier under `name` is shared, not duplicated."""
    try:
        return cls(name, doc, labelnames=labels, registry=registry)
    except ValueError:
        existing = registry._names_to_collectors.get(name)  # noqa: SLF001 - no public lookup exists
        if isinstance(existing, cls):
            return existing
        raise


def serve_metrics(port: int, host: str) -> int:
    """Starts the /metrics endpoint; returns the bound port (0 disables)."""
    if not port:
        return 0
    server, _thread = start_http_server(port, addr=host)
    return server.server_address[1]


def set_drafter_version(version: str) -> None:
    DRAFTER_VERSION.clear()
    DRAFTER_VERSION.labels(version=version).set(1)

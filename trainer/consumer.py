"""Reads the trace stream as one member of a consumer group.

Each `fetch` first takes over entries another consumer read but never
acknowledged for `claim_idle_ms` (XAUTOCLAIM: the worker died mid-batch),
then reads new entries (XREADGROUP ">"). Entries stay pending until the
caller acks them after using them, so a crash at any point loses nothing.
Entries older than the freshness bound that were never delivered are skipped
on purpose (`skip_older_than`): online learning follows current traffic.
A Redis that lost its data (a restart without persistence) has no group: the
next fetch creates it again and reads on, rather than failing with NOGROUP.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from specdec.traces import TraceRecord, TraceSchemaError, decode_fields

log = logging.getLogger(__name__)


@dataclass
class StreamEntry:
    entry_id: str
    record: TraceRecord | None  # None when the entry could not be decoded
    error: str = ""
    claimed: bool = False  # taken over from another consumer


def _group_missing(err: redis.ResponseError) -> bool:
    """NOGROUP from reads and claims; "no such key" from XINFO on a stream that is gone."""
    message = str(err)
    return message.startswith("NOGROUP") or "no such key" in message.lower()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TraceConsumer:
    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str, claim_idle_ms: int = 30_000):
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self._claim_cursor = "0-0"
        self._lag_fallback_checked = 0.0
        self._lag_fallback = 0
        self.ensure_group()

    def ensure_group(self) -> None:
        """Creates the group at the start of the stream (so existing traces are used) if missing."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def fetch(self, count: int, block_ms: int = 500) -> list[StreamEntry]:
        """Up to `count` entries: reclaimed stale ones first, then new ones (blocking up to block_ms)."""
        try:
            return self._fetch(count, block_ms)
        except redis.ResponseError as err:
            if not _group_missing(err):
                raise
        log.warning("consumer group %s of %s is gone (Redis lost its data?); creating it again", self.group,
                    self.stream)
        self.ensure_group()
        self._claim_cursor = "0-0"
        return self._fetch(count, block_ms)

    def _fetch(self, count: int, block_ms: int) -> list[StreamEntry]:
        entries = self._claim_stale(count)
        remaining = count - len(entries)
        if remaining > 0:
            response = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=remaining,
                                              block=None if entries else max(1, block_ms))
            for _stream, messages in response or []:
                entries.extend(self._decode(entry_id, fields) for entry_id, fields in messages)
        return entries

    def ack(self, entry_ids: list[str]) -> int:
        if not entry_ids:
            return 0
        return int(self.client.xack(self.stream, self.group, *entry_ids))

    def keep_alive(self, entry_ids: list[str]) -> None:
        """Resets the idle time of entries we hold unacked on purpose, so no live peer reclaims them
        (XCLAIM to ourselves; JUSTID leaves their delivery counts alone)."""
        if entry_ids:
            self.client.xclaim(self.stream, self.group, self.consumer, min_idle_time=0, message_ids=entry_ids,
                               justid=True)

    def _claim_stale(self, count: int) -> list[StreamEntry]:
        response = self.client.xautoclaim(self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms,
                                          start_id=self._claim_cursor, count=count)
        self._claim_cursor = _text(response[0])
        messages = response[1]
        entries = [self._decode(entry_id, fields, claimed=True) for entry_id, fields in messages if entry_id is not None]
        if len(entries) < len(messages):
            # Redis 6.2 returns nil for pending entries trimmed from the stream
            # without saying which; they are now ours, so drop them from our PEL.
            self._ack_trimmed_pending()
        if entries:
            log.info("reclaimed %d traces idle for over %d ms", len(entries), self.claim_idle_ms)
        return entries

    def _ack_trimmed_pending(self) -> None:
        pending = self.client.xpending_range(self.stream, self.group, min="-", max="+", count=1000,
                                             consumername=self.consumer)
        gone = [_text(p["message_id"]) for p in pending
                if not self.client.xrange(self.stream, min=_text(p["message_id"]), max=_text(p["message_id"]))]
        if gone:
            self.ack(gone)
            log.warning("acknowledged %d pending traces that were trimmed from the stream before use", len(gone))

    def _decode(self, entry_id, fields, claimed: bool = False) -> StreamEntry:
        entry_id = _text(entry_id)
        try:
            return StreamEntry(entry_id, decode_fields(fields), claimed=claimed)
        except TraceSchemaError as err:
            return StreamEntry(entry_id, None, error=str(err), claimed=claimed)

    def skip_older_than(self, max_age_s: float, count_limit: int = 10_000) -> int:
        """Moves the group past undelivered entries older than max_age_s; returns how many it skipped.

        A trainer slower than the traffic would otherwise train on ever older traces and
        adapt to a traffic shift only after working through the whole backlog."""
        if max_age_s <= 0:
            return 0
        info = self._group_info()
        if info is None:
            return 0
        cutoff_ms = int(time.time() * 1000 - max_age_s * 1000)
        last = _text(info["last-delivered-id"])
        if int(last.split("-")[0]) >= cutoff_ms:
            return 0
        skipped = len(self.client.xrange(self.stream, min=f"({last}", max=f"{cutoff_ms}-0", count=count_limit))
        if skipped:
            self.client.xgroup_setid(self.stream, self.group, f"{cutoff_ms}-0")
        return skipped

    def lag(self) -> int:
        """Entries in the stream not yet delivered to this group."""
        info = self._group_info()
        if info is None:
            return 0
        if info.get("lag") is not None:  # Redis >= 7 tracks it
            return int(info["lag"])
        # Redis 6.2: count what lies after the last delivered id (bounded, at most every 5 s).
        now = time.monotonic()
        if now - self._lag_fallback_checked >= 5.0:
            last = _text(info["last-delivered-id"])
            self._lag_fallback = len(self.client.xrange(self.stream, min=f"({last}", max="+", count=1000))
            self._lag_fallback_checked = now
        return self._lag_fallback

    def _group_info(self) -> dict | None:
        """XINFO GROUPS' entry for our group (None if it or the stream does not exist)."""
        try:
            groups = self.client.xinfo_groups(self.stream)
        except redis.ResponseError as err:
            if not _group_missing(err):
                raise
            return None
        for info in groups:
            if _text(info["name"]) == self.group:
                return info
        return None

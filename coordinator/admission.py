"""Admission: up to max_running requests run at once; up to max_queued more wait, first come first served."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from specdec import metrics

MIN_RETRY_AFTER_S = 0.05
HOLD_SMOOTHING = 0.1  # weight of the newest request in the running mean of how long one holds a slot


class QueueFull(Exception):
    """Every slot is taken and the queue is full; `retry_after_s` says when trying again is likely to succeed."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"retry in about {retry_after_s * 1e3:.0f} ms")
        self.retry_after_s = retry_after_s


class QueueTimeout(Exception):
    """The request's deadline passed while it waited in the queue."""


class AdmissionQueue:
    """Hands out slots; a slot freed by `leave` passes straight to the longest waiter, so none is overtaken."""

    def __init__(self, max_running: int, max_queued: int):
        self.max_running, self.max_queued = max_running, max_queued
        self.running = 0
        self._waiting: deque[asyncio.Future] = deque()
        self.mean_hold_s = 0.0  # how long a request has held its slot, lately

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def retry_after_s(self) -> float:
        """About when one more queue's worth of requests will have been admitted: each slot frees every
        mean_hold_s, and max_running slots free in parallel."""
        return max(MIN_RETRY_AFTER_S, (self.queued + 1) * self.mean_hold_s / self.max_running)

    async def enter(self, timeout_s: float | None) -> float:
        """Waits for a slot for up to timeout_s (None: no limit); returns the time.monotonic() of admission.
        Raises QueueFull at once when the queue is full, QueueTimeout when timeout_s passes in it."""
        arrived = time.monotonic()
        if self.running < self.max_running and not self._waiting:
            self.running += 1
            metrics.QUEUE_WAIT.observe(0.0)
            return arrived
        if len(self._waiting) >= self.max_queued:
            raise QueueFull(self.retry_after_s())
        slot = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        metrics.QUEUE_DEPTH.set(self.queued)
        try:
            done, _ = await asyncio.wait({slot}, timeout=timeout_s)
        except asyncio.CancelledError:  # the caller went away while queued
            self._abandon(slot)
            raise
        if not done:
            self._abandon(slot)
            raise QueueTimeout(f"the deadline passed after {time.monotonic() - arrived:.3f} s in the admission queue")
        admitted = time.monotonic()
        metrics.QUEUE_WAIT.observe(admitted - arrived)
        return admitted

    def leave(self, admitted_at: float) -> None:
        """Frees the slot taken at admitted_at, handing it to the longest waiter if there is one."""
        held = time.monotonic() - admitted_at
        self.mean_hold_s += HOLD_SMOOTHING * (held - self.mean_hold_s)
        self._free_slot()

    def _free_slot(self) -> None:
        if self._waiting:
            self._waiting.popleft().set_result(None)  # the slot passes on: `running` stays as it is
            metrics.QUEUE_DEPTH.set(self.queued)
        else:
            self.running -= 1

    def _abandon(self, slot: asyncio.Future) -> None:
        if slot.done():  # granted just as the wait ended: pass the slot on rather than lose it
            self._free_slot()
        else:
            self._waiting.remove(slot)
            slot.cancel()
            metrics.QUEUE_DEPTH.set(self.queued)

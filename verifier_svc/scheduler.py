"""Continuous batching: every pending Prefill and Verify, across sessions, shares forward passes.

One thread owns the model. Each step it:
1. takes every queued Verify and packs them into passes (specdec/compute/packed.py) of at most
   `max_step_rows` rows, each session at its own positions over its own KV;
2. fills what the last of those passes leaves of `max_step_rows` with prompt rows of the queued
   Prefills, oldest first, at most `prefill_chunk` of them, so a long prompt is cached a chunk per
   step beside the decoding sessions instead of stalling them (a prefill runs a pass of its own only
   when the verifies leave no room);
3. runs the callbacks whose earlier work is done (a release queued behind an abandoned prefill).

With `prefix_caching`, a prompt first shares the cached blocks of its longest full-block prefix that
an earlier prompt computed (specdec/compute/paged_kv.py) and feeds only the rest; its own full blocks are
offered to later prompts as they are computed. A prefill that returns the target's features computes
every position.

Every token costs each session a round trip to its coordinator, so sessions that share one pass come
back a little apart; taken as they arrive, two sessions would alternate passes forever. Before a pass
the thread therefore waits, for a fraction of a pass at most, for the sessions of the last passes
that have not sent their next call yet.

Mixing sessions and chunking prompts by load keeps each session's bits: up to the kernel's row limit
(specdec/compute/small_gemm.py, MAX_ROWS) every row of a linear layer and of attention is reduced in an order
that depends on that row alone. With `batch_invariant_only` (devices whose GEMMs change bits with the
row count) a pass holds one session, and prompts go in fixed chunks of `prefill_chunk`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from specdec import metrics
from specdec.compute.model_runner import ModelRunner
from specdec.compute.sessions import KVSession
from specdec.config import VerifierSettings
from specdec.model_thread import StepLoop

log = logging.getLogger(__name__)

GATHER_SHARE = 0.3    # of the last pass's time, the longest a pass waits for sessions still on their way
MAX_GATHER_S = 0.01
RECENT_S = 0.5        # sessions not seen in a pass for this long are not waited for


@dataclass
class PassStats:
    """What the forward pass that served a call looked like; the coordinator fits step cost to rows."""

    rows: int
    sessions: int
    seconds: float


@dataclass
class PrefillJob:
    session: KVSession
    to_cache: list[int]                 # prompt ids still to feed (all but the last prompt token)
    last_token: int
    return_hidden: bool
    future: Future = field(default_factory=Future)
    hidden_parts: list[torch.Tensor] = field(default_factory=list)
    started: bool = False
    finished: bool = False
    seq: int = 0


@dataclass
class VerifyJob:
    session: KVSession
    committed_len: int
    draft_tokens: list[int]
    payload: object                     # the core's own arguments for deciding acceptance
    return_hidden: bool
    future: Future = field(default_factory=Future)
    base: int = 0                       # committed length when the pass was built
    seq: int = 0


class VerifyDecider(Protocol):
    def prepare_verify(self, job: VerifyJob) -> None: ...
    def finish_verify(self, job: VerifyJob, logits: torch.Tensor, hidden: torch.Tensor | None,
                      step: PassStats) -> object: ...
    def abort_verify(self, job: VerifyJob) -> None: ...


@dataclass(frozen=True)
class VerifierOptions:
    """The verifier's settings the core and its scheduler read (specdec.config.VerifierSettings)."""

    max_sessions: int = 64
    session_ttl_s: float = 300.0
    small_gemm: bool = False
    max_step_rows: int = 64
    prefill_chunk: int = 64
    batch_invariant_only: bool = False  # one session per pass, for devices whose GEMMs change bits with the row count
    prefix_caching: bool = True
    measure_pass_cost: bool = True

    @classmethod
    def from_settings(cls, settings: VerifierSettings) -> VerifierOptions:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


class StepScheduler(StepLoop):
    def __init__(self, runner: ModelRunner, decider: VerifyDecider, options: VerifierOptions = VerifierOptions(),
                 service: str = "verifier"):
        self.runner, self.decider = runner, decider
        self.max_step_rows, self.prefill_chunk = options.max_step_rows, options.prefill_chunk
        self.prefix_caching = options.prefix_caching
        self.sessions_per_pass = 1 if options.batch_invariant_only else None
        self._recent: dict[str, float] = {}   # session id -> when its last verify pass ended (monotonic)
        self._pass_s = 0.0                    # the last verify pass's duration
        self._verifies: deque[VerifyJob] = deque()
        self._prefills: deque[PrefillJob] = deque()
        self._callbacks: list[tuple[int, Callable[[], None]]] = []
        self._unfinished: set[int] = set()
        self._seq = 0
        super().__init__(service)

    # -- submitting --------------------------------------------------------------------------------

    def submit(self, job: PrefillJob | VerifyJob) -> Future:
        def add() -> None:
            job.seq = self._seq
            self._seq += 1
            self._unfinished.add(job.seq)
            (self._prefills if isinstance(job, PrefillJob) else self._verifies).append(job)

        self._enqueue(add)
        return job.future

    def after_pending(self, callback: Callable[[], None]) -> None:
        """Runs `callback` on the step thread once every call submitted before now is done."""
        with self._cond:
            self._callbacks.append((self._seq, callback))
            self._cond.notify()

    def forget(self, session_id: str) -> None:
        """The session ended: passes no longer wait for it."""
        with self._cond:
            self._recent.pop(session_id, None)

    # -- the step loop -----------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._verifies or self._prefills or self._ready_callbacks())

    def _queued(self) -> int:
        return len(self._verifies) + len(self._prefills)

    def _drain(self) -> list[Future]:
        futures = [job.future for job in [*self._verifies, *self._prefills]]
        self._verifies.clear()
        self._prefills.clear()
        return futures

    def _take(self) -> tuple[list[VerifyJob], list[PrefillJob]]:
        if self._verifies:
            self._wait_for_stragglers()
        verifies = list(self._verifies)
        self._verifies.clear()
        self._in_round = [job.future for job in verifies]  # prefills stay queued until they finish
        return verifies, list(self._prefills)

    def _run_round(self, work: tuple[list[VerifyJob], list[PrefillJob]]) -> None:
        self._run_step(*work)
        with self._cond:
            self._prefills = deque(job for job in self._prefills if not job.finished)
            metrics.STEP_QUEUE.labels(service=self.service).set(self._queued())
            callbacks = self._ready_callbacks()
            self._callbacks = [c for c in self._callbacks if c not in callbacks]
        for _, callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - a failed callback must not stop the step loop
                log.exception("step callback failed")

    def _wait_for_stragglers(self) -> None:
        """Holds the pass (lock held) up to GATHER_SHARE of the last pass's time for recently served sessions
        whose next verify has not arrived; forgets sessions idle for longer than RECENT_S."""
        now = time.monotonic()
        for session_id in [s for s, seen in self._recent.items() if now - seen > RECENT_S]:
            del self._recent[session_id]
        deadline = now + min(GATHER_SHARE * self._pass_s, MAX_GATHER_S)
        while not self._closed:
            queued = {job.session.session_id for job in self._verifies}
            remaining = deadline - time.monotonic()
            if remaining <= 0 or all(session_id in queued for session_id in self._recent):
                return
            self._cond.wait(remaining)

    def _ready_callbacks(self) -> list[tuple[int, Callable[[], None]]]:
        oldest = min(self._unfinished, default=None)
        return [c for c in self._callbacks if oldest is None or c[0] <= oldest]

    def _done(self, job: PrefillJob | VerifyJob) -> None:
        with self._cond:
            self._unfinished.discard(job.seq)

    def _run_step(self, verifies: list[VerifyJob], prefills: list[PrefillJob]) -> None:
        passes = self._passes(self._prepared(verifies))
        last = passes.pop() if passes else []
        room = self.max_step_rows - sum(_rows(job) for job in last)
        if self.sessions_per_pass is not None:
            room = 0 if last else self.max_step_rows  # one session per pass, prompts in fixed chunks
        separate = room <= 0
        chunks = self._prompt_rows(prefills, min(self.prefill_chunk, self.max_step_rows if separate else room))
        for batch in passes:
            self._pass(batch, [])
        if separate:
            self._pass(last, [])
            last = []
        if last or chunks:
            self._pass(last, chunks)

    def _prepared(self, jobs: list[VerifyJob]) -> list[VerifyJob]:
        """The jobs still wanted whose acceptance inputs are ready; the others are answered now."""
        ready = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                self._done(job)
                continue
            try:
                self.decider.prepare_verify(job)
            except Exception as err:  # noqa: BLE001 - reported to that caller only
                job.future.set_exception(err)
                self._done(job)
                continue
            ready.append(job)
        return ready

    def _passes(self, jobs: list[VerifyJob]) -> list[list[VerifyJob]]:
        """Consecutive groups of at most max_step_rows rows (a larger block runs alone)."""
        passes, rows = [], 0
        for job in jobs:
            job_rows = _rows(job)
            full = self.sessions_per_pass is not None and passes and len(passes[-1]) >= self.sessions_per_pass
            if not passes or rows + job_rows > self.max_step_rows or full:
                passes.append([])
                rows = 0
            passes[-1].append(job)
            rows += job_rows
        return passes

    def _prompt_rows(self, prefills: list[PrefillJob], budget: int) -> list[tuple[PrefillJob, list[int]]]:
        """Up to `budget` prompt ids to cache this step, oldest prefill first: (job, ids) per prefill."""
        chunks = []
        for job in prefills:
            if budget <= 0 or (chunks and self.sessions_per_pass is not None):
                break
            if not job.started:
                if not job.future.set_running_or_notify_cancel():
                    job.finished = True
                    self._done(job)
                    continue
                job.started = True
                if self.prefix_caching and not job.return_hidden:
                    self._share_prefix(job)
            if not job.to_cache:  # a one-token prompt, or one whose every full block was cached
                self._finish_prefill(job)
                continue
            chunks.append((job, job.to_cache[:budget]))
            budget -= len(chunks[-1][1])
        return chunks

    def _pass(self, verifies: list[VerifyJob], chunks: list[tuple[PrefillJob, list[int]]]) -> None:
        """One forward over the verifies' rows and the prompt chunks; answers every job it finishes."""
        for job, ids in chunks:
            del job.to_cache[:len(ids)]
            job.session.ids.extend(ids)
        prefills = [job for job, _ in chunks]
        rows = sum(_rows(job) for job in verifies) + sum(len(ids) for _, ids in chunks)
        started = time.perf_counter()
        try:
            results = self.runner.extend([j.session for j in verifies + prefills],
                                         output_hidden=any(j.return_hidden for j in verifies + prefills),
                                         keep_logits=[len(j.draft_tokens) + 1 for j in verifies] + [0] * len(prefills))
        except Exception as err:  # noqa: BLE001 - the pass failed for all of its sessions
            log.exception("forward pass failed")
            for job in verifies:
                self.decider.abort_verify(job)
                job.future.set_exception(err)
                self._done(job)
            for job in prefills:
                job.future.set_exception(err)
                job.finished = True
                self._done(job)
            return
        step = PassStats(rows, len(verifies) + len(prefills), time.perf_counter() - started)
        self._observe("verify" if verifies else "prefill", step)
        if verifies:
            with self._cond:
                self._pass_s = step.seconds
                ended = time.monotonic()
                for job in verifies:
                    self._recent[job.session.session_id] = ended
        for job, (logits, hidden) in zip(verifies, results):
            try:
                job.future.set_result(self.decider.finish_verify(job, logits, hidden, step))
            except Exception as err:  # noqa: BLE001
                self.decider.abort_verify(job)
                job.future.set_exception(err)
            self._done(job)
        for job, (_, hidden) in zip(prefills, results[len(verifies):]):
            if self.prefix_caching:
                job.session.cache.publish_prefix(job.session.ids)
            if job.return_hidden and hidden is not None:
                job.hidden_parts.append(hidden)
            if not job.to_cache:
                self._finish_prefill(job)

    def _share_prefix(self, job: PrefillJob) -> None:
        session = job.session
        if session.cache is None:
            session.cache = self.runner.new_cache()
        shared = session.cache.adopt_prefix(job.to_cache)
        session.ids.extend(job.to_cache[:shared])
        session.cached_len = shared
        del job.to_cache[:shared]
        metrics.PREFIX_CACHE_HITS.labels(service=self.service).inc(shared)

    def _finish_prefill(self, job: PrefillJob) -> None:
        job.session.ids.append(job.last_token)
        hidden = torch.cat(job.hidden_parts) if job.hidden_parts else None
        job.future.set_result((len(job.session.ids), (0, hidden) if hidden is not None else None))
        job.finished = True
        self._done(job)

    def _observe(self, kind: str, step: PassStats) -> None:
        metrics.STEP_ROWS.labels(service=self.service, kind=kind).observe(step.rows)
        metrics.STEP_SESSIONS.labels(service=self.service, kind=kind).observe(step.sessions)
        metrics.STEP_SECONDS.labels(service=self.service, kind=kind).observe(step.seconds)


def _rows(job: VerifyJob) -> int:
    """Rows the job's session feeds: its uncached ids, at least its last one (ModelRunner.extend)."""
    session = job.session
    return len(session.ids) - min(session.cached_len, len(session.ids) - 1)

"""Batched drafting: every draft stream's next step shares one forward pass.

One thread owns the drafter's model. Each round it runs the queued calls (session syncs, rollbacks,
releases) in the order they came, then every queued draft step at once through `Drafter.step_many`,
so eight streams cost about one model step per token instead of eight.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Callable

from drafter_svc.drafters import Drafter, StepItem
from specdec import metrics
from specdec.model_thread import StepLoop

log = logging.getLogger(__name__)


class DraftBatcher(StepLoop):
    def __init__(self, drafter: Drafter, service: str = "drafter"):
        self.drafter = drafter
        self._calls: list[tuple[Callable, tuple, Future]] = []
        self._steps: list[tuple[StepItem, Future]] = []
        super().__init__(service)

    def call(self, fn: Callable, *args) -> Future:
        """Runs fn(*args) on the model thread, before the next batched step."""
        return self._submit(self._calls, (fn, args))

    def step(self, item: StepItem) -> Future:
        """The session's next draft step, batched with every other stream's."""
        return self._submit(self._steps, (item,))

    def sync_and_step(self, sync: Callable[[], object], sampling, support: int, max_context: int) -> Future:
        """A future of (session, first step): sync() gives the session, whose first step joins this round's batch
        (one hop to the model thread instead of two); no step once the session holds max_context tokens."""
        return self._submit(self._calls, (_SyncThenStep(sync, sampling, support, max_context), ()))

    def _submit(self, queue: list, entry: tuple) -> Future:
        future: Future = Future()
        self._enqueue(lambda: queue.append((*entry, future)))
        return future

    # -- the step loop -------------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._calls or self._steps)

    def _queued(self) -> int:
        return len(self._calls) + len(self._steps)

    def _drain(self) -> list[Future]:
        futures = [entry[-1] for entry in self._calls + self._steps]
        self._calls, self._steps = [], []
        return futures

    def _take(self) -> tuple[list, list]:
        calls, self._calls = self._calls, []
        steps, self._steps = self._steps, []
        self._in_round = [entry[-1] for entry in calls + steps]
        metrics.STEP_QUEUE.labels(service=self.service).set(0)
        return calls, steps

    def _run_round(self, work: tuple[list, list]) -> None:
        calls, steps = work
        steps = [(item, future) for item, future in steps if future.set_running_or_notify_cancel()]
        for fn, args, future in calls:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except Exception as err:  # noqa: BLE001 - reported to that caller only
                future.set_exception(err)
                continue
            if isinstance(fn, _SyncThenStep) and len(result.ids) >= fn.max_context:
                future.set_result((result, None))
            elif isinstance(fn, _SyncThenStep):
                steps.append((StepItem(result, fn.sampling, fn.support), _SessionAndStep(result, future)))
            else:
                future.set_result(result)
        if steps:
            self._step_all(steps)

    def _step_all(self, steps: list[tuple[StepItem, Future]]) -> None:
        started = time.perf_counter()
        try:
            results = self.drafter.step_many([item for item, _ in steps])
        except Exception as err:  # noqa: BLE001 - the batched step failed for every stream in it
            log.exception("draft step failed")
            for _, future in steps:
                future.set_exception(err)
            return
        metrics.STEP_SESSIONS.labels(service=self.service, kind="draft").observe(len(steps))
        metrics.STEP_SECONDS.labels(service=self.service, kind="draft").observe(time.perf_counter() - started)
        for (_, future), result in zip(steps, results):
            future.set_result(result)


class _SyncThenStep:
    def __init__(self, sync: Callable[[], object], sampling, support: int, max_context: int):
        self.sync, self.sampling, self.support, self.max_context = sync, sampling, support, max_context

    def __call__(self):
        return self.sync()


class _SessionAndStep:
    """Resolves a sync_and_step future with (session, step result) once the batched step is done."""

    def __init__(self, session, future: Future):
        self.session, self.future = session, future

    def set_result(self, result) -> None:
        self.future.set_result((self.session, result))

    def set_exception(self, err: BaseException) -> None:
        self.future.set_exception(err)

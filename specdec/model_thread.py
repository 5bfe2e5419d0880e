"""The one thread that owns a service's model, and the step loop it runs (the verifier's step scheduler
and the drafter's batcher are StepLoops: each keeps only how it packs a round).

If its loop ends by an exception, no queued or running call would ever be answered: the thread logs why,
fails every call its owner holds with `ServiceStopped` (UNAVAILABLE, so callers move to another replica),
and runs the death callbacks, by which the server turns its health NOT_SERVING and exits."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Callable

from specdec import metrics
from specdec.errors import ServiceStopped

log = logging.getLogger(__name__)


class ModelThread:
    def __init__(self, name: str, loop: Callable[[], None], fail_held: Callable[[ServiceStopped], None]):
        """`loop` returns when its owner closes; `fail_held` fails the calls the owner holds and refuses new ones."""
        self.name = name
        self.died: ServiceStopped | None = None
        self._on_death: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._loop, self._fail_held = loop, fail_held
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def on_death(self, callback: Callable[[], None]) -> None:
        """Runs `callback` (on the dying thread) once the loop has died; at once if it already has."""
        with self._lock:
            if self.died is None:
                self._on_death.append(callback)
                return
        callback()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # noqa: BLE001 - whatever ended the loop, its calls must not wait forever
            log.critical("the model thread died; the service stops serving", exc_info=err,
                         extra={"fields": {"thread": self.name}})
            stopped = ServiceStopped(f"the {self.name} thread died: {err!r}")
            with self._lock:
                self.died = stopped
                callbacks, self._on_death = self._on_death, []
            self._fail_held(stopped)
            for callback in callbacks:
                callback()


class StepLoop:
    """Callers queue work under one condition; each round the model thread takes what is queued
    (`_take`, lock held) and runs it (`_run_round`, lock free) until `close`. Subclasses set up their
    queues before calling this constructor, which starts the thread."""

    def __init__(self, service: str):
        self.service = service
        self._cond = threading.Condition()
        self._closed = False
        self._in_round: list[Future] = []  # the futures of the work the running round took off the queues
        self.model_thread = ModelThread(f"{service}-steps", self._run, self._fail_held)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self.model_thread.join(timeout=10)

    def _enqueue(self, add: Callable[[], None]) -> None:
        """Runs `add` (which queues one piece of work) under the lock, then wakes the thread."""
        with self._cond:
            if self.model_thread.died is not None:
                raise ServiceStopped(str(self.model_thread.died))
            if self._closed:
                raise RuntimeError(f"the {self.service} is shutting down")
            add()
            metrics.STEP_QUEUE.labels(service=self.service).set(self._queued())
            self._cond.notify()

    def _fail_held(self, stopped: ServiceStopped) -> None:
        """The thread died: everything it held or had queued fails with `stopped`."""
        with self._cond:
            self._closed = True
            futures = [*self._in_round, *self._drain()]
        for future in futures:
            if not future.done():
                future.set_exception(stopped)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._has_work() and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                work = self._take()
            self._run_round(work)

    # -- what a subclass defines ---------------------------------------------------------------------

    def _has_work(self) -> bool:
        raise NotImplementedError

    def _queued(self) -> int:
        """How much is queued (lock held), for the queue-depth gauge."""
        raise NotImplementedError

    def _take(self) -> object:
        """Lock held: takes this round's work off the queues and sets `_in_round` to its futures."""
        raise NotImplementedError

    def _run_round(self, work) -> None:
        raise NotImplementedError

    def _drain(self) -> list[Future]:
        """Lock held: empties the queues and gives their futures."""
        raise NotImplementedError

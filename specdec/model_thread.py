"""The one thread that owns a service's model (the verifier's step scheduler, the drafter's batcher).

If its loop ends by an exception, no queued or running call would ever be answered: the thread logs why,
fails every call its owner holds with `ServiceStopped` (UNAVAILABLE, so callers move to another replica),
and runs the death callbacks, by which the server turns its health NOT_SERVING and exits."""

from __future__ import annotations

import logging
import threading
from typing import Callable

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

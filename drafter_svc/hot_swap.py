"""Follows the checkpoint store and swaps the serving drafter between rounds.

The store's CURRENT file (a shared volume or PVC) is the source of truth.
With Redis, the checkpoint events stream wakes the watcher at once instead
of waiting for the next poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from drafter_svc.drafters import ModelDrafter
from specdec import metrics
from specdec.models.checkpoints import REDIS_EVENTS_STREAM, CheckpointStore, version_name

log = logging.getLogger(__name__)


def load_version(store: CheckpointStore, version: int, like: ModelDrafter):
    """Loads checkpoint `version` as a LoadedModel compatible with the serving drafter, plus its head."""
    current = like.loaded
    checkpoint = store.load(version, device=str(current.device), dtype=next(current.model.parameters()).dtype)
    loaded = replace(current, model=checkpoint.model, name=f"{store.root.name}/{version_name(version)}",
                     version=version_name(version), vocab_size=int(checkpoint.model.config.vocab_size))
    return loaded, checkpoint.accept_head


class CheckpointWatcher:
    def __init__(self, drafter: ModelDrafter, store: CheckpointStore, poll_s: float, redis_client=None):
        self.drafter, self.store, self.poll_s, self.redis = drafter, store, poll_s, redis_client
        self.refused: set[int] = set()  # damaged or incompatible versions are not retried every poll
        self._last_event = "$"

    def wanted(self) -> int | None:
        version = self.store.current()
        if version is None or version in self.refused or version_name(version) == self.drafter.version:
            return None
        return version

    def swap_to(self, version: int) -> bool:
        """Loads and installs `version`; a bad checkpoint is refused and the current drafter keeps serving."""
        try:
            loaded, head = load_version(self.store, version, self.drafter)
            self.drafter.swap(loaded, head)
        except Exception as err:  # noqa: BLE001 - never let a bad checkpoint take the drafter down
            self.refused.add(version)
            log.error("refused drafter checkpoint", extra={"fields": {"version": version_name(version),
                                                                       "error": str(err)}})
            return False
        metrics.set_drafter_version(self.drafter.version)
        log.info("swapped drafter", extra={"fields": {"version": self.drafter.version}})
        return True

    def _wait_for_event(self) -> None:
        """Blocks up to poll_s for a promote/rollback event (returns early on one)."""
        try:
            events = self.redis.xread({REDIS_EVENTS_STREAM: self._last_event}, count=16,
                                      block=int(self.poll_s * 1000))
            if events:
                self._last_event = events[-1][1][-1][0]
        except Exception as err:  # noqa: BLE001 - Redis is only a hint; the next loop polls the store anyway
            log.warning("checkpoint events unavailable: %s", err)
            time.sleep(self.poll_s)

    async def run(self) -> None:
        while True:
            version = await asyncio.to_thread(self.wanted)
            if version is not None:
                await asyncio.to_thread(self.swap_to, version)
            if self.redis is not None:
                await asyncio.to_thread(self._wait_for_event)
            else:
                await asyncio.sleep(self.poll_s)

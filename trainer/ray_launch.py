"""Runs trainer workers as Ray actors: one actor per worker, each a member of
the same Redis consumer group, so Ray only places and supervises them.

`ray_address="local"` starts a local Ray (2 CPUs); any other non-empty value
is passed to ``ray.init(address=...)``. Actors must reach Redis and the
checkpoint directory: on a cluster that means a network Redis URL and a
shared volume; "embedded" Redis only works when every actor is on this host.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict
from pathlib import Path

import ray

from specdec import redisutil

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1)
class TrainerActor:
    def __init__(self, settings: dict, drafter_layers: int, metrics_port: int = 0):
        from specdec.config import TrainerSettings
        from specdec.models.loader import configure_threads
        from trainer.assemble import build_worker

        parsed = TrainerSettings(**settings)
        configure_threads(parsed.threads or 1)  # one core per actor, as reserved by num_cpus=1
        if metrics_port:
            from specdec.metrics import serve_metrics

            serve_metrics(metrics_port, parsed.metrics_host)
        self.worker = build_worker(parsed, drafter_layers=drafter_layers)
        self._stop = threading.Event()

    def run(self, max_steps: int | None = None, idle_exit_s: float | None = None) -> dict:
        return asdict(self.worker.run(max_steps=max_steps, idle_exit_s=idle_exit_s, stop=self._stop))

    def stop(self) -> None:
        self._stop.set()

    def consumer_name(self) -> str:
        return self.worker.settings.consumer_name


def portable_settings(settings):
    """Settings other processes can use: embedded Redis as its socket URL, absolute paths."""
    updates = {"checkpoint_dir": str(Path(settings.checkpoint_dir).resolve())}
    if settings.redis_url == redisutil.EMBEDDED:
        updates["redis_url"] = redisutil.url_of(redisutil.connect(redisutil.EMBEDDED))
    return settings.model_copy(update=updates)


# Ray waits 30 s by default for its GCS server to publish its port; a loaded 2-core machine can
# take longer, and an operator's own setting wins.
GCS_PORT_WAIT_S = "120"


def init_ray(address: str) -> None:
    if ray.is_initialized():
        return
    if address != "local":
        ray.init(address=address)
        return
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", GCS_PORT_WAIT_S)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    except RuntimeError as error:  # a head that did not come up: start a fresh one once
        log.warning("local Ray did not start (%s); retrying once", error)
        ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)


def start_actors(settings, drafter_layers: int = 4) -> list:
    settings = portable_settings(settings)
    init_ray(settings.ray_address)
    base = settings.consumer_name or "ray-trainer"
    actors = []
    for index in range(settings.num_workers):
        worker_settings = settings.model_copy(update={"consumer_name": f"{base}-{index}"}).model_dump()
        options = {"max_concurrency": 2}  # so stop() can run while run() is busy
        if settings.device.startswith("cuda"):
            options["num_gpus"] = 1
        metrics_port = settings.metrics_port + index if settings.metrics_port else 0
        actors.append(TrainerActor.options(**options).remote(worker_settings, drafter_layers, metrics_port))
    return actors


def launch(settings, *, max_steps: int | None = None, idle_exit_s: float | None = None,
           drafter_layers: int = 4) -> list[dict]:
    """Starts `settings.num_workers` actors and waits for them; returns each run summary."""
    actors = start_actors(settings, drafter_layers)
    try:
        return ray.get([actor.run.remote(max_steps=max_steps, idle_exit_s=idle_exit_s) for actor in actors])
    except KeyboardInterrupt:
        ray.get([actor.stop.remote() for actor in actors])
        raise

"""Runs the OpenAI-compatible HTTP tier under uvicorn: `specd serve http`."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

import uvicorn

from http_svc.app import FrontDoor
from specdec import metrics
from specdec.config import HttpSettings

log = logging.getLogger(__name__)
START_TIMEOUT_S = 30.0


@dataclass
class RunningHttp:
    server: uvicorn.Server
    serving: asyncio.Task
    port: int

    async def stop(self) -> None:
        """Stops taking connections and waits for open ones up to the grace period."""
        self.server.should_exit = True
        await self.serving


def _config(settings: HttpSettings) -> uvicorn.Config:
    tls = {}
    if settings.tls_cert:
        tls = dict(ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
        if settings.tls_client_ca:
            tls.update(ssl_ca_certs=settings.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    # log_config=None: the process's JSON logging stays as specdec.logs set it up.
    return uvicorn.Config(FrontDoor(settings).app, host=settings.host, port=settings.port, log_config=None,
                          access_log=settings.log_level == "debug", timeout_graceful_shutdown=settings.grace_period_s,
                          lifespan="on", **tls)


async def start(settings: HttpSettings) -> RunningHttp:
    """Serves the API on this event loop; returns once the port is bound."""
    server = uvicorn.Server(_config(settings))
    serving = asyncio.ensure_future(server.serve())
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
    while not server.started:
        if serving.done():
            serving.result()  # raises what stopped it
            raise OSError(f"could not serve on {settings.host}:{settings.port}")
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"the HTTP server did not start within {START_TIMEOUT_S:g}s")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    metrics_port = metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    log.info("http ready", extra={"fields": {"port": port, "metrics_port": metrics_port,
                                             "coordinators": settings.coordinator_addrs, "model": settings.model}})
    return RunningHttp(server, serving, port)


async def serve(settings: HttpSettings) -> None:
    """Until SIGTERM or SIGINT (uvicorn's handlers), then a drain of up to grace_period_s."""
    running = await start(settings)
    await running.serving

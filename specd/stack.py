"""The three services as local processes on loopback: what `specd up`, the benchmarks and the demos start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

# A supervised service that dies is started again after a back-off that doubles with each quick death, from
# RESTART_FIRST_S up to RESTART_MAX_S; one that stayed up STABLE_S before dying starts from RESTART_FIRST_S again.
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 60.0


def check_health(addr: str, service: str = "", timeout_s: float = 2.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                  timeout=timeout_s)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def check_http_health(base_url: str, timeout_s: float = 2.0) -> bool:
    """Whether an HTTP tier answers its /health with 200 (it does once a coordinator is serving)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def describe_exit(returncode: int) -> str:
    """How a process ended, as an operator reads it: "exit code 1", "signal SIGSEGV"."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"


@dataclass(frozen=True)
class Restart:
    """A supervised service that died and was started again, on its own port."""

    name: str
    exit: str               # describe_exit of the process that died
    died_at: float          # time.monotonic()
    restarted_at: float


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalStack:
    """Drafter, verifier and coordinator as separate processes on loopback.

    Once started, the stack supervises them: a service that dies (a non-zero exit or a signal) is logged, to
    stderr and to its own log, and started again on the same port with back-off, and the coordinator's health
    watch re-admits it. A service that exits 0 (it was told to stop), one stopped through `kill`, and every
    service once `stop` has begun stay stopped."""

    def __init__(self, target: str, drafter: str, threads_verifier: int, threads_drafter: int, extra_env=None,
                 coordinator_args: list[str] | None = None, verifier_count: int = 1, log_dir: str | None = None,
                 drafter_args: list[str] | None = None, http: bool = False):
        self.target, self.drafter = target, drafter
        self.http = http  # also start the OpenAI-compatible HTTP tier in front of the coordinator
        self.threads_verifier, self.threads_drafter = threads_verifier, threads_drafter
        self.env = {**os.environ, **(extra_env or {})}
        self.coordinator_args = coordinator_args or []
        self.drafter_args = drafter_args or []
        self.verifier_count = verifier_count
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.restarts: list[Restart] = []
        self._commands: dict[str, list[str]] = {}
        self._started_at: dict[str, float] = {}
        self._killed: set[str] = set()           # stopped through `kill`: not restarted
        self._stopping = threading.Event()
        self._launching = threading.Lock()       # a restart and `stop` never interleave
        self._supervisors: list[threading.Thread] = []

    def _spawn(self, name: str, role: str, args: list[str]) -> None:
        self.ports[name] = free_port()
        self._commands[name] = [sys.executable, "-m", "specd.cli", "serve", role, "--port", str(self.ports[name]), *args]
        self._launch(name)

    def _launch(self, name: str) -> None:
        if self.log_dir:
            with open(os.path.join(self.log_dir, f"{name}.log"), "ab") as log:
                process = subprocess.Popen(self._commands[name], env=self.env, stdout=log, stderr=log,
                                           start_new_session=True)
        else:
            process = subprocess.Popen(self._commands[name], env=self.env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        self.processes[name] = process
        self._started_at[name] = time.monotonic()

    def _report(self, name: str, message: str) -> None:
        """A supervisor line, on the stack's stderr and in the service's own log."""
        print(f"specd: {message}", file=sys.stderr, flush=True)
        if self.log_dir:
            with open(os.path.join(self.log_dir, f"{name}.log"), "a") as log:
                log.write(f"specd supervisor: {message}\n")

    def _supervise(self, name: str) -> None:
        """Waits for the service to end, and starts it again while it dies (see the class)."""
        backoff = RESTART_FIRST_S
        while True:
            returncode = self.processes[name].wait()
            died_at = time.monotonic()
            if self._stopping.is_set() or name in self._killed or returncode == 0:
                return
            if died_at - self._started_at[name] >= STABLE_S:
                backoff = RESTART_FIRST_S
            self._report(name, f"{name} died ({describe_exit(returncode)}); restarting it on port "
                               f"{self.ports[name]} in {backoff:g}s")
            if self._stopping.wait(backoff):
                return
            with self._launching:
                if self._stopping.is_set():
                    return
                self._launch(name)
            self.restarts.append(Restart(name, describe_exit(returncode), died_at, time.monotonic()))
            self._report(name, f"{name} restarted (pid {self.processes[name].pid})")
            backoff = min(backoff * 2, RESTART_MAX_S)

    def _wait_healthy(self, names: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = set(names)
        while pending:
            for name in list(pending):
                process = self.processes[name]
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {process.returncode}"
                                       + (f"; see {self.log_dir}/{name}.log" if self.log_dir else ""))
                healthy = (check_http_health(self.http_url, timeout_s=1.0) if name == "http"
                           else check_health(f"127.0.0.1:{self.ports[name]}", timeout_s=1.0))
                if healthy:
                    pending.discard(name)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{', '.join(sorted(pending))} not healthy within {timeout_s}s")
            time.sleep(0.3)

    def start(self, timeout_s: float = 600.0) -> str:
        """Starts every service and waits until each serves; one that fails stops those already started."""
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> str:
        verifiers = [f"verifier{i}" if self.verifier_count > 1 else "verifier" for i in range(self.verifier_count)]
        for name in verifiers:
            self._spawn(name, "verifier", ["--model", self.target, "--threads", str(self.threads_verifier)])
        backends = list(verifiers)
        if self.drafter != "none":
            self._spawn("drafter", "drafter", ["--model", self.drafter, "--target", self.target,
                                               "--threads", str(self.threads_drafter), *self.drafter_args])
            backends.append("drafter")
        self._wait_healthy(backends, timeout_s)
        coordinator = ["--target", self.target,
                       "--verifier-addrs", ",".join(f"127.0.0.1:{self.ports[v]}" for v in verifiers)]
        if self.drafter != "none":
            coordinator += ["--drafter-addrs", f"127.0.0.1:{self.ports['drafter']}"]
        self._spawn("coordinator", "coordinator", coordinator + self.coordinator_args)
        self._wait_healthy(["coordinator"], timeout_s)
        if self.http:
            self._spawn("http", "http", ["--coordinator-addrs", self.address, "--model", self.target,
                                         "--drafter", self.drafter])
            self._wait_healthy(["http"], timeout_s)
        for name in self.processes:
            supervisor = threading.Thread(target=self._supervise, args=(name,), name=f"supervise-{name}", daemon=True)
            supervisor.start()
            self._supervisors.append(supervisor)
        return self.address

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['coordinator']}"

    @property
    def http_url(self) -> str:
        """The HTTP tier's base URL; OpenAI clients take it with /v1 appended."""
        return f"http://127.0.0.1:{self.ports['http']}"

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stops the service with `sig` for good: the supervisor does not restart it."""
        self._killed.add(name)
        self.processes[name].send_signal(sig)
        self.processes[name].wait(30)

    def stop(self) -> None:
        with self._launching:
            self._stopping.set()
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        for supervisor in self._supervisors:
            supervisor.join(5)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def exit_on_sigterm() -> None:
    """Python ends on SIGTERM without running `finally`, which would leave a stack's services running."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def default_threads() -> tuple[int, int]:
    """(verifier, drafter) threads: the verifier takes every core and the drafter's share them. When SmartSpec
    stops drafting under load the verifier has the whole machine; while both run, the kernel lets the verifier's
    own thread take the chunks of a worker the drafter holds up (bench/RESULTS.md compares the layouts)."""
    cores = os.cpu_count() or 2
    return cores, max(1, cores // 4)

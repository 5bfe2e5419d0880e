"""The three services as local processes on loopback: what `specd up`, the benchmarks and the demos start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalStack:
    """Drafter, verifier and coordinator as separate processes on loopback."""

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

    def _spawn(self, name: str, role: str, args: list[str]) -> None:
        port = free_port()
        self.ports[name] = port
        command = [sys.executable, "-m", "specd.cli", "serve", role, "--port", str(port), *args]
        log = open(os.path.join(self.log_dir, f"{name}.log"), "ab") if self.log_dir else subprocess.DEVNULL
        self.processes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=log,
                                                start_new_session=True)

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
        return self.address

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['coordinator']}"

    @property
    def http_url(self) -> str:
        """The HTTP tier's base URL; OpenAI clients take it with /v1 appended."""
        return f"http://127.0.0.1:{self.ports['http']}"

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.processes[name].send_signal(sig)
        self.processes[name].wait(30)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def exit_on_sigterm() -> None:
    """Python ends on SIGTERM without running `finally`, which would leave a stack's services running."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


# The speculation policy `specd up` and the shipped deployments serve: the one bench.load measures best.
UP_POLICY = "smartspec"


def default_threads() -> tuple[int, int]:
    """(verifier, drafter) threads: the verifier takes every core and the drafter's share them. When SmartSpec
    stops drafting under load the verifier has the whole machine; while both run, the kernel lets the verifier's
    own thread take the chunks of a worker the drafter holds up (bench/RESULTS.md compares the layouts)."""
    cores = os.cpu_count() or 2
    return cores, max(1, cores // 4)

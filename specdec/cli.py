"""The `specd` command line: serve, up, generate, health (and the trainer's commands)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

from specdec.config import SETTINGS_BY_ROLE, ConfigError, load_settings

SERVE_ROLES = ("verifier", "drafter", "coordinator")


def add_settings_flags(parser: argparse.ArgumentParser, role: str) -> None:
    """One --flag per settings field, so CLI, env and config files share a schema."""
    parser.add_argument("--config", help="YAML settings file (also SPECD_CONFIG)")
    for name, field in SETTINGS_BY_ROLE[role].model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        else:
            parser.add_argument(flag, dest=name, default=None, help=field.description)


def settings_from_args(role: str, args: argparse.Namespace):
    fields = SETTINGS_BY_ROLE[role].model_fields
    overrides = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    return load_settings(role, overrides, args.config)


def _serve(args) -> int:
    from specdec.logs import setup_logging

    try:
        settings = settings_from_args(args.role, args)
    except ConfigError as err:
        print(f"specd: {err}", file=sys.stderr)
        return 2
    setup_logging(args.role, settings.log_level, settings.log_json)
    if args.role == "verifier":
        from verifier_svc.server import serve
    elif args.role == "drafter":
        from drafter_svc.server import serve
    else:
        from coordinator.server import serve
    try:
        asyncio.run(serve(settings))
    except (RuntimeError, ValueError, OSError) as err:
        print(f"specd {args.role}: {err}", file=sys.stderr)
        return 1
    return 0


# -- health ---------------------------------------------------------------------------------------

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


def _health(args) -> int:
    ok = check_health(args.addr, args.service, args.timeout)
    print("SERVING" if ok else "NOT_SERVING")
    return 0 if ok else 1


# -- up: the three services as local processes ----------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalStack:
    """Drafter, verifier and coordinator as separate processes on loopback."""

    def __init__(self, target: str, drafter: str, threads_verifier: int, threads_drafter: int, extra_env=None,
                 coordinator_args: list[str] | None = None, verifier_count: int = 1, log_dir: str | None = None,
                 drafter_args: list[str] | None = None):
        self.target, self.drafter = target, drafter
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
        command = [sys.executable, "-m", "specdec.cli", "serve", role, "--port", str(port), *args]
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
                if check_health(f"127.0.0.1:{self.ports[name]}", timeout_s=1.0):
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
        return self.address

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['coordinator']}"

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


def default_threads() -> tuple[int, int]:
    """Gives the drafter its own core(s) so it drafts while the verifier verifies."""
    cores = os.cpu_count() or 2
    drafter = max(1, cores // 4)
    return max(1, cores - drafter), drafter


DEMO_PROMPT = "Explain in three sentences why speculative decoding makes language models faster."


def _up(args) -> int:
    exit_on_sigterm()
    verifier_threads, drafter_threads = default_threads()
    log_dir = args.log_dir or os.path.join(os.getcwd(), ".specd", "logs")
    os.makedirs(log_dir, exist_ok=True)
    stack = LocalStack(args.target, args.drafter, args.threads_verifier or verifier_threads,
                       args.threads_drafter or drafter_threads, log_dir=log_dir,
                       coordinator_args=["--mode", args.mode, "--policy", args.policy],
                       drafter_args=["--prompt-lookup"] if args.prompt_lookup else None)
    print(f"specd: starting verifier ({args.target}) and drafter ({args.drafter}); logs in {log_dir}", file=sys.stderr,
          flush=True)
    try:
        address = stack.start()
        print(address, flush=True)
        if args.demo:
            return _stream_to_terminal(address, DEMO_PROMPT, args.demo_tokens, 0.0, raw=False, as_json=False)
        while True:
            signal.pause()  # until Ctrl-C (KeyboardInterrupt) or SIGTERM (SystemExit)
    except KeyboardInterrupt:
        return 0
    except RuntimeError as err:
        print(f"specd up: {err}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


# -- generate ---------------------------------------------------------------------------------------

def _stream_to_terminal(addr: str, prompt: str, max_new_tokens: int, temperature: float, raw: bool, as_json: bool,
                        token: str = "", **kwargs) -> int:
    import grpc

    from specdec.client import SpecdClient, stats_dict
    from specdec.v1 import generation_pb2

    client = SpecdClient(addr, token=token)
    token_ids, text, stats, finish = [], [], {}, ""
    try:
        for chunk in client.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, raw=raw, **kwargs):
            token_ids.extend(chunk.token_ids)
            text.append(chunk.text)
            if not as_json and chunk.text:
                print(chunk.text, end="", flush=True)
            if chunk.done:
                stats, finish = stats_dict(chunk.stats), generation_pb2.FinishReason.Name(chunk.finish_reason)
    except grpc.RpcError as err:
        print(f"specd generate: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if as_json:
        print(json.dumps({"token_ids": token_ids, "text": "".join(text), "finish_reason": finish, "stats": stats}))
    else:
        print("\n\n" + " ".join(f"{k}={round(v, 2) if isinstance(v, float) else v}" for k, v in stats.items()))
    return 0


def _generate(args) -> int:
    kwargs = dict(top_p=args.top_p, top_k=args.top_k, seed=args.seed, policy=args.policy or "", mode=args.mode or "",
                  stop=args.stop or [], draft_length=args.draft_length, ignore_eos=args.ignore_eos)
    return _stream_to_terminal(args.addr, args.prompt, args.max_new_tokens, args.temperature, args.raw, args.json,
                               token=args.token or os.environ.get("SPECD_AUTH_TOKEN", ""), **kwargs)


# -- parser -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specd", description="Distributed speculative decoding")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run one service")
    roles = serve.add_subparsers(dest="role", required=True)
    for role in SERVE_ROLES:
        add_settings_flags(roles.add_parser(role, help=f"run the {role}"), role)
    serve.set_defaults(handler=_serve)

    up = commands.add_parser("up", help="start drafter, verifier and coordinator locally")
    up.add_argument("--target", default="smollm2-135m")
    up.add_argument("--drafter", default="ngram", help="model dir, .gguf, preset, 'ngram' or 'none'")
    up.add_argument("--mode", default="overlapped", choices=["sequential", "overlapped", "target_only"])
    up.add_argument("--policy", default="pearl")
    up.add_argument("--prompt-lookup", action="store_true",
                    help="a model drafter drafts prompt-lookup matches first, where the context repeats itself")
    up.add_argument("--threads-verifier", type=int, default=0)
    up.add_argument("--threads-drafter", type=int, default=0)
    up.add_argument("--log-dir", default="")
    up.add_argument("--demo", action="store_true", help="stream one demo answer, print stats, stop")
    up.add_argument("--demo-tokens", type=int, default=96)
    up.set_defaults(handler=_up)

    generate = commands.add_parser("generate", help="stream a completion from a coordinator")
    generate.add_argument("--addr", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append")
    generate.add_argument("--policy", default="")
    generate.add_argument("--mode", default="")
    generate.add_argument("--draft-length", type=int, default=0)
    generate.add_argument("--ignore-eos", action="store_true")
    generate.add_argument("--raw", action="store_true", help="skip the chat template")
    generate.add_argument("--json", action="store_true", help="print one JSON object")
    generate.add_argument("--token", default="", help="bearer token (or SPECD_AUTH_TOKEN)")
    generate.set_defaults(handler=_generate)

    health = commands.add_parser("health", help="exit 0 when a service reports SERVING")
    health.add_argument("--addr", required=True)
    health.add_argument("--service", default="")
    health.add_argument("--timeout", type=float, default=2.0)
    health.set_defaults(handler=_health)

    # Listed for --help only: main() hands every argument after it to the demo's own parser.
    commands.add_parser("osd-demo", help="live online-learning demo: acceptance over a domain shift", add_help=False)

    try:
        from trainer.cli import add_subcommands
    except ImportError:
        pass  # the trainer is optional in slim images
    else:
        add_subcommands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["osd-demo"]:
        from bench.osd_demo import main as osd_demo

        return osd_demo(argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())

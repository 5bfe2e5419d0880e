"""The `specd` command line: serve, up, generate, health, models (and the trainer's commands)."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import signal
import sys

from specd.model_install import add_subcommands as add_model_commands
from specd.stack import LocalStack, check_health, check_http_health, default_threads, exit_on_sigterm
from specdec.config import DEFAULT_POLICY, ConfigError, add_settings_flags, settings_from_args

SERVE_ROLES = ("verifier", "drafter", "coordinator", "http")


def _serve(args) -> int:
    from specdec.logs import setup_logging

    try:
        settings = settings_from_args(args.role, args)
    except ConfigError as err:
        print(f"specd: {err}", file=sys.stderr)
        return 2
    # A native crash (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL) writes the signal and every thread's Python
    # stack to stderr, the service's log, before the process dies.
    faulthandler.enable(all_threads=True)
    setup_logging(args.role, settings.log_level, settings.log_json)
    if args.role == "verifier":
        from verifier_svc.server import serve
    elif args.role == "drafter":
        from drafter_svc.server import serve
    elif args.role == "http":
        from http_svc.server import serve
    else:
        from coordinator.server import serve
    try:
        asyncio.run(serve(settings))
    except (RuntimeError, ValueError, OSError) as err:
        print(f"specd {args.role}: {err}", file=sys.stderr)
        return 1
    return 0


# -- health ---------------------------------------------------------------------------------------

def _health(args) -> int:
    if args.addr.startswith(("http://", "https://")):  # the HTTP tier: its /health
        ok = check_http_health(args.addr.rstrip("/"), args.timeout)
    else:
        ok = check_health(args.addr, args.service, args.timeout)
    print("SERVING" if ok else "NOT_SERVING")
    return 0 if ok else 1


DEMO_PROMPT = "Explain in three sentences why speculative decoding makes language models faster."


def _up(args) -> int:
    exit_on_sigterm()
    verifier_threads, drafter_threads = default_threads()
    log_dir = args.log_dir or os.path.join(os.getcwd(), ".specd", "logs")
    os.makedirs(log_dir, exist_ok=True)
    stack = LocalStack(args.target, args.drafter, args.threads_verifier or verifier_threads,
                       args.threads_drafter or drafter_threads, log_dir=log_dir,
                       coordinator_args=["--mode", args.mode, "--policy", args.policy],
                       drafter_args=["--prompt-lookup"] if args.prompt_lookup else None, http=True)
    print(f"specd: starting verifier ({args.target}) and drafter ({args.drafter}); logs in {log_dir}", file=sys.stderr,
          flush=True)
    try:
        address = stack.start()
        print(address, flush=True)
        print(f"{stack.http_url}/v1", flush=True)
        if args.demo:
            _stream_to_terminal(address, DEMO_PROMPT, args.demo_tokens, 0.0, raw=False, as_json=False)
        # Printed once the demo is done, so it is the last thing on the screen while the stack serves.
        print(f"specd: serving until Ctrl-C; OpenAI-compatible API at {stack.http_url}/v1; try\n"
              f"  {curl_line(stack.http_url, args.target)}\n  {openai_line(stack.http_url, args.target)}",
              file=sys.stderr, flush=True)
        while True:
            signal.pause()  # until Ctrl-C (KeyboardInterrupt) or SIGTERM (SystemExit)
    except KeyboardInterrupt:
        return 0
    except RuntimeError as err:
        print(f"specd up: {err}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


def curl_line(base_url: str, model: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32})
    return f"curl -s {base_url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"


def openai_line(base_url: str, model: str) -> str:
    return (f"python -c \"from openai import OpenAI; print(OpenAI(base_url='{base_url}/v1', api_key='-')"
            f".chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hi!'}}])"
            f".choices[0].message.content)\"")


# -- generate ---------------------------------------------------------------------------------------

def _stream_to_terminal(addr: str, prompt: str, max_new_tokens: int, temperature: float, raw: bool, as_json: bool,
                        token: str = "", **kwargs) -> int:
    import grpc

    from specdec.v1 import generation_pb2
    from specdec.wire.client import SpecdClient, stats_dict

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
    up.add_argument("--policy", default=DEFAULT_POLICY)
    up.add_argument("--prompt-lookup", action="store_true",
                    help="a model drafter drafts prompt-lookup matches first, where the context repeats itself")
    up.add_argument("--threads-verifier", type=int, default=0)
    up.add_argument("--threads-drafter", type=int, default=0)
    up.add_argument("--log-dir", default="")
    up.add_argument("--demo", action="store_true", help="stream one demo answer and its stats, then keep serving")
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
    health.add_argument("--addr", required=True, help="host:port of a gRPC service, or the HTTP tier's http://host:port")
    health.add_argument("--service", default="")
    health.add_argument("--timeout", type=float, default=2.0)
    health.set_defaults(handler=_health)

    add_model_commands(commands)

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
        from specd.osd_demo import main as osd_demo

        return osd_demo(argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())

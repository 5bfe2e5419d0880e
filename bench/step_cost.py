"""What one batched decode step of the verifier's model costs with N sessions in it.

    python -m bench.step_cost                                  # 1, 8 and 16 sessions on the bundled target
    python -m bench.step_cost --sessions 1,4,8,16,32 --context 300 --threads 2

Each session holds --context tokens of KV; one step feeds every session one new token in one
packed pass (specdec/compute/packed.py), as the verifier's scheduler does for target-only decoding. Prints
the median pass time, the tokens per second the model alone could serve that way, the share of the
pass spent in attention over the paged KV, and what the attention kernel's input checks cost (shapes,
dtypes and layout in Python; the linears' checks are two integer compares a call).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdec.compute import small_gemm
from specdec.compute.model_runner import ModelRunner
from specdec.compute.sessions import KVSession
from specdec.models.loader import configure_threads, load_model


def step_ms(runner: ModelRunner, sessions: int, context: int, repeats: int) -> tuple[float, float, float]:
    """Median ms of one step over `sessions` sessions, of its attention calls, and of their input checks."""
    spent = {"paged_attention": 0.0, "check_attention_inputs": 0.0}
    originals = {name: getattr(small_gemm, name) for name in spent}

    def timed(name):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started
        return call

    live = []
    for i in range(sessions):
        session = KVSession(f"step-{i}", ids=[(7 * i + j) % 1000 + 10 for j in range(context)])
        runner.extend([session], keep_logits=0)
        live.append(session)
    passes, attention, checks = [], [], []
    for name in spent:
        setattr(small_gemm, name, timed(name))
    try:
        for repeat in range(repeats + 2):
            for session in live:
                session.ids.append(11 + repeat)
            spent.update(dict.fromkeys(spent, 0.0))
            started = time.perf_counter()
            runner.extend(live)
            if repeat >= 2:  # the first steps grow the KV store
                passes.append((time.perf_counter() - started) * 1e3)
                attention.append(spent["paged_attention"] * 1e3)
                checks.append(spent["check_attention_inputs"] * 1e3)
    finally:
        for name, original in originals.items():
            setattr(small_gemm, name, original)
    return statistics.median(passes), statistics.median(attention), statistics.median(checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--sessions", default="1,8,16")
    parser.add_argument("--context", type=int, default=100, help="tokens of KV each session holds")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    loaded = load_model(args.target)
    runner = ModelRunner(loaded.model, loaded.device, small_gemm=True, gguf_path=loaded.gguf_path)
    print(f"{args.target}, {args.context} tokens of KV per session, {args.threads} thread(s)")
    print("| sessions | step ms | tokens/s | attention ms | input checks ms (share of the step) |")
    print("|---|---|---|---|---|")
    for sessions in (int(n) for n in args.sessions.split(",")):
        ms, attention_ms, checks_ms = step_ms(runner, sessions, args.context, args.repeats)
        print(f"| {sessions} | {ms:.1f} | {sessions / ms * 1e3:.0f} | {attention_ms:.2f} | {checks_ms:.3f} "
              f"({100 * checks_ms / ms:.1f}%) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

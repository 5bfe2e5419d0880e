"""How a verify forward's cost grows with the number of tokens it checks.

Speculative decoding pays when verifying k+1 tokens costs about one decode
step. On a GPU it does; on a small CPU it may not, and this measures it:
one cached forward of n new tokens after a prompt, per torch thread count, with
torch's BLAS linears and with specd's small-batch kernel (specdec/small_gemm.c).

    python -m bench.verify_cost --target smollm2-135m --tokens 1,2,4,6,8 --threads 1,2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdec import small_gemm
from specdec.models import load_model


def forward_ms(model, context: int, tokens: int, repeats: int) -> float:
    """Median ms of one forward of `tokens` new ids on a `context`-token KV cache."""
    prompt = torch.arange(100, 100 + context).unsqueeze(0)  # [1, context]
    block = torch.full((1, tokens), 5, dtype=torch.long)  # [1, tokens]
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            cache = model(input_ids=prompt, use_cache=True).past_key_values
            start = time.perf_counter()
            model(input_ids=block, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def time_blocks(model, threads: list[int], tokens: list[int], context: int, repeats: int) -> dict[tuple[int, int], float]:
    """(threads, tokens) -> median forward ms."""
    times = {}
    for count in threads:
        torch.set_num_threads(count)
        for block in tokens:
            times[(count, block)] = forward_ms(model, context, block, repeats)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--tokens", default="1,2,4,6,8", help="block sizes to time; the first is the reference")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to time")
    parser.add_argument("--context", type=int, default=80, help="cached tokens before the block")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    tokens = [int(n) for n in args.tokens.split(",")]
    model = load_model(args.target).model
    blas = time_blocks(model, threads, tokens, args.context, args.repeats)
    kernel = time_blocks(model, threads, tokens, args.context, args.repeats) if small_gemm.install(model) else None
    print("| threads | tokens | BLAS ms | vs BLAS 1 token | kernel ms | vs kernel 1 token | vs BLAS 1 token |")
    print("|---|---|---|---|---|---|---|")
    for (count, block), ms in blas.items():
        one = blas[(count, tokens[0])]
        line = f"| {count} | {block} | {ms:.1f} | {ms / one:.2f}x |"
        if kernel is None:
            line += " (no kernel here) | | |"
        else:
            fast = kernel[(count, block)]
            line += f" {fast:.1f} | {fast / kernel[(count, tokens[0])]:.2f}x | {fast / one:.2f}x |"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

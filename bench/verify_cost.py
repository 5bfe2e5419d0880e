"""How a verify forward's cost grows with the number of tokens it checks.

Speculative decoding pays when verifying k+1 tokens costs about one decode
step. On a GPU it does; on a small CPU it may not, and this measures it:
one cached forward of n new tokens after a prompt, per torch thread count.

    python -m bench.verify_cost --target smollm2-135m --tokens 1,2,4,6,8 --threads 1,2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--tokens", default="1,2,4,6,8", help="block sizes to time")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to time")
    parser.add_argument("--context", type=int, default=80, help="cached tokens before the block")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    model = load_model(args.target).model
    print("| threads | tokens | forward ms (median) | vs 1 token |\n|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        single = None
        for tokens in (int(n) for n in args.tokens.split(",")):
            ms = forward_ms(model, args.context, tokens, args.repeats)
            single = single or ms
            print(f"| {threads} | {tokens} | {ms:.1f} | {ms / single:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How a verify forward's cost grows with the number of tokens it checks.

Speculative decoding pays when verifying k+1 tokens costs about one decode
step. On a GPU it does; on a small CPU it may not, and this measures it:
one cached forward of n new tokens after a prompt, per torch thread count, with
torch's BLAS linears, with specd's small-batch kernel (specdec/compute/small_gemm.c), and,
for a GGUF target, with that kernel reading the file's Q4_1/Q8_0 blocks. A target loaded quantised
(K-quant GGUFs such as qwen2.5-coder-1.5b: specdec/compute/quant_gemm.c, no fp32 weights, so no BLAS
row) is timed on its kernel alone, with the kernel's threads set to each count.
It also prints the compute floor of each block: the model's linear multiply-adds
for that many tokens at the multiply-add rate one thread sustains on cache-resident
matrices. Once a block's floor passes the 1-token time (which is bound by streaming
the weights), verifying more tokens cannot be free on this CPU, whatever the kernel.

    python -m bench.verify_cost --target smollm2-135m --tokens 1,2,4,6,8 --threads 1,2
    python -m bench.verify_cost --target qwen2.5-coder-1.5b --tokens 1,2,4,8,16 --threads 2

With a GGUF target and llama.cpp built (bench/setup_llamacpp.sh), llama-bench times one pass over the
same numbers of rows on the same file and threads in the same run (its pp1, pp2, ... tests), beside
specd's: the CPU peer's verify-cost curve.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from specdec.compute import gguf_blocks, small_gemm
from specdec.compute.quant_weights import QuantLinear
from specdec.models.loader import load_model


def forward_ms(model, context: int, blocks: list[int], repeats: int) -> dict[int, float]:
    """Median ms of one forward of n new ids on a `context`-token KV cache, for each n in `blocks`.

    Block sizes take turns within each repeat, so a burst of machine noise hits all of them alike.
    """
    prompt = torch.arange(100, 100 + context).unsqueeze(0)  # [1, context]
    times: dict[int, list[float]] = {n: [] for n in blocks}
    with torch.inference_mode():
        for _ in range(repeats):
            for n in blocks:
                cache = model(input_ids=prompt, use_cache=True).past_key_values
                block = torch.full((1, n), 5, dtype=torch.long)  # [1, n]
                start = time.perf_counter()
                model(input_ids=block, past_key_values=cache, use_cache=True)
                times[n].append(time.perf_counter() - start)
    return {n: 1000 * statistics.median(t) for n, t in times.items()}


def fma_rate(size: int = 256, calls: int = 20, repeats: int = 15) -> float:
    """Multiply-adds per second of torch.mm on size x size fp32 matrices that fit in cache."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return calls * size ** 3 / best


def linear_macs_per_token(model) -> int:
    """Multiply-adds of one token through every linear layer, quantised ones too (LM head included)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, (torch.nn.Linear, QuantLinear)))


def time_blocks(model, threads: list[int], tokens: list[int], context: int, repeats: int,
                kernel_threads: bool = False) -> dict[tuple[int, int], float]:
    """(threads, tokens) -> median forward ms; `kernel_threads`: the kernel gets the threads, torch one."""
    times = {}
    for count in threads:
        torch.set_num_threads(1 if kernel_threads else count)
        if kernel_threads:
            small_gemm.set_threads(count)
        for block, ms in forward_ms(model, context, tokens, repeats).items():
            times[(count, block)] = ms
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
    loaded = load_model(args.target)
    model = loaded.model
    macs = linear_macs_per_token(model)
    rates = {}
    for count in threads:
        torch.set_num_threads(count)
        rates[count] = fma_rate()
        print(f"threads {count}: {rates[count] / 1e9:.1f} G multiply-adds/s on cache-resident matrices; "
              f"the linears take {macs / 1e6:.0f} M per token")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        return print_quantised(model, threads, tokens, args, macs, rates, loaded.gguf_path)
    blas = time_blocks(model, threads, tokens, args.context, args.repeats)
    kernel = time_blocks(model, threads, tokens, args.context, args.repeats) if small_gemm.install(model) else None
    blocks = None
    if kernel is not None and loaded.gguf_path and gguf_blocks.attach(model, loaded.gguf_path):
        blocks = time_blocks(model, threads, tokens, args.context, args.repeats)
    print("| threads | tokens | compute floor ms | BLAS ms | vs BLAS 1 token | kernel ms | vs kernel 1 token "
          "| GGUF blocks ms | vs blocks 1 token | best vs BLAS 1 token |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (count, block), ms in blas.items():
        one = blas[(count, tokens[0])]
        line = f"| {count} | {block} | {1000 * block * macs / rates[count]:.1f} | {ms:.1f} | {ms / one:.2f}x |"
        best = ms
        for timed in (kernel, blocks):
            if timed is None:
                line += " – | – |"
            else:
                line += f" {timed[(count, block)]:.1f} | {timed[(count, block)] / timed[(count, tokens[0])]:.2f}x |"
                best = min(best, timed[(count, block)])
        print(line + f" {best / one:.2f}x |")
    return 0


LLAMA_BENCH = Path(os.environ.get("SPECD_LLAMACPP_DIR", Path.home() / ".cache/specd/llama.cpp")) / "build/bin/llama-bench"


def llamacpp_pass_ms(gguf: Path, threads: int, tokens: list[int], repeats: int) -> dict[int, float] | None:
    """llama-bench's mean ms for one pass over n rows (its pp<n> test), per n; None without llama.cpp."""
    if not LLAMA_BENCH.exists():
        return None
    command = [str(LLAMA_BENCH), "-m", str(gguf), "-t", str(threads), "-p", ",".join(map(str, tokens)), "-n", "0",
               "-r", str(repeats), "-o", "json"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return {int(test["n_prompt"]): 1000 * int(test["n_prompt"]) / float(test["avg_ts"]) for test in json.loads(result.stdout)}


def print_quantised(model, threads: list[int], tokens: list[int], args, macs: int, rates: dict[int, float],
                    gguf: Path | None) -> int:
    """The quantised kernel's curve, each block's time against the first's, beside llama.cpp's on the same file."""
    timed = time_blocks(model, threads, tokens, args.context, args.repeats, kernel_threads=True)
    peer = {count: llamacpp_pass_ms(gguf, count, tokens, min(args.repeats, 5)) if gguf else None for count in threads}
    print("| threads | tokens | fp32 compute floor ms | specd ms | vs 1 token | llama.cpp ms | vs 1 token "
          "| specd vs llama.cpp |")
    print("|---|---|---|---|---|---|---|---|")
    for (count, block), ms in timed.items():
        one = timed[(count, tokens[0])]
        line = f"| {count} | {block} | {1000 * block * macs / rates[count]:.1f} | {ms:.1f} | {ms / one:.2f}x |"
        theirs = peer[count]
        if theirs:
            line += f" {theirs[block]:.1f} | {theirs[block] / theirs[tokens[0]]:.2f}x | {theirs[block] / ms:.2f}x |"
        else:
            line += " – | – | – |"
        print(line)
    if not any(peer.values()):
        print("llama.cpp: not built (bash bench/setup_llamacpp.sh) or the target is not a GGUF")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

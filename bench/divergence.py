"""Where specd's greedy output on a quantised GGUF target first parts from transformers' fp32 greedy output.

    python -m bench.divergence --target qwen2.5-coder-1.5b --prompts 8 --max-new-tokens 64

specd reads the file's K-quant blocks and computes with 8-bit activations (specdec/compute/quant_gemm.c);
transformers dequantises the same GGUF to fp32 (about 7 GB for the 1.5B) and runs its own kernels. Both are
greedy on the same token ids (the chat template; half the prompts chat, half code-edit). Where they part, the
fp32 model's top-two logit gap at that position says whether it was a near tie (the two numerics rounding a
close call apart) or a real difference. Writes --out/divergence.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.load import chat_ids, read_prompts
from specd.stack import LocalStack
from specdec.client import SpecdClient
from specdec.models.sources import load_tokenizer, resolve_source

HERE = Path(__file__).resolve().parent


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where the sequences differ (a length difference counts), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def fp32_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and, per step, the gap between its top two logits."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=[], output_scores=True, return_dict_in_generate=True)
    gaps = [float(step[0].topk(2).values.diff().abs()) for step in out.scores]
    return out.sequences[0, len(prompt):].tolist(), gaps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--prompts", type=int, default=8, help="half chat, half code-edit")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "divergence"))
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(args.target)
    chat = read_prompts(HERE / "prompts" / "suite.jsonl", args.prompts // 2, "chat")
    edits = read_prompts(HERE / "prompts" / "code_edit.jsonl", args.prompts - len(chat), "code-edit")
    rows = chat + edits
    prompts = [chat_ids(tokenizer, row["prompt"]) for row in rows]

    stack = LocalStack(args.target, "none", threads_verifier=args.threads, threads_drafter=1,
                       coordinator_args=["--mode", "target_only"])
    try:
        with SpecdClient(stack.start(timeout_s=600)) as client:
            specd = [client.generate(token_ids=p, max_new_tokens=args.max_new_tokens, ignore_eos=True).token_ids
                     for p in prompts]
    finally:
        stack.stop()

    torch.set_num_threads(args.threads)
    source = resolve_source(args.target)
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                                 dtype=torch.float32)
    print(f"transformers fp32 loaded in {time.monotonic() - started:.0f}s", flush=True)
    results = []
    for row, prompt, ours in zip(rows, prompts, specd):
        theirs, gaps = fp32_greedy(model, prompt, args.max_new_tokens)
        at = first_difference(list(ours), theirs)
        results.append({"prompt": row["id"], "prompt_tokens": len(prompt), "first_difference": at,
                        "fp32_top2_gap": gaps[at] if at is not None and at < len(gaps) else None,
                        "specd": list(ours), "fp32": theirs})
        print(f"{row['id']}: {'equal' if at is None else f'first difference at token {at}'}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "divergence.json").write_text(json.dumps({"target": args.target, "max_new_tokens": args.max_new_tokens,
                                                     "results": results}, indent=1))
    print(f"\n| prompt | prompt tokens | first differing token (of {args.max_new_tokens}) | fp32 top-2 logit gap there |")
    print("|---|---|---|---|")
    for r in results:
        where = "none" if r["first_difference"] is None else str(r["first_difference"])
        gap = "–" if r["fp32_top2_gap"] is None else f"{r['fp32_top2_gap']:.3f}"
        print(f"| {r['prompt']} | {r['prompt_tokens']} | {where} | {gap} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Offline acceptance of a feature-level (EAGLE) drafter on the bench prompts, per category.

The target greedily continues each prompt; the drafter then drafts greedy
blocks from every continuation position exactly as serving would
(trainer.eagle.draft_acceptance: the target's features up to the last
verified token, its own after that). No services, no timing: this isolates
the drafter's quality from the pipeline's costs.

    python -m bench.feature_acceptance --drafter smollm2-135m-eagle --per-category 2
    python -m bench.feature_acceptance --drafter smollm2-135m-eagle --drafter ./checkpoints-eagle/v000003

`--drafter` repeats: every drafter is scored on the same continuations.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from bench.run import HERE, read_prompts
from specdec.compute.model_runner import ModelRunner
from specdec.models.loader import load_model
from trainer.bootstrap import encode_prompt, greedy_with_features, padding_id
from trainer.eagle import FeatureSequence, draft_acceptance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", action="append", required=True,
                        help="a feature drafter directory (e.g. a checkpoint version); repeatable")
    parser.add_argument("--prompts", default=str(HERE / "prompts" / "suite.jsonl"))
    parser.add_argument("--per-category", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--blocks", default="3,4", help="draft block lengths to score")
    parser.add_argument("--draft-weights", default="q8_0", choices=["fp32", "q8_0"],
                        help="round the drafter's weights as the drafter service does (its draft_weights setting)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    target = load_model(args.target)
    prompts = read_prompts(Path(args.prompts), args.per_category)
    data = []
    for prompt in prompts:  # one at a time: unpadded, as the verifier serves them
        [sample] = greedy_with_features(target.model, [encode_prompt(target.tokenizer, prompt.text)],
                                        args.max_new_tokens, padding_id(target.tokenizer), set(target.eos_token_ids))
        data.append(FeatureSequence.of_sample(sample))
    by_category = defaultdict(list)
    for prompt, item in zip(prompts, data):
        by_category[prompt.category].append(item)
    report: dict = {"draft_weights": args.draft_weights, "prompts": len(prompts)}
    for path in args.drafter:
        drafter = load_model(path, tokenizer_from=args.target).model
        # The drafter service's own set-up: the small-batch kernel, weights rounded to `draft_weights`.
        ModelRunner(drafter, torch.device("cpu"), small_gemm=True,
                    quantise_to="" if args.draft_weights == "fp32" else args.draft_weights)
        report[path] = {f"block {block}": {"all": draft_acceptance(drafter, data, block),
                                           **{c: draft_acceptance(drafter, items, block)
                                              for c, items in by_category.items()}}
                        for block in (int(b) for b in args.blocks.split(","))}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

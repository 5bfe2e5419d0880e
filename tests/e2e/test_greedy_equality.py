"""Greedy output equals the target's own greedy output, through real gRPC services."""

from __future__ import annotations

import random

import pytest
from conftest import InProcessStack, hf_greedy

from specdec.client import SpecdClient

ARCHS = ["llama", "qwen2", "gpt2"]
NEW_TOKENS = 24


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        base = [rng.randrange(256) for _ in range(rng.randrange(3, 12))]
        # Some prompts repeat themselves so the n-gram drafter finds matches.
        prompts.append(base * 3 if index % 2 else base)
    return prompts


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request, tiny_dirs):
    dirs = tiny_dirs[request.param]
    prompts = _prompts(4, seed=ARCHS.index(request.param))
    references = [hf_greedy(dirs["target"], p, NEW_TOKENS) for p in prompts]
    return request.param, dirs, prompts, references


@pytest.mark.parametrize("drafter_kind", ["close", "close+lookup", "pruned", "unrelated", "target", "ngram"])
def test_greedy_equals_target_for_every_draft_length(arch_case, drafter_kind):
    arch, dirs, prompts, references = arch_case
    drafter = "ngram" if drafter_kind == "ngram" else dirs[drafter_kind.removesuffix("+lookup")]
    overrides = {"prompt_lookup": True} if drafter_kind.endswith("+lookup") else None
    stack = InProcessStack(dirs["target"], drafter, drafter_overrides=overrides)
    try:
        client = SpecdClient(stack.address)
        totals = {"drafted": 0, "accepted": 0, "looked_up": 0}
        for index, (prompt, reference) in enumerate(zip(prompts, references)):
            # Four prompts x two modes cover every draft length 1..8.
            for mode, draft_length in (("sequential", index + 1), ("overlapped", index + 5)):
                result = client.generate(token_ids=prompt, max_new_tokens=NEW_TOKENS, mode=mode, policy="static",
                                         draft_length=draft_length)
                assert result.token_ids == reference, (arch, drafter_kind, mode, draft_length, index)
                # the drafter's own tokens; the coordinator's prompt-lookup blocks are counted apart
                totals["drafted"] += result.stats["drafted_tokens"] - result.stats["lookup_drafted_tokens"]
                totals["accepted"] += result.stats["accepted_tokens"] - result.stats["lookup_accepted_tokens"]
                totals["looked_up"] += result.stats["lookup_drafted_tokens"]
        # the n-gram drafter finds what the coordinator's lookup already drafted
        assert totals["drafted"] + totals["looked_up"] > 0
        rate = totals["accepted"] / max(totals["drafted"], 1)
        if drafter_kind == "target":
            assert rate == 1.0  # the target drafting for itself: every draft token accepted
        if drafter_kind == "unrelated":
            assert rate < 0.1   # an unrelated random model: nearly every draft token rejected
    finally:
        stack.close()

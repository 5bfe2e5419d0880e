"""Many requests at once through the real services: each gets exactly the tokens it gets alone."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import InProcessStack, hf_greedy

from specdec.client import SpecdClient

NEW_TOKENS = 20
CLIENTS = 6


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(3, 14))] * (1 + i % 2) for i in range(CLIENTS)]


def _generate_all(address: str, prompts: list[list[int]], **kwargs) -> list[dict]:
    """Every prompt at once, one client thread each."""
    def one(prompt):
        with SpecdClient(address) as client:
            result = client.generate(token_ids=prompt, max_new_tokens=NEW_TOKENS, **kwargs)
            return {"tokens": result.token_ids, "stats": result.stats}

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("drafter_kind, mode, policy", [("close", "overlapped", "pearl"),
                                                        ("close", "sequential", "smartspec"),
                                                        ("ngram", "overlapped", "static")])
def test_concurrent_greedy_requests_get_the_targets_own_tokens(arch, drafter_kind, mode, policy, tiny_dirs):
    dirs = tiny_dirs[arch]
    prompts = _prompts(seed=len(arch))
    references = [hf_greedy(dirs["target"], p, NEW_TOKENS) for p in prompts]
    stack = InProcessStack(dirs["target"], "ngram" if drafter_kind == "ngram" else dirs[drafter_kind])
    try:
        together = _generate_all(stack.address, prompts, mode=mode, policy=policy, draft_length=3)
        assert [r["tokens"] for r in together] == references
        with SpecdClient(stack.address) as client:
            alone = [client.generate(token_ids=p, max_new_tokens=NEW_TOKENS, mode=mode, policy=policy,
                                     draft_length=3).token_ids for p in prompts[:2]]
        assert alone == references[:2]
    finally:
        stack.close()


def test_concurrent_sampled_requests_are_reproducible_alone_and_together(tiny_dirs):
    """Sequential sampled decoding with a seed: bit-identical logits in a batch give identical draws."""
    dirs = tiny_dirs["llama"]
    prompts = _prompts(seed=7)
    stack = InProcessStack(dirs["target"], dirs["close"])
    try:
        options = dict(mode="sequential", policy="static", draft_length=3, temperature=0.8, top_p=0.95, seed=99)
        together = _generate_all(stack.address, prompts, **options)
        with SpecdClient(stack.address) as client:
            alone = [client.generate(token_ids=p, max_new_tokens=NEW_TOKENS, **options).token_ids for p in prompts]
        assert [r["tokens"] for r in together] == alone
    finally:
        stack.close()


@pytest.mark.smollm
def test_concurrent_requests_with_the_shipped_drafter_match_target_only_decoding():
    prompts = [f"Write one sentence about the number {n}." for n in range(4)]
    stack = InProcessStack("smollm2-135m", "smollm2-135m-eagle", drafter_overrides={"target": "smollm2-135m"})
    try:
        with SpecdClient(stack.address) as client:
            references = [client.generate(prompt=p, max_new_tokens=16, mode="target_only", ignore_eos=True).token_ids
                          for p in prompts]

        def one(prompt):
            with SpecdClient(stack.address) as client:
                return client.generate(prompt=prompt, max_new_tokens=16, ignore_eos=True).token_ids

        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(one, prompts)) == references
    finally:
        stack.close()

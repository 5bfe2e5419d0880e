"""Sampling through the services follows the target; overlap, stale drafts and fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import InProcessStack, perturbed, save, tiny_model
from scipy.stats import chisquare

from specdec.client import SpecdClient
from specdec.sampling import warp_logits
from specdec.sampling_params import SamplingParams

VOCAB = 8


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab8")
    target = tiny_model("llama", seed=11, vocab_size=VOCAB)
    return target, save(target, root / "target"), save(perturbed(target, 1.0, seed=12), root / "drafter")


@pytest.mark.parametrize("mode", ["sequential", "overlapped"])
def test_sampled_tokens_follow_target_distribution(tiny_vocab, mode):
    """Chi-square on the first two generated tokens (joint, 64 cells) over many seeded requests."""
    target, target_dir, drafter_dir = tiny_vocab
    prompt = [1, 5, 2]
    params = SamplingParams(temperature=1.3, top_k=6)
    with torch.no_grad():
        first = warp_logits(target(torch.tensor([prompt])).logits[0, -1:], params)[0]
        second = torch.stack([warp_logits(target(torch.tensor([prompt + [t]])).logits[0, -1:], params)[0]
                              for t in range(VOCAB)])
    expected = (first[:, None] * second).flatten().double().numpy()
    expected /= expected.sum()
    stack = InProcessStack(target_dir, drafter_dir)
    n = 700
    try:
        client = SpecdClient(stack.address)
        counts = np.zeros(VOCAB * VOCAB)
        accepted = drafted = 0
        for seed in range(n):
            result = client.generate(token_ids=prompt, max_new_tokens=2, temperature=1.3, top_k=6, seed=seed,
                                     mode=mode, policy="static", draft_length=2)
            counts[result.token_ids[0] * VOCAB + result.token_ids[1]] += 1
            accepted += result.stats["accepted_tokens"]
            drafted += result.stats["drafted_tokens"]
    finally:
        stack.close()
    keep = expected * n >= 5  # chi-square needs populated cells; pool the rest
    observed = np.append(counts[keep], counts[~keep].sum())
    wanted = np.append(expected[keep] * n, expected[~keep].sum() * n)
    assert chisquare(observed, wanted).pvalue > 1e-3
    assert 0 < accepted < drafted  # both acceptances and rejections were exercised


def test_seeded_sampling_is_reproducible(tiny_dirs):
    dirs = tiny_dirs["qwen2"]
    stack = InProcessStack(dirs["target"], dirs["close"])
    try:
        client = SpecdClient(stack.address)
        # pearl's draft lengths depend on acceptance alone; the goodput policies' depend on timing too
        runs = [client.generate(token_ids=[4, 8, 15, 16], max_new_tokens=20, temperature=0.9, top_p=0.9, seed=42,
                                mode="sequential", policy="pearl").token_ids for _ in range(3)]
        other = client.generate(token_ids=[4, 8, 15, 16], max_new_tokens=20, temperature=0.9, top_p=0.9, seed=43,
                                mode="sequential", policy="pearl").token_ids
    finally:
        stack.close()
    assert runs[0] == runs[1] == runs[2]
    assert other != runs[0]


def test_overlap_hides_draft_time_and_discards_stale_drafts(tiny_dirs):
    dirs = tiny_dirs["llama"]
    stack = InProcessStack(dirs["target"], dirs["close"])
    try:
        client = SpecdClient(stack.address)
        prompt = [9, 8, 7, 6, 5, 4, 3, 2, 1]
        sequential = client.generate(token_ids=prompt, max_new_tokens=48, mode="sequential", policy="static", draft_length=4)
        overlapped = client.generate(token_ids=prompt, max_new_tokens=48, mode="overlapped", policy="pearl")
    finally:
        stack.close()
    assert overlapped.token_ids == sequential.token_ids
    assert overlapped.stats["hidden_draft_ms"] > 0          # drafting ran while the target verified
    assert sequential.stats["hidden_draft_ms"] < 0.05 * sequential.stats["draft_ms"] + 1
    assert overlapped.stats["stale_draft_tokens"] > 0       # some drafts were built on rejected prefixes ...
    assert overlapped.stats["new_tokens"] == 48             # ... and none leaked into the output


def test_post_verify_off_drafts_only_the_block_and_on_drafts_past_it(tiny_dirs, monkeypatch):
    """Overlapped static blocks: with post-verify off the drafter is asked for the block only, as in
    sequential mode; on, for a block past the bonus token too. The output is the same."""
    from drafter_svc.server import DrafterServicer

    asked = []
    draft = DrafterServicer.Draft

    async def recording_draft(self, request, context):
        asked.append(request.max_tokens)
        async for message in draft(self, request, context):
            yield message

    monkeypatch.setattr(DrafterServicer, "Draft", recording_draft)
    dirs = tiny_dirs["llama"]
    prompt = [9, 8, 7, 6, 5, 4, 3, 2, 1]
    results, longest = {}, {}
    for choice in ("off", "on"):
        stack = InProcessStack(dirs["target"], dirs["close"], coordinator_overrides={"post_verify": choice})
        asked.clear()
        try:
            results[choice] = SpecdClient(stack.address).generate(token_ids=prompt, max_new_tokens=40,
                                                                  mode="overlapped", policy="static", draft_length=2)
        finally:
            stack.close()
        longest[choice] = max(asked)
    assert results["off"].token_ids == results["on"].token_ids
    assert longest == {"off": 2, "on": 2 * 2 + 1}
    assert results["off"].stats["fallback_steps"] == results["on"].stats["fallback_steps"] == 0
    assert results["on"].stats["hidden_draft_ms"] > 0


def test_a_verifier_that_waits_for_no_draft_keeps_the_stream_and_the_output(tiny_dirs, monkeypatch):
    """With a zero wait budget on every other round, those rounds verify what the stream has so far,
    often nothing; the stream keeps drafting across them and the next blocks use its tokens."""
    import coordinator.policies.shared
    from coordinator.policies import DraftWait

    class NoWait(DraftWait):
        calls = 0

        def budget_s(self) -> float | None:
            self.calls += 1
            return 0.0 if self.calls % 2 else None

    monkeypatch.setattr(coordinator.policies.shared, "DraftWait", NoWait)
    dirs = tiny_dirs["qwen2"]
    stack = InProcessStack(dirs["target"], dirs["target"], coordinator_overrides={"adaptive_draft_wait": True})  # drafting for itself: every draft on the path is accepted
    try:
        client = SpecdClient(stack.address)
        prompt = [3, 1, 4, 1, 5, 9, 2, 6]
        reference = client.generate(token_ids=prompt, max_new_tokens=40, mode="target_only").token_ids
        result = client.generate(token_ids=prompt, max_new_tokens=40, mode="overlapped", policy="static",
                                 draft_length=1)
    finally:
        stack.close()
    assert result.token_ids == reference
    assert result.stats["early_verify_rounds"] > 0 and result.stats["fallback_steps"] == 0, result.stats
    assert result.stats["accepted_tokens"] > 0, result.stats  # drafts made while earlier rounds ran were used


def test_unreachable_drafter_falls_back_to_target_only(tiny_dirs):
    from conftest import InProcessStack as Stack

    dirs = tiny_dirs["gpt2"]
    stack = Stack(dirs["target"], dirs["close"])
    try:
        client = SpecdClient(stack.address)
        reference = client.generate(token_ids=[1, 2, 3], max_new_tokens=20, mode="target_only").token_ids
        stack.stop_server("drafter")
        result = client.generate(token_ids=[1, 2, 3], max_new_tokens=20, mode="overlapped")
    finally:
        stack.close()
    assert result.token_ids == reference
    assert result.stats["fallback_steps"] > 0


@pytest.mark.parametrize("mode", ["sequential", "overlapped"])
def test_goodput_policy_stops_speculating_with_a_useless_drafter_and_keeps_a_perfect_one(tiny_dirs, mode):
    """Same output either way; an unrelated drafter (nothing accepted, every round costs more) is
    switched off after the first probe, the target drafting for itself (everything accepted) is kept."""
    dirs = tiny_dirs["llama"]
    prompt, new_tokens = [5, 9, 2, 7], 48
    outcomes = {}
    for kind in ("unrelated", "target"):
        stack = InProcessStack(dirs["target"], dirs[kind])
        try:
            client = SpecdClient(stack.address)
            reference = client.generate(token_ids=prompt, max_new_tokens=new_tokens, mode="target_only").token_ids
            result = client.generate(token_ids=prompt, max_new_tokens=new_tokens, mode=mode, policy="goodput")
        finally:
            stack.close()
        assert result.token_ids == reference, kind
        assert result.stats["fallback_steps"] == 0
        outcomes[kind] = result.stats
    useless, perfect = outcomes["unrelated"], outcomes["target"]
    # 8 speculative rounds, a 4-round target-only probe that wins, then 8, later 16 more without drafts,
    # broken only by 4-round probes of speculation.
    assert useless["speculation_off_rounds"] >= 12
    assert useless["speculation_off_rounds"] >= 0.6 * useless["rounds"], useless
    assert perfect["acceptance_rate"] == 1.0 and perfect["speculation_off_rounds"] <= 4

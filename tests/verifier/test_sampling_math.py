"""The sampling math on its own: warping, greedy and speculative verification, draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specdec.sampling import (
    DraftDist,
    sample_index,
    truncate_support,
    uniform,
    verify_greedy,
    verify_speculative,
    warp_logits,
)
from specdec.sampling_params import SamplingParams


def test_warp_matches_hf_sampling_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.3, 10, 1.0), (1.0, 0, 0.8), (0.5, 7, 0.6)]:
        expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        ours = warp_logits(logits, SamplingParams(temperature, top_p, top_k))
        torch.testing.assert_close(ours, expected.softmax(-1), atol=1e-6, rtol=1e-5)


def test_greedy_warp_is_one_hot_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    assert warp_logits(logits, SamplingParams()).tolist() == [[0.0, 1.0, 0.0]]


def test_uniform_is_deterministic_and_spread():
    draws = [uniform(7, position, b"accept") for position in range(4000)]
    assert draws == [uniform(7, position, b"accept") for position in range(4000)]
    assert draws[:50] != [uniform(8, position, b"accept") for position in range(50)]
    assert draws[:50] != [uniform(7, position, b"resample") for position in range(50)]
    counts = np.histogram(draws, bins=10, range=(0, 1))[0]
    assert chisquare(counts).pvalue > 1e-3


def test_verify_greedy_accepts_matching_prefix_then_corrects():
    logits = torch.full((4, 6), -5.0)
    for slot, best in enumerate([1, 2, 3, 4]):
        logits[slot, best] = 5.0
    assert verify_greedy(logits, [1, 2, 3]) == verify_greedy(logits, [1, 2, 3]) and verify_greedy(logits, [1, 2, 3]).accepted == 3
    assert verify_greedy(logits, [1, 2, 3]).next_token == 4
    decision = verify_greedy(logits, [1, 5, 3])
    assert (decision.accepted, decision.next_token) == (1, 2)
    all_rejected = verify_greedy(logits, [0, 2, 3])
    assert (all_rejected.accepted, all_rejected.next_token, all_rejected.lossy) == (0, 1, False)


def test_bild_rollback_accepts_near_misses_and_says_lossy():
    logits = torch.tensor([[2.0, 1.9, -3.0], [0.0, 0.0, 3.0]])
    strict = verify_greedy(logits, [1])
    lossy = verify_greedy(logits, [1], bild_threshold=0.5)
    assert (strict.accepted, strict.lossy) == (0, False)
    assert (lossy.accepted, lossy.next_token, lossy.lossy) == (1, 2, True)
    assert verify_greedy(logits, [2], bild_threshold=0.5).accepted == 0  # far misses stay rejected


def _first_token_samples(p, q, n, rule):
    """Draft one token from q, verify with `rule`; returns committed first tokens."""
    out = []
    for seed in range(n):
        draft = sample_index(q, uniform(seed, 0, b"draft"))
        decision = rule(torch.stack([p, p]), [draft], q.unsqueeze(0), seed, 0)
        out.append(draft if decision.accepted == 1 else decision.next_token)
    return np.array(out)


def _wrong_rule(target_probs, draft_tokens, draft_probs, seed, first_position):
    """Accepts with probability p (not min(1, p/q)) and resamples from p: biased toward q."""
    from specdec.sampling import ACCEPT, RESAMPLE, VerifyDecision

    token = draft_tokens[0]
    if uniform(seed, first_position, ACCEPT) < float(target_probs[0, token]) + 0.3:
        return VerifyDecision(1, 0)
    return VerifyDecision(0, sample_index(target_probs[0], uniform(seed, first_position, RESAMPLE)))


P = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
Q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])


def test_speculative_sampling_follows_the_target_distribution():
    n = 6000
    samples = _first_token_samples(P, Q, n, verify_speculative)
    counts = np.bincount(samples, minlength=5)
    assert chisquare(counts, P.numpy() * n).pvalue > 1e-3


def test_a_wrong_acceptance_rule_fails_the_same_test():
    n = 6000
    samples = _first_token_samples(P, Q, n, _wrong_rule)
    counts = np.bincount(samples, minlength=5)
    assert chisquare(counts, P.numpy() * n).pvalue < 1e-6


def test_sparse_draft_support_is_exact():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    indices, values = truncate_support(probs, 2)
    assert indices.tolist() == [0, 1]
    torch.testing.assert_close(values, torch.tensor([0.4, 0.3]) / 0.7)
    dense = DraftDist(values, indices).dense(4)
    torch.testing.assert_close(dense, torch.tensor([0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0]))
    with pytest.raises(ValueError):
        DraftDist(values, torch.tensor([0, 9])).dense(4)


def test_truncated_draft_still_yields_target_distribution():
    n = 6000
    q_truncated = DraftDist(*reversed(truncate_support(Q, 2))).dense(5)
    samples = _first_token_samples(P, q_truncated, n, verify_speculative)
    assert chisquare(np.bincount(samples, minlength=5), P.numpy() * n).pvalue > 1e-3

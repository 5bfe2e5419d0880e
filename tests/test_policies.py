"""Draft-length policies and stop rules, each on its own."""

from __future__ import annotations

import math
import random

import pytest

from coordinator.policies import POLICIES, RoundCostModel, expected_committed, make_policy
from specdec.stopping import (DraftStep, StopRule, adaedl_acceptance_lower_bound, probability_some_rejected,
                              should_stop)


def test_static_never_changes():
    policy = make_policy("static", 4, 16)
    for sent, accepted in [(4, 4), (4, 0), (4, 2)]:
        policy.update(sent, accepted)
    assert (policy.block_size(), policy.min_ready(True), policy.stop_rule()[0]) == (4, 4, StopRule.NONE)


def test_heuristic_follows_hugging_face_schedule():
    policy = make_policy("heuristic", 4, 7)
    policy.update(4, 4)
    assert policy.length == 6
    policy.update(6, 6)
    assert policy.length == 7  # capped
    policy.update(7, 3)
    assert policy.length == 6
    for _ in range(10):
        policy.update(policy.length, 0)
    assert policy.length == 1  # never below one


def test_pearl_verifies_early_in_overlap_and_adapts_sequentially():
    policy = make_policy("pearl", 4, 12)
    assert policy.min_ready(overlapped=True) == 1          # pre-verify: start on the first token
    assert policy.block_size() == 12 and policy.lookahead() >= 12  # post-verify: draft on meanwhile
    for _ in range(20):
        policy.update(8, 8)
    assert policy.min_ready(overlapped=False) == 9        # tracks accepted length + 1
    for _ in range(20):
        policy.update(8, 0)
    assert policy.min_ready(overlapped=False) == 1


@pytest.mark.parametrize("name, rule", [("adaedl", StopRule.ENTROPY), ("specdecpp", StopRule.CONFIDENCE),
                                        ("bild", StopRule.MIN_CONFIDENCE)])
def test_stop_rule_policies(name, rule):
    policy = make_policy(name, 4, 10, threshold=0.25)
    assert policy.stop_rule() == (rule, 0.25)
    assert policy.block_size() == 10


def test_every_policy_is_registered():
    assert set(POLICIES) == {"static", "heuristic", "pearl", "adaedl", "specdecpp", "bild", "goodput"}


def _run_goodput(policy, rounds: int, speculative: tuple[int, float], target_only: tuple[int, float]) -> list[bool]:
    """Feeds `rounds` rounds whose (tokens committed, seconds) depend on whether the policy speculated;
    returns the choice made each round."""
    choices = []
    for _ in range(rounds):
        block = policy.block_size()
        choices.append(block > 0)
        tokens, seconds = speculative if block else target_only
        policy.record_round(block, tokens, seconds)
        if block:
            policy.update(block, min(tokens - 1, block))
    return choices


def test_goodput_turns_speculation_off_when_it_does_not_pay_and_reprobes_with_backoff():
    policy = make_policy("goodput", 4, 8)
    # A weak drafter: 1.2 tokens per 0.3 s round, against 1 token per 0.1 s without it.
    choices = _run_goodput(policy, 8 + 4 + 8 + 4 + 16 + 4, speculative=(1, 0.3), target_only=(1, 0.1))
    assert choices[:8] == [True] * 8            # starts speculating
    assert choices[8:12] == [False] * 4         # probes target-only
    assert choices[12:20] == [False] * 8        # target-only won: exploits it
    assert choices[20:24] == [True] * 4         # re-probes speculation
    assert choices[24:40] == [False] * 16       # target-only won again: twice as long before the next probe
    assert choices[40:] == [True] * 4
    assert policy.goodput(False) == pytest.approx(10.0) and policy.goodput(True) == pytest.approx(1 / 0.3)


def test_goodput_turns_off_a_drafter_that_never_gets_a_token_accepted_even_if_its_rounds_time_faster():
    # Timing noise on a busy machine can make useless speculative rounds look cheaper.
    policy = make_policy("goodput", 4, 8)
    choices = _run_goodput(policy, 8 + 4 + 8, speculative=(1, 0.09), target_only=(1, 0.1))
    assert choices[12:] == [False] * 8


def test_goodput_keeps_speculating_when_it_pays_and_switches_back_when_the_drafter_improves():
    policy = make_policy("goodput", 4, 8)
    assert not any(not c for c in _run_goodput(policy, 8, speculative=(4, 0.15), target_only=(1, 0.1)))
    choices = _run_goodput(policy, 4 + 16, speculative=(4, 0.15), target_only=(1, 0.1))
    assert choices == [False] * 4 + [True] * 16  # probed, lost, speculation exploited for twice as long

    weak = make_policy("goodput", 4, 8)
    _run_goodput(weak, 12, speculative=(1, 0.3), target_only=(1, 0.1))
    assert weak.block_size() == 0
    # The drafter got better (a new checkpoint): the next probe finds out and speculation resumes.
    choices = _run_goodput(weak, 8 + 4 + 2, speculative=(5, 0.2), target_only=(1, 0.1))
    assert choices == [False] * 8 + [True] * 4 + [True] * 2


def test_expected_committed_tokens_of_a_round():
    assert expected_committed(0.0, 5) == 1.0
    assert expected_committed(1.0, 5) == 6.0
    assert expected_committed(0.5, 2) == pytest.approx(1.75)
    assert expected_committed(0.6, 3) == pytest.approx(1 + 0.6 + 0.36 + 0.216)


def test_round_cost_line_is_fitted_on_per_size_means_and_anchored_at_target_only_until_two_sizes():
    costs = RoundCostModel()
    assert costs.line() is None
    costs.record(2, 0.12)
    assert costs.line() is None                    # one speculative size and no target-only round
    costs.record(0, 0.08)
    assert costs.line() == pytest.approx((0.08, 0.02))
    for _ in range(5):
        costs.record(4, 0.16)
    costs.record(2, 0.12)
    base, per_token = costs.line()                 # through (2, 0.12) and (4, 0.16); k=0 no longer needed
    assert (base, per_token) == pytest.approx((0.08, 0.02))
    falling = RoundCostModel()
    falling.record(1, 0.2)
    falling.record(3, 0.1)
    assert falling.line()[1] == 0.0                # timing noise never makes longer blocks look cheaper


def _simulate(policy, rounds: int, acceptance: float, base_s: float, per_token_s: float) -> list[int]:
    """Rounds against a drafter whose tokens are each accepted with probability `acceptance` and a
    verifier whose round costs base_s + per_token_s * block; returns the block size of each round."""
    draws = random.Random(0)
    sizes = []
    for _ in range(rounds):
        block = policy.block_size()
        accepted = 0
        while accepted < block and draws.random() < acceptance:
            accepted += 1
        policy.record_round(block, accepted + 1, base_s + per_token_s * block)
        if block:
            policy.update(block, accepted)
        sizes.append(block)
    return sizes


@pytest.mark.parametrize("per_token_s, expected", [(0.05, 1), (0.01, 3), (0.0, 8)])
def test_goodput_drafts_the_block_size_the_cost_of_verifying_pays_for(per_token_s, expected):
    # Per-token acceptance 0.6 against a base round of 0.1 s. The best k maximises
    # expected_committed(0.6, k) / (0.1 + per_token_s * k): 1 on a steep cost line (a compute-bound CPU),
    # 3 in between, the maximum of 8 when verifying more tokens is free (a GPU, roughly).
    policy = make_policy("goodput", 4, 8)
    sizes = _simulate(policy, 200, acceptance=0.6, base_s=0.1, per_token_s=per_token_s)
    assert policy.acceptance() == pytest.approx(0.6, abs=0.2)
    speculative = [k for k in sizes[-60:] if k]
    assert max(set(speculative), key=speculative.count) == expected


def _step(confidence=0.9, entropy=0.1, accept_prob=None):
    return DraftStep(1, confidence, entropy, confidence if accept_prob is None else accept_prob)


def test_adaedl_bound_and_stop():
    assert adaedl_acceptance_lower_bound(0.0) == 1.0
    assert adaedl_acceptance_lower_bound(2.0, gamma=0.5) == pytest.approx(0.0)
    assert not should_stop(StopRule.ENTROPY, 0.3, [_step(entropy=0.05)])
    assert should_stop(StopRule.ENTROPY, 0.3, [_step(entropy=3.0)])


def test_specdecpp_stops_on_cumulative_rejection_probability():
    assert probability_some_rejected([0.9, 0.9]) == pytest.approx(0.19)
    steps = [_step(accept_prob=0.9)]
    assert not should_stop(StopRule.CONFIDENCE, 0.3, steps)
    steps += [_step(accept_prob=0.9), _step(accept_prob=0.8)]
    assert should_stop(StopRule.CONFIDENCE, 0.3, steps)  # 1 - 0.9*0.9*0.8 = 0.352


def test_bild_fallback_stops_on_low_confidence():
    assert not should_stop(StopRule.MIN_CONFIDENCE, 0.4, [_step(confidence=0.6)])
    assert should_stop(StopRule.MIN_CONFIDENCE, 0.4, [_step(confidence=0.6), _step(confidence=0.2)])


def test_no_rule_never_stops():
    assert not should_stop(StopRule.NONE, 0.0, [_step(confidence=0.0, entropy=math.inf)])
    assert not should_stop(StopRule.ENTROPY, 1.0, [])

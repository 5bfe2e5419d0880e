"""Draft-length policies and stop rules, each on its own."""

from __future__ import annotations

import math
import random

import pytest

from coordinator.policies import POLICIES, PositionAcceptance, RoundCostModel, expected_committed, make_policy
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


def _runs(choices: list[bool]) -> list[tuple[bool, int]]:
    runs: list[tuple[bool, int]] = []
    for choice in choices:
        if runs and runs[-1][0] == choice:
            runs[-1] = (choice, runs[-1][1] + 1)
        else:
            runs.append((choice, 1))
    return runs


def test_goodput_turns_speculation_off_when_it_does_not_pay_and_reprobes_with_backoff():
    policy = make_policy("goodput", 4, 8)
    # A useless drafter: 1 token per 0.3 s round, against 1 token per 0.1 s without it.
    choices = _run_goodput(policy, 3 + 8 + 4 + 16 + 4 + 32, speculative=(1, 0.3), target_only=(1, 0.1))
    # Three rounds to time two block sizes (the first round's time, which includes the drafter's
    # prefill, is not used), then target-only; each probe of 4 speculative rounds loses again and
    # doubles the time before the next.
    assert _runs(choices) == [(True, 3), (False, 8), (True, 4), (False, 16), (True, 4), (False, 32)]
    assert policy.costs.mean(0) == pytest.approx(0.1) and policy.goodput(1) == pytest.approx(1 / 0.3)


def test_goodput_turns_off_a_drafter_that_never_gets_a_token_accepted_even_if_its_rounds_time_faster():
    # Timing noise on a busy machine can make useless speculative rounds look cheaper.
    policy = make_policy("goodput", 4, 8)
    choices = _run_goodput(policy, 3 + 8 + 4 + 16, speculative=(1, 0.09), target_only=(1, 0.1))
    assert _runs(choices) == [(True, 3), (False, 8), (True, 4), (False, 16)]


def test_goodput_keeps_speculating_when_it_pays_and_switches_back_when_the_drafter_improves():
    policy = make_policy("goodput", 4, 8)
    assert all(_run_goodput(policy, 40, speculative=(4, 0.15), target_only=(1, 0.1)))  # never probes target-only

    weak = make_policy("goodput", 4, 8)
    assert _simulate(weak, 20, acceptance=[0.0], base_s=0.1, per_token_s=0.02).count(0) >= 8
    # The drafter got better (a new checkpoint): the next probe finds out and speculation resumes.
    sizes = _simulate(weak, 40, acceptance=[0.9], base_s=0.1, per_token_s=0.02)
    assert 0 not in sizes[-20:] and max(sizes[-10:]) > 1  # resumed, and lengthening its blocks


def test_expected_committed_tokens_of_a_round():
    assert expected_committed([0.0], 5) == 1.0
    assert expected_committed([1.0], 5) == 6.0
    assert expected_committed([0.5], 2) == pytest.approx(1.75)
    assert expected_committed([0.6], 3) == pytest.approx(1 + 0.6 + 0.36 + 0.216)
    assert expected_committed([0.4, 0.9], 3) == pytest.approx(1 + 0.4 + 0.36 + 0.324)  # last rate carries on


def test_position_acceptance_judges_positions_up_to_the_first_rejection():
    positions = PositionAcceptance(decay=1.0, prior_weight=0.0)
    assert positions.rates() is None
    positions.record(4, 2)   # positions 1, 2 accepted, 3 rejected, 4 never judged
    positions.record(4, 4)   # all four accepted
    positions.record(2, 0)   # position 1 rejected
    assert positions.judged == [3, 2, 2, 1] and positions.accepted == [2, 2, 1, 1]
    assert positions.rates() == pytest.approx([2 / 3, 1.0, 0.5, 1.0])
    assert positions.pooled() == pytest.approx(6 / 8)
    shrunk = PositionAcceptance(decay=1.0, prior_weight=2.0)
    shrunk.record(1, 1)
    shrunk.record(3, 0)
    assert shrunk.rates() == pytest.approx([(1 + 2 * 0.5) / 4])  # towards the pooled 1/2


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


def _simulate(policy, rounds: int, acceptance: list[float], base_s: float, per_token_s: float) -> list[int]:
    """Rounds against a drafter whose i-th token is accepted with probability acceptance[i] (the last
    rate for deeper ones) once the tokens before it were, and a verifier whose round costs
    base_s + per_token_s * block; returns the block size of each round."""
    draws = random.Random(0)
    sizes = []
    for _ in range(rounds):
        block = policy.block_size()
        accepted = 0
        while accepted < block and draws.random() < acceptance[min(accepted, len(acceptance) - 1)]:
            accepted += 1
        policy.record_round(block, accepted + 1, base_s + per_token_s * block)
        if block:
            policy.update(block, accepted)
        sizes.append(block)
    return sizes


@pytest.mark.parametrize("per_token_s, sizes_allowed", [(0.03, {1, 2}), (0.01, {2, 3, 4}), (0.0, {8})])
def test_goodput_drafts_the_block_size_the_cost_of_verifying_pays_for(per_token_s, sizes_allowed):
    # Per-token acceptance 0.6 against a base round of 0.1 s. The best k maximises
    # expected_committed(0.6, k) / (0.1 + per_token_s * k): 1 or 2 on a steep cost line (a compute-bound
    # CPU), 3 in between, the maximum of 8 when verifying more tokens is free (a GPU, roughly).
    # Neighbours of the best are within a few percent of it, so the policy may settle on one.
    policy = make_policy("goodput", 4, 8)
    sizes = _simulate(policy, 300, acceptance=[0.6], base_s=0.1, per_token_s=per_token_s)
    assert _most_common_block(sizes[-100:]) in sizes_allowed

    def true_goodput(k: int) -> float:
        return expected_committed([0.6], k) / (0.1 + per_token_s * k)

    achieved = sum(true_goodput(k) for k in sizes[-100:]) / 100
    assert achieved >= 0.95 * max(true_goodput(k) for k in range(9))


def test_goodput_drafts_long_blocks_when_accepted_tokens_come_in_runs():
    # Prompt lookup: a match's first token is accepted 40% of the time, the rest 95%. The policy
    # learns both rates, and on this cost line a block that starts well is worth drafting to the end.
    policy = make_policy("goodput", 4, 8)
    sizes = _simulate(policy, 300, acceptance=[0.4, 0.95], base_s=0.1, per_token_s=0.01)
    rates = policy.positions.rates()
    assert rates[0] < 0.7 < 0.8 < min(rates[1:])  # one rate per position, each within its noise
    assert _most_common_block(sizes[-100:]) == 8


def _most_common_block(sizes: list[int]) -> int:
    speculative = [k for k in sizes if k]
    return max(set(speculative), key=speculative.count)


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

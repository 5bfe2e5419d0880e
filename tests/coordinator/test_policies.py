"""Draft-length policies and stop rules, each on its own."""

from __future__ import annotations

import math

import pytest

from coordinator.policies import POLICIES, DraftWait, GoodputMemory, PostVerify, make_policy
from specdec.stopping import DraftStep, StopRule, adaedl_acceptance_lower_bound, probability_some_rejected, should_stop


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


def test_draft_wait_measures_a_target_step_then_waits_only_while_waiting_pays():
    wait = DraftWait(decay=0.0)  # no smoothing: each record replaces the estimate
    assert wait.budget_s() == 0.0          # nothing measured: one target-only step measures it
    wait.record(0, 0, 0.020)
    assert wait.budget_s() is None         # the cost of a draft is unknown: wait as the policy asks
    wait.record(1, 1, 0.024)               # a draft costs 4 ms more to verify and was accepted
    assert wait.budget_s() == pytest.approx(1.0 * 0.020 - 0.004)
    wait.record(2, 0, 0.028)               # rejected: acceptance 0, so no wait can pay
    assert wait.per_draft_s == pytest.approx(0.004) and wait.budget_s() == 0.0


def test_draft_wait_budget_follows_acceptance_and_costs():
    wait = DraftWait(decay=0.9)
    wait.record(0, 0, 0.016)
    for accepted in [1, 0] * 50:           # half the first drafts accepted, each costing 4 ms
        wait.record(1, accepted, 0.020)
    assert 0.4 < wait.acceptance < 0.6
    assert wait.budget_s() == pytest.approx(wait.acceptance * 0.016 - 0.004)
    for _ in range(50):                    # the verifier gets slower (load): a step is now 40 ms
        wait.record(0, 0, 0.040)
    assert wait.budget_s() > 0.012


def test_post_verify_measures_both_choices_keeps_the_faster_and_probes_the_other():
    choice = PostVerify(decay=1.0, phase_rounds=4, probe_every=3)
    seconds = {True: 0.030, False: 0.020}  # drafting beside the verifier slows each round here
    history = []
    for _ in range(40):
        history.append(choice.enabled)
        choice.record(1, seconds[choice.enabled])
    phases = history[::4]
    assert phases[:2] == [True, False]  # on first, then the unmeasured other choice
    assert phases[2:] == [False, True, False, False, True, False, False, True]  # every third phase a probe


def test_post_verify_follows_a_change_in_costs():
    choice = PostVerify(decay=0.9, phase_rounds=4, probe_every=4)
    for _ in range(40):
        choice.record(1, 0.030 if choice.enabled else 0.020)
    assert not choice.enabled or choice.phases % choice.probe_every == 0  # off, or probing on
    history = []
    for _ in range(80):  # the drafter moved to its own accelerator: post-verify drafts now commit more
        history.append(choice.enabled)
        choice.record(2 if choice.enabled else 1, 0.020)
    late = history[40::4]  # one entry per phase, once the old rounds have faded
    assert late.count(True) >= len(late) // 2 + 1
    assert all(late[i + 1] for i in range(len(late) - 1) if not late[i])  # off only for single probe phases


def test_every_policy_is_registered():
    assert set(POLICIES) == {"static", "heuristic", "pearl", "adaedl", "specdecpp", "bild", "goodput", "smartspec",
                             "marginal"}


def _run_goodput(policy, rounds: int, speculative: tuple[int, float], target_only: tuple[int, float]) -> list[bool]:
    """Feeds `rounds` rounds whose (tokens committed, seconds) depend on whether the policy speculated;
    returns the choice made each round."""
    choices = []
    for _ in range(rounds):
        speculating = policy.block_size() > 0
        choices.append(speculating)
        tokens, seconds = speculative if speculating else target_only
        if speculating:
            policy.update(policy.block_size(), min(tokens - 1, policy.block_size()))
        policy.record_round(tokens, seconds)
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


def test_goodput_requests_start_from_what_earlier_requests_measured():
    memory = GoodputMemory()
    first = make_policy("goodput", 4, 8, goodput_memory=memory)
    assert first.block_size() > 0  # nothing measured yet: the usual start, speculating
    _run_goodput(first, 8 + 4 + 8 + 4 + 16 + 4, speculative=(1, 0.3), target_only=(1, 0.1))
    assert memory.favoured() is False and memory.exploit_rounds == 32  # its last probe lost too
    # A new request with the same weak drafter starts target-only, on the longer phase learnt so far.
    second = make_policy("goodput", 4, 8, goodput_memory=memory)
    assert _run_goodput(second, 32 + 4, speculative=(1, 0.3), target_only=(1, 0.1)) == [False] * 32 + [True] * 4
    assert make_policy("static", 4, 8, goodput_memory=memory).block_size() == 4  # other policies ignore it


def test_goodput_memory_follows_a_drafter_that_improves_and_needs_both_sides_measured():
    memory = GoodputMemory()
    for _ in range(2):
        memory.record(True, 1, 0.3)
        memory.record(False, 1, 0.1)
    assert memory.favoured() is None  # under min_rounds on each side
    for _ in range(2):
        memory.record(True, 1, 0.3)
        memory.record(False, 1, 0.1)
    assert memory.favoured() is False
    for _ in range(100):  # a better checkpoint: its speculative rounds now commit 5 tokens in 0.2 s
        memory.record(True, 5, 0.2)
    assert memory.favoured() is True
    assert make_policy("goodput", 4, 8, goodput_memory=memory).block_size() == 4


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


def test_line_fit_recovers_the_verifier_step_cost():
    from coordinator.policies import LineFit

    fit = LineFit()
    assert fit.line() is None
    for rows in [1, 5, 9, 1, 17, 33, 5]:
        fit.add(rows, 0.016 + 0.0008 * rows)
    intercept, slope = fit.line()
    assert intercept == pytest.approx(0.016) and slope == pytest.approx(0.0008)


def test_best_draft_length_speculates_when_alone_and_stops_when_the_pass_is_compute_bound():
    from coordinator.policies import best_draft_length, expected_committed

    assert expected_committed(0.5, 0) == 1 and expected_committed(0.5, 2) == pytest.approx(1.75)
    alone = dict(step=(0.016, 0.0005), exposed=(0.001, 0.002), other_rows=0, other_tokens=0)
    assert best_draft_length(0.7, 8, **alone) >= 3
    assert best_draft_length(0.05, 8, **alone) == 0  # a drafter that is almost never right
    # Sixteen sessions: every extra row costs nearly what it could commit.
    loaded = dict(step=(0.004, 0.002), exposed=(0.001, 0.002), other_rows=15, other_tokens=15)
    assert best_draft_length(0.7, 8, **loaded) == 0


def test_smartspec_switches_speculation_off_under_load_and_back_on_when_it_drops():
    from coordinator.rounds import RoundOutcome

    memory = GoodputMemory()
    policy = make_policy("smartspec", 3, 8, goodput_memory=memory)
    assert policy.block_size() == 3  # nothing measured yet: it alternates 3 drafts and none to measure
    step = lambda rows: 0.016 + 0.0005 * rows  # a weight read, then a little per row  # noqa: E731

    def play(sessions: int, rounds: int) -> list[int]:
        sizes = []
        for _ in range(rounds):
            k = policy.block_size()
            sizes.append(k)
            rows = sessions + k  # the others verify one token each
            accepted = min(k, 2)
            policy.observe(RoundOutcome(sent=k, accepted=accepted, committed=accepted + 1, round_s=step(rows) + 0.002 * k,
                                        verify_s=step(rows), batch_rows=rows, batch_sessions=sessions, step_s=step(rows)))
        return sizes

    assert play(16, 40)[-10:] == [0] * 10
    alone = play(1, 40)
    assert min(alone[-10:]) >= 2
    assert set(make_policy("smartspec", 3, 8, goodput_memory=memory).__dict__) >= {"cost"}

"""The per-request policy: the pass-cost curve, the block decision, and requests alike in load but not in text."""

import pytest

from coordinator.policies import GoodputMemory, PassCost, make_policy
from coordinator.policies.marginal import best_block
from coordinator.rounds import LOOKUP, MODEL, RoundOutcome


def line(fixed_s: float, per_row_s: float):
    return lambda rows: fixed_s + per_row_s * rows


def test_pass_cost_interpolates_the_calibration_extrapolates_its_last_slope_and_follows_the_load():
    cost = PassCost(calibrated=((1, 0.010), (4, 0.013), (8, 0.021)))
    assert cost.seconds(1) == pytest.approx(0.010)
    assert cost.seconds(2) == pytest.approx(0.011)
    assert cost.seconds(6) == pytest.approx(0.017)
    assert cost.seconds(16) == pytest.approx(0.021 + 8 * 0.002)
    for _ in range(200):  # passes now take twice the calibrated time (another process shares the cores)
        cost.observe(4, 0.026)
    assert cost.seconds(8) == pytest.approx(0.042, rel=0.01)
    uncalibrated = PassCost()
    assert uncalibrated.seconds(3) is None
    for rows, seconds in ((1, 0.01), (9, 0.05), (5, 0.03)):
        uncalibrated.observe(rows, seconds)
    assert uncalibrated.seconds(7) == pytest.approx(0.04)


def test_a_lone_request_on_a_memory_bound_pass_drafts_and_a_compute_bound_batch_does_not():
    memory_bound = line(0.020, 0.0002)   # rows are nearly free next to streaming the weights
    assert best_block(0.7, 8, memory_bound, other_rows=0, other_tokens=0, round_s=0.002, draft_call_s=0,
                      per_draft_s=0, margin=0.03) >= 4
    compute_bound = line(0.0, 0.001)     # every row costs what a session's row costs
    for acceptance in (0.5, 0.95):
        assert best_block(acceptance, 16, compute_bound, other_rows=15, other_tokens=15, round_s=0.0,
                          draft_call_s=0, per_draft_s=0, margin=0.03) == 0


def test_a_gain_inside_the_margin_is_not_taken_and_drafting_time_counts():
    memory_bound = line(0.020, 0.0002)
    assert best_block(0.02, 8, memory_bound, 0, 0, 0.0, 0.0, 0.0, margin=0.03) == 0
    slow_drafter = best_block(0.7, 8, memory_bound, 0, 0, 0.0, 0.0, per_draft_s=0.02, margin=0.03)
    free_drafter = best_block(0.7, 8, memory_bound, 0, 0, 0.0, 0.0, per_draft_s=0.0, margin=0.03)
    assert slow_drafter < free_drafter
    # a drafter call's fixed cost (an RPC) sinks a block whose gain is smaller, whatever its length
    assert best_block(0.2, 8, memory_bound, 0, 0, 0.0, draft_call_s=0.01, per_draft_s=0.0, margin=0.03) == 0


def outcome(sent: int, accepted: int, source: str, sessions: int = 16, draft_token_s: float = 0.0) -> RoundOutcome:
    rows = sessions + sent  # every other session sends one row
    step_s = 0.010 + 0.0005 * rows
    round_s = step_s + 0.002 + (draft_token_s * sent if source == MODEL else 0.0)
    return RoundOutcome(sent=sent, accepted=accepted, committed=accepted + 1, round_s=round_s,
                        verify_s=step_s + 0.001, batch_rows=rows, batch_sessions=sessions, step_s=step_s,
                        source=source if sent else "", drafter_called=source == MODEL)


def test_at_the_same_load_a_copying_request_keeps_drafting_lookup_blocks_and_a_free_text_one_stops():
    shared = GoodputMemory(pass_cost=PassCost(calibrated=((1, 0.0105), (16, 0.018), (32, 0.026), (64, 0.042))))
    copying = make_policy("marginal", 5, 16, goodput_memory=shared)
    free_text = make_policy("marginal", 5, 16, goodput_memory=shared)
    for _ in range(6):
        copying.observe(outcome(8, 8, LOOKUP))        # the text it writes is in its prompt
        free_text.observe(outcome(4, 0, LOOKUP))      # a chance repeat, rejected
        for _ in range(14):                           # the other sessions of the pass, one token a round each
            shared.batch.observe(outcome(0, 0, ""))
    assert copying.lookup_length(16) >= 4
    assert free_text.lookup_length(16) == 0
    assert copying.lookup_length(0) == 0


def test_a_request_whose_drafter_blocks_are_rejected_stops_calling_the_drafter():
    shared = GoodputMemory(pass_cost=PassCost(calibrated=((1, 0.010), (8, 0.011), (64, 0.030))))
    policy = make_policy("marginal", 5, 16, goodput_memory=shared)
    assert policy.block_size() == 5   # nothing known of drafting time yet: one round each way measures it
    drafting = 0.003  # each drafter token adds 3 ms to its round
    policy.observe(outcome(5, 0, MODEL, sessions=1, draft_token_s=drafting))
    policy.observe(outcome(0, 0, "", sessions=1))
    for _ in range(4):
        policy.observe(outcome(5, 0, MODEL, sessions=1, draft_token_s=drafting))
    assert policy.block_size() == 0
    keen = make_policy("marginal", 5, 16, goodput_memory=shared)  # same coordinator, its own blocks accepted
    for _ in range(4):
        keen.observe(outcome(5, 5, MODEL, sessions=1, draft_token_s=drafting))
    assert keen.block_size() > 0


def test_a_drafter_with_nothing_to_propose_counts_as_rejected_and_its_calls_as_cost():
    shared = GoodputMemory(pass_cost=PassCost(calibrated=((1, 0.010), (8, 0.011), (64, 0.030))))
    policy = make_policy("marginal", 5, 16, goodput_memory=shared)
    policy.observe(outcome(0, 0, ""))
    for _ in range(6):  # the call returns no token (a lookup drafter on text that does not repeat)
        policy.observe(RoundOutcome(sent=0, accepted=0, committed=1, round_s=0.016, verify_s=0.011, batch_rows=1,
                                    batch_sessions=1, step_s=0.0105, drafter_called=True))
    assert shared.batch.drafting_s()[0] > 0.001
    assert policy.block_size() == 0


def test_a_drafter_judged_too_slow_is_probed_again_after_idle_rounds_and_won_back():
    shared = GoodputMemory(pass_cost=PassCost(calibrated=((1, 0.010), (8, 0.011), (64, 0.030))))
    policy = make_policy("marginal", 4, 16, goodput_memory=shared)
    policy.observe(outcome(0, 0, "", sessions=1))
    policy.observe(outcome(4, 4, MODEL, sessions=1, draft_token_s=0.05))  # one very slow call
    assert policy.block_size() == 0
    rounds_off = 0
    while policy.block_size() == 0:
        policy.observe(outcome(0, 0, "", sessions=1))
        rounds_off += 1
    assert rounds_off == shared.batch.probes.min_wait
    for _ in range(6):  # the drafter is fast after all
        policy.observe(outcome(4, 4, MODEL, sessions=1, draft_token_s=0.0002))
    assert policy.block_size() > 0 and shared.batch.probes.wait == shared.batch.probes.min_wait


def test_requests_share_one_probe_schedule_that_backs_off_while_probes_lose():
    shared = GoodputMemory(pass_cost=PassCost(calibrated=((1, 0.010), (8, 0.011), (64, 0.030))))
    requests = [make_policy("marginal", 4, 16, goodput_memory=shared) for _ in range(8)]
    requests[0].observe(outcome(0, 0, "", sessions=8))
    requests[0].observe(outcome(4, 0, MODEL, sessions=8, draft_token_s=0.02))  # slow and rejected
    probes, waits = 0, []
    for _ in range(2000):
        for policy in requests:
            if policy.block_size() > 0:  # a probe: still slow and rejected
                probes += 1
                waits.append(shared.batch.probes.wait)
                policy.observe(outcome(4, 0, MODEL, sessions=8, draft_token_s=0.02))
            else:
                policy.observe(outcome(0, 0, "", sessions=8))
    # 16,000 session-rounds: probes after 64, 128, 256, ... 4096, then every 4096
    assert 6 <= probes <= 9, probes
    assert waits == sorted(waits) and waits[-1] == shared.batch.probes.max_wait


def test_a_call_that_syncs_a_new_session_is_not_taken_for_a_round_s_drafting_cost():
    shared = GoodputMemory()
    shared.batch.observe(outcome(0, 0, "", sessions=1))
    cold = outcome(4, 4, MODEL, sessions=1, draft_token_s=0.05)
    shared.batch.observe(RoundOutcome(**{**cold.__dict__, "drafter_caught_up": True}))
    assert shared.batch.drafting_s() is None
    shared.batch.observe(cold)
    assert shared.batch.drafting_s()[0] > 0.1


def test_a_round_s_overhead_weighs_on_a_lone_session_and_is_shared_out_under_load():
    """Outside the pass (RPCs, the coordinator) a lone session leaves the verifier idle; with 16 sessions the
    others' passes fill that time, so the same lookup block that pays alone does not pay in a full pass."""
    shared = GoodputMemory(pass_cost=PassCost(calibrated=((1, 0.010), (16, 0.018), (32, 0.030), (64, 0.054))))
    for _ in range(30):  # draftless rounds that spend 20 ms outside their pass
        shared.batch.observe(RoundOutcome(sent=0, accepted=0, committed=1, round_s=0.04, verify_s=0.021,
                                          batch_rows=16, batch_sessions=16, step_s=0.02))
    alone = make_policy("marginal", 4, 16, goodput_memory=shared)
    crowded = make_policy("marginal", 4, 16, goodput_memory=shared)
    for policy, sessions in ((alone, 1), (crowded, 16)):
        for _ in range(4):
            policy.lookup.observe(8, 5)
        policy.observe(RoundOutcome(sent=0, accepted=0, committed=1, round_s=0.04, verify_s=0.021,
                                    batch_rows=sessions, batch_sessions=sessions, step_s=0.02))
    assert alone.lookup_length(16) > 0
    assert crowded.lookup_length(16) == 0

"""Trace records made into training batches (the positions that predict each draft slot, requests merged
into one row) and the acceptance measures the trainer judges drafters by."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from trainer_world import world  # noqa: F401 - a fixture

from specdec.models.accept_head import accept_labels, greedy_accept_labels
from specdec.traces import TraceRecord
from trainer.batching import build_batch, slot_forward
from trainer.evaluation import (
    evaluate_acceptance,
    greedy_accepted_length,
    recency_weights,
    recent_holdout,
    windowed_accepted_length,
)


def test_slot_forward_reads_the_positions_that_predict_each_draft_slot():
    model = tiny_model("gpt2", seed=3)
    records = [
        TraceRecord(request_id="a", context_ids=[5, 6, 7], draft_tokens=[8, 9], accepted=1,
                    target_top_ids=[[8], [1], []], target_top_probs=[[0.9], [0.5], []]),
        TraceRecord(request_id="b", context_ids=[1], draft_tokens=[2, 3, 4], accepted=3,
                    target_top_ids=[[2], [3], [4], [9]], target_top_probs=[[1.0], [1.0], [1.0], [1.0]]),
    ]
    batch = build_batch(records)
    # Slot 2 of "a" has no target distribution and is skipped; "b" has a bonus slot (index 3).
    assert batch.slot_index.tolist() == [0, 1, 0, 1, 2, 3]
    assert batch.slot_pos.tolist() == [2, 3, 0, 1, 2, 3]
    assert batch.draft_token.tolist() == [8, 9, 2, 3, 4, -1]
    assert batch.accept_label.tolist() == [1, 0, 1, 1, 1, 0]
    assert batch.accept_mask.tolist() == [True, True, True, True, True, False]
    logits, hidden = slot_forward(model, batch.input_ids, batch.attention_mask, batch.slot_row, batch.slot_pos)
    with torch.no_grad():
        full_a = model(torch.tensor([[5, 6, 7, 8, 9]])).logits[0]
        full_b = model(torch.tensor([[1, 2, 3, 4]])).logits[0]
    torch.testing.assert_close(logits[:2], full_a[[2, 3]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[2:], full_b[[0, 1, 2, 3]], atol=1e-5, rtol=1e-4)
    assert hidden.shape == (6, 32)


def test_merged_batches_read_a_request_once_and_drop_slots_off_the_committed_path():
    model = tiny_model("llama", seed=3)
    top = lambda n: ([[t] for t in range(n)], [[1.0]] * n)  # noqa: E731 - one-token "distributions"
    ids3, probs3 = top(3)
    ids4, probs4 = top(4)
    records = [
        # Block 1 of "a": slot 0 accepted, slot 1 (token 9) rejected, the target committed 40 instead.
        TraceRecord(request_id="a", context_ids=[5, 6, 7], draft_tokens=[8, 9], accepted=1,
                    target_top_ids=ids3, target_top_probs=probs3),
        TraceRecord(request_id="b", context_ids=[1, 2], draft_tokens=[3, 4], accepted=2,
                    target_top_ids=ids3, target_top_probs=probs3),
        # Block 2 of "a" continues from the committed text.
        TraceRecord(request_id="a", context_ids=[5, 6, 7, 8, 40], draft_tokens=[41, 42, 43], accepted=3,
                    target_top_ids=ids4, target_top_probs=probs4),
        # A block whose context is not on "a"'s latest sequence keeps its own row.
        TraceRecord(request_id="a", context_ids=[77, 78], draft_tokens=[79], accepted=0,
                    target_top_ids=ids3[:2], target_top_probs=probs3[:2]),
    ]
    records[2], records[3] = records[3], records[2]  # the owner of "a"'s merged row is its latest trace
    merged = build_batch(records, merge_requests=True)
    separate = build_batch(records)
    assert separate.input_ids.shape[0] == 4 and merged.input_ids.shape[0] == 3
    merged_slots = list(zip(merged.record_index.tolist(), merged.slot_index.tolist()))
    separate_slots = list(zip(separate.record_index.tolist(), separate.slot_index.tolist()))
    # Block 1 of "a" loses slot 2 only: its prefix holds the rejected 9. Slot 1 (predicting 9) stays.
    assert sorted(merged_slots) == sorted(s for s in separate_slots if s != (0, 2))
    by_slot = {}
    for name, batch in (("merged", merged), ("separate", separate)):
        logits, _ = slot_forward(model, batch.input_ids, batch.attention_mask, batch.slot_row, batch.slot_pos)
        for key, row in zip(zip(batch.record_index.tolist(), batch.slot_index.tolist()), logits):
            by_slot.setdefault(key, {})[name] = row
    for key in merged_slots:  # same prefix, same prediction, whichever row it was read from
        torch.testing.assert_close(by_slot[key]["merged"], by_slot[key]["separate"], atol=1e-5, rtol=1e-4)


def test_windowed_accepted_length_scores_a_draft_from_every_position():
    drafter, target = [1, 2, 0, 4, 5, 6], [1, 2, 3, 4, 5, 6]  # agreement 1 1 0 1 1 1
    # Window 2: starts 0..4 have a whole window; their capped runs are 2 1 0 2 2.
    assert windowed_accepted_length(drafter, target, window=2) == pytest.approx(7 / 5)
    # A block no longer than the window is scored from slot 0 only, like a real draft.
    assert windowed_accepted_length(drafter, target, window=8) == 2
    assert windowed_accepted_length(target, target, window=3) == 3
    assert windowed_accepted_length([], [], window=8) == 0.0


def test_greedy_accepted_length_counts_only_slots_on_the_target_path():
    # Draft left the target's path at slot 1: slots after it cannot be judged.
    assert greedy_accepted_length([4, 7, 9], [4, 5, 9], draft_tokens=[4, 6, 9]) == (1, 2)
    assert greedy_accepted_length([4, 5, 9], [4, 5, 9], draft_tokens=[4, 5, 9]) == (3, 3)
    assert greedy_accepted_length([0, 5, 9], [4, 5, None], draft_tokens=[4, 5, 9]) == (0, 2)
    assert accept_labels(3, 1) == ([1.0, 0.0, 0.0], [True, True, False])
    assert greedy_accept_labels([1, 2, 3], [1, 5, 3]) == ([1.0, 0.0, 1.0], [True, True, True])


def test_teacher_traces_are_fully_accepted_by_their_target(world):
    report = evaluate_acceptance(world.target, world.held)
    assert report.agreement_rate == 1.0 and report.blocks == len(world.held) == 16 * 4
    assert report.mean_accepted_length == pytest.approx(4.0)


def test_recency_weights_halve_per_half_life_and_old_traces_drop_out():
    assert recency_weights(3, 0) == [1.0, 1.0, 1.0]
    assert recency_weights(5, 2) == pytest.approx([0.25, 0.5 ** 1.5, 0.5, 0.5 ** 0.5, 1.0])
    records = list(range(1000))
    kept, weights = recent_holdout(records, half_life=10)
    assert kept == records[-44:] and weights[-1] == 1.0 and 0.05 <= weights[0] < 0.052
    assert recent_holdout(records, half_life=0) == (records, [1.0] * 1000)

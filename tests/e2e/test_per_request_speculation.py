"""Whole stacks: the coordinator's own prompt lookup, and per-request choices that call no drafter when off."""

from conftest import InProcessStack, save

from specdec.client import SpecdClient
from specdec.models.loader import load_model
from trainer.eagle import init_from_target

REPEATING = [3, 1, 4, 1, 5, 9, 2, 6] * 3  # lookup matches from the first round


def test_lookup_blocks_come_from_the_coordinator_and_keep_greedy_and_seeded_output(tiny_dirs):
    dirs = tiny_dirs["llama"]
    stack = InProcessStack(dirs["target"], None)  # no drafter service at all
    try:
        client = SpecdClient(stack.address)
        reference = client.generate(token_ids=REPEATING, max_new_tokens=32, mode="target_only").token_ids
        looked_up = client.generate(token_ids=REPEATING, max_new_tokens=32, mode="sequential", policy="static")
        sampled = [client.generate(token_ids=REPEATING, max_new_tokens=24, mode="sequential", policy="static",
                                   temperature=0.8, seed=7) for _ in range(2)]
    finally:
        stack.close()
    assert looked_up.token_ids == reference
    stats = looked_up.stats
    assert stats["lookup_rounds"] >= 1 and stats["lookup_drafted_tokens"] >= stats["lookup_accepted_tokens"]
    assert stats["drafted_tokens"] == stats["lookup_drafted_tokens"]  # nothing else could draft
    assert stats["fallback_steps"] == 0 and stats["mean_block_length"] > 0
    assert sampled[0].token_ids == sampled[1].token_ids and sampled[0].stats["lookup_rounds"] >= 1


def test_lookup_can_be_turned_off_for_the_whole_coordinator(tiny_dirs):
    dirs = tiny_dirs["llama"]
    stack = InProcessStack(dirs["target"], None, coordinator_overrides={"lookup_draft_tokens": 0})
    try:
        result = SpecdClient(stack.address).generate(token_ids=REPEATING, max_new_tokens=16, policy="static")
    finally:
        stack.close()
    assert result.stats["lookup_rounds"] == 0 and result.stats["drafted_tokens"] == 0


def test_marginal_stops_calling_a_useless_drafter_and_keeps_the_output(tiny_dirs):
    """Same output either way. The unrelated drafter's blocks are all rejected, so after measuring them the
    request runs target-only rounds, which call no drafter. Whether the target drafting for itself pays
    depends on how its steps compare with the round's overhead on this machine (tests/coordinator covers
    the decision itself); its drafts are all accepted."""
    dirs = tiny_dirs["llama"]
    prompt, new_tokens = [5, 9, 2, 7], 48
    outcomes = {}
    for kind in ("unrelated", "target"):
        stack = InProcessStack(dirs["target"], dirs[kind], coordinator_overrides={"lookup_draft_tokens": 0})
        try:
            client = SpecdClient(stack.address)
            reference = client.generate(token_ids=prompt, max_new_tokens=new_tokens, mode="target_only").token_ids
            result = client.generate(token_ids=prompt, max_new_tokens=new_tokens, mode="sequential",
                                     policy="marginal")
        finally:
            stack.close()
        assert result.token_ids == reference, kind
        assert result.stats["fallback_steps"] == 0
        outcomes[kind] = result.stats
    useless, perfect = outcomes["unrelated"], outcomes["target"]
    assert useless["speculation_off_rounds"] >= 0.7 * useless["rounds"], useless
    assert perfect["drafted_tokens"] > 0 and perfect["acceptance_rate"] == 1.0, perfect


def test_a_feature_drafter_catches_up_on_the_features_the_verifier_kept_while_it_was_idle(tiny_dirs, tmp_path):
    """goodput alternates 8 drafted rounds and a 4-round target-only probe, during which the coordinator asks
    for no features; the first drafted round after a probe fetches them, and the output stays the target's."""
    target = tiny_dirs["llama"]["target"]
    drafter = save(init_from_target(load_model(target).model), tmp_path / "eagle")
    stack = InProcessStack(target, drafter, coordinator_overrides={"lookup_draft_tokens": 0},
                           drafter_overrides={"draft_weights": "fp32"})
    try:
        client = SpecdClient(stack.address)
        prompt = [3, 14, 15, 92, 65, 35, 89, 79]
        reference = client.generate(token_ids=prompt, max_new_tokens=64, mode="target_only").token_ids
        result = client.generate(token_ids=prompt, max_new_tokens=64, mode="sequential", policy="goodput")
    finally:
        stack.close()
    assert result.token_ids == reference
    stats = result.stats
    assert stats["speculation_off_rounds"] >= 4 and stats["feature_catch_up_rounds"] >= 1, stats
    assert stats["drafted_tokens"] > 0 and stats["fallback_steps"] == 0

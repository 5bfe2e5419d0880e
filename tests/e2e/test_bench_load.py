"""The concurrency sweep's schedule, arithmetic and greedy check, and its runners against a tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import InProcessStack, tiny_model

from bench.load import (
    System,
    Timed,
    build_systems,
    hf_greedy,
    level_summary,
    mismatches,
    plan_level,
    ratio_table,
    read_prompts,
    run_hf_level,
    run_specd_level,
)


def timed(prompt, start, latency, tokens, ttft=0.1, system="s", clients=2):
    return Timed(system, clients, 0, prompt, start, ttft, latency, tokens)


def test_plan_gives_every_client_the_same_count_and_batches_the_kth_requests():
    plan = plan_level(clients=4, per_client=2, minimum=8, prompt_count=6)
    assert plan == [[0, 4], [1, 5], [2, 0], [3, 1]]
    # Fewer clients than the minimum asks for: each sends more.
    assert [len(queue) for queue in plan_level(clients=1, per_client=2, minimum=8, prompt_count=16)] == [8]
    assert [len(queue) for queue in plan_level(clients=3, per_client=2, minimum=8, prompt_count=16)] == [3, 3, 3]


def test_level_summary_is_tokens_over_the_levels_wall_time():
    summary = level_summary([timed(0, 0.0, 2.0, [1] * 10, ttft=0.5), timed(1, 1.0, 3.0, [1] * 30, ttft=0.2)])
    assert summary["wall_s"] == pytest.approx(4.0)
    assert summary["tokens_per_s"] == pytest.approx(10.0)
    assert (summary["p50_s"], summary["p99_s"]) == (2.0, 3.0)
    assert (summary["ttft_p50_s"], summary["ttft_p99_s"]) == (0.2, 0.5)


def test_mismatches_name_the_first_differing_token():
    reference = {0: [1, 2, 3, 4], 1: [5, 6]}
    bad = mismatches([timed(0, 0, 1, [1, 2, 9, 4]), timed(1, 0, 1, [5, 6]), timed(1, 0, 1, [5])], reference,
                     ["a", "b"])
    assert [(m["prompt"], m["first_difference"], m["got"], m["expected"]) for m in bad] == \
        [("a", 2, [9, 4], [3, 4]), ("b", 1, [], [6])]


def test_ratio_table_divides_by_each_baseline():
    summary = {"base": {1: {"tokens_per_s": 10.0}}, "fast": {1: {"tokens_per_s": 25.0}}}
    table = ratio_table(summary, [1], ["base", "absent"])
    assert "| fast | 2.50x |" in table and "| base | 1.00x |" in table


def test_read_prompts_takes_the_category_first_then_fills_in_file_order(tmp_path):
    path = tmp_path / "suite.jsonl"
    rows = [("c1", "code"), ("t1", "chat"), ("m1", "math"), ("t2", "chat")]
    path.write_text("\n".join(json.dumps({"id": i, "category": c, "prompt": i}) for i, c in rows) + "\n")
    assert [r["id"] for r in read_prompts(path, 3)] == ["t1", "t2", "c1"]


PROMPTS = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46, 26, 43, 38], [1, 2, 3]]


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """A tiny Llama whose EOS is a token its greedy output of PROMPTS[0] emits early: a stop token to ignore."""
    model = tiny_model("llama", seed=1)
    eos = hf_greedy(model, [PROMPTS[0]], 10, pad_id=0)[0][0][2]
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    directory = tmp_path_factory.mktemp("load") / "target"
    model.save_pretrained(directory)
    return model, str(directory)


def test_batched_left_padded_generate_matches_each_prompt_alone(tiny_target):
    model, _ = tiny_target
    alone = [hf_greedy(model, [ids], 12, pad_id=0)[0][0] for ids in PROMPTS]
    assert all(len(tokens) == 12 for tokens in alone)
    assert hf_greedy(model, PROMPTS, 12, pad_id=0)[0] == alone
    timed_requests = run_hf_level(model, "hf", PROMPTS, plan_level(2, 2, 4, len(PROMPTS)), 12, pad_id=0)
    assert not mismatches(timed_requests, dict(enumerate(alone)), ["a", "b", "c", "d"])


@pytest.mark.parametrize("drafter", [None, "self"])
def test_specd_clients_get_the_greedy_output_past_eos(tiny_target, drafter):
    model, directory = tiny_target
    reference = {i: hf_greedy(model, [ids], 10, pad_id=0)[0][0] for i, ids in enumerate(PROMPTS)}
    stack = InProcessStack(directory, directory if drafter else None,
                           coordinator_overrides=None if drafter else {"mode": "target_only"})
    try:
        system = System("specd", "specd", "none" if drafter is None else directory, "" if drafter is None else "static")
        requests = run_specd_level(stack.address, system, PROMPTS, plan_level(3, 2, 4, len(PROMPTS)), 10)
    finally:
        stack.close()
    assert len(requests) == 6 and len({r.client for r in requests}) == 3
    assert all(r.ttft_s <= r.latency_s for r in requests)
    assert not mismatches(requests, reference, ["a", "b", "c", "d"])


def test_systems_pair_each_drafter_with_its_policy_and_end_with_the_baselines():
    systems = build_systems(["ngram", "none", "eagle"], ["static"], with_vllm=True)
    assert [(s.name, s.drafter, s.policy) for s in systems] == [
        ("specd target-only", "none", ""), ("specd [ngram, static]", "ngram", "static"),
        ("specd [eagle, smartspec]", "eagle", "smartspec"), ("transformers batched generate", "", ""), ("vllm", "", "")]

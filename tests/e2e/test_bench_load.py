"""The concurrency sweep's schedule, arithmetic and greedy check, and its runners against a tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import InProcessStack, tiny_model

from bench.load import (
    HERE,
    VLLM_NGRAM_CONFIG,
    WORKLOADS,
    System,
    Timed,
    WorkloadRun,
    build_systems,
    hf_greedy,
    level_summary,
    mismatches,
    parse_workloads,
    plan_level,
    prompt_legend,
    ratio_table,
    read_prompts,
    report_table,
    run_hf_level,
    run_specd_level,
    run_vllm,
    speedups,
    workload_prompts,
    workload_tokens,
)
from specdec.config import DEFAULT_POLICY


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


def test_fill_in_categories_come_before_the_rest_those_quoting_a_snippet_first(tmp_path):
    path = tmp_path / "suite.jsonl"
    rows = [("t1", "chat", "hi"), ("c1", "code", "write f"), ("g1", "grounded", "summarise: ..."),
            ("c2", "code", "fix this:\n```python\nx\n```"), ("m1", "math", "2+2")]
    path.write_text("\n".join(json.dumps({"id": i, "category": c, "prompt": p}) for i, c, p in rows) + "\n")
    assert [r["id"] for r in read_prompts(path, 5, "grounded", ("code",))] == ["g1", "c2", "c1", "t1", "m1"]
    assert [r["id"] for r in read_prompts(path, 2, "grounded")] == ["g1", "t1"]


def test_workloads_take_their_category_of_the_suite_and_grounded_fills_from_code_that_quotes_code():
    suite = HERE / "prompts" / "suite.jsonl"
    chat = workload_prompts(suite, 16, WORKLOADS["chat"])
    assert [r["category"] for r in chat[:12]] == ["chat"] * 12 and len(chat) == 16
    grounded = workload_prompts(suite, 16, WORKLOADS["grounded"])
    assert [r["category"] for r in grounded] == ["grounded"] * 12 + ["code"] * 4
    assert all("```" in r["prompt"] for r in grounded[12:])
    assert [r["id"] for r in workload_prompts(suite, 4, WORKLOADS["grounded"])] == \
        [f"grounded-0{i}" for i in range(1, 5)]
    assert prompt_legend(grounded, WORKLOADS["grounded"]) == \
        "12 grounded, then 4 code prompts of the suite (code: those quoting a snippet first)"
    assert prompt_legend(chat[:12], WORKLOADS["chat"]) == "12 chat prompts of the suite"


def test_each_workload_has_its_own_token_count_unless_one_is_given():
    chat, grounded = parse_workloads("chat,grounded")
    assert (workload_tokens(chat, None), workload_tokens(grounded, None)) == (48, 96)
    assert (workload_tokens(chat, 8), workload_tokens(grounded, 8)) == (8, 8)
    assert [w.name for w in parse_workloads("grounded")] == ["grounded"]
    with pytest.raises(ValueError, match="unknown"):
        parse_workloads("chat,poetry")


def test_speedups_divide_each_speculative_specd_row_by_target_only_per_level():
    summary = {"specd target-only": {1: {"tokens_per_s": 50.0}, 2: {"tokens_per_s": 100.0}},
               "specd [ngram, smartspec]": {1: {"tokens_per_s": 60.0}, 2: {"tokens_per_s": 80.0}},
               "vllm": {1: {"tokens_per_s": 40.0}, 2: {"tokens_per_s": 90.0}}}
    assert speedups(summary, [1, 2]) == {"specd [ngram, smartspec]": {1: pytest.approx(1.2), 2: pytest.approx(0.8)}}


def test_report_has_a_ratio_table_per_baseline_present():
    summary = {name: {1: {"tokens_per_s": tps, "p50_s": 1.0, "p99_s": 1.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.1}}
               for name, tps in (("specd target-only", 50.0), ("vllm", 25.0), ("vllm n-gram (k=3)", 40.0))}
    table = report_table(summary, [1], [], {"max_new_tokens": 8, "requests_per_level": {1: 8}})
    for baseline in summary:
        assert f"Aggregate tokens/s against {baseline}:" in table
    assert "| specd target-only | 1.25x |" in table and "| vllm | 0.50x |" in table


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
        (f"specd [eagle, {DEFAULT_POLICY}]", "eagle", DEFAULT_POLICY), ("transformers batched generate", "", ""),
        ("vllm", "", "")]


def test_vllms_ngram_row_follows_its_plain_row_only_when_vllm_is_present():
    with_ngram = build_systems(["ngram"], [], with_vllm=True, vllm_ngram=True)
    assert [(s.name, s.kind, s.drafter) for s in with_ngram[-2:]] == [
        ("vllm", "vllm", ""), ("vllm n-gram (k=3)", "vllm", "ngram")]
    assert VLLM_NGRAM_CONFIG == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                                 "prompt_lookup_min": 2}
    assert [s.kind for s in build_systems(["ngram"], [], with_vllm=False, vllm_ngram=True)] == ["specd", "specd", "hf"]
    assert [s.kind for s in build_systems(["lookup"], [], with_vllm=False, with_transformers=False)] == ["specd"] * 2


def test_vllm_job_carries_every_workload_and_the_ngram_rows_speculative_config(tmp_path):
    """A stand-in for vLLM's virtualenv: its python answers each job with one request per level."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text("""#!/usr/bin/env python3
import json, shutil, sys
job = json.load(open(sys.argv[2]))
shutil.copy(sys.argv[2], sys.argv[2] + ".seen")
request = {"client": 0, "prompt": 0, "start_s": 0.0, "ttft_s": 0.1, "latency_s": 0.5, "token_ids": [7]}
json.dump({"vllm_version": "0.0", "workloads": [
    {"name": w["name"], "levels": [{"clients": len(level["plan"]), "requests": [request]} for level in w["levels"]]}
    for w in job["workloads"]]}, open(sys.argv[3], "w"))
""")
    fake.chmod(0o755)
    runs = [WorkloadRun(WORKLOADS[name], ["p"], "", [[1, 2]], {1: [[0]], 2: [[0], [0]]}, tokens)
            for name, tokens in (("chat", 48), ("grounded", 96))]
    for system, spec in ((System("vllm", "vllm"), None), (System("vllm n-gram (k=3)", "vllm", "ngram"),
                                                           VLLM_NGRAM_CONFIG)):
        version, timed = run_vllm(venv, tmp_path, system, runs, 1, tmp_path)
        job = json.loads(next(tmp_path.glob(f"vllm-{'ngram' if spec else 'plain'}-job.json.seen")).read_text())
        assert job.get("speculative_config") == spec
        assert [(w["name"], w["max_new_tokens"], len(w["levels"])) for w in job["workloads"]] == \
            [("chat", 48, 2), ("grounded", 96, 2)]
        assert version == "0.0" and list(timed) == ["chat", "grounded"]
        assert [[r.clients for r in level] for level in timed["grounded"]] == [[1], [2]]
        assert all(r.system == system.name for level in timed["chat"] for r in level)

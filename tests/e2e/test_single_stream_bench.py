"""The single-stream benchmark's pure parts: rotation, llama.cpp's replies and flags, summaries and tables."""

from __future__ import annotations

import json
import re

import pytest

from bench.single_stream import (
    LLAMA,
    LLAMA_DRAFT,
    LLAMA_LOOKUP,
    LOOKUP,
    SYSTEMS,
    TARGET_ONLY,
    WORKLOADS,
    Reply,
    agreement,
    first_difference,
    llama_flags,
    llama_request,
    markdown_table,
    merge_llama_chunks,
    mismatches,
    parse_names,
    read_prompts,
    rotation,
    shown_command,
    sse_events,
    summarise,
    system_names,
    workload_report,
)

NAMES = system_names("qwen2.5-coder-0.5b")


def reply(system, prompt, tokens, latency=1.0, ttft=0.1, stats=None, workload="code-edit"):
    return Reply(system, workload, prompt, 0, tokens, latency, ttft, stats or {})


def test_rotation_turns_the_order_by_one_system_per_prompt():
    systems = ["a", "b", "c"]
    assert [rotation(systems, i) for i in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                       ["a", "b", "c"]]
    # Over as many prompts as systems, each system is in each position once.
    positions = {s: sorted(rotation(systems, i).index(s) for i in range(3)) for s in systems}
    assert positions == {s: [0, 1, 2] for s in systems}


def test_names_are_checked_and_kept_in_the_order_given():
    assert parse_names("llama, target-only", SYSTEMS, "system") == ["llama", "target-only"]
    with pytest.raises(ValueError, match="unknown system"):
        parse_names("target-only,vllm", SYSTEMS, "system")
    with pytest.raises(ValueError):
        parse_names("", SYSTEMS, "system")


# A streamed /completion reply as llama-server sends it: one chunk per token, then the timings, then [DONE].
FINAL = {"index": 0, "content": "", "tokens": [], "stop": True,
         "timings": {"prompt_n": 31, "prompt_ms": 412.5, "predicted_n": 4, "predicted_ms": 350.0,
                     "predicted_per_second": 11.43, "draft_n": 6, "draft_n_accepted": 2}}
STREAM = "".join([
    'data: {"index": 0, "content": "def", "tokens": [750], "stop": false, "tokens_predicted": 1}\n\n',
    'data: {"index": 0, "content": " f", "tokens": [282], "stop": false, "tokens_predicted": 2}\n\n',
    ": a comment line\n\n",
    'data: {"index": 0, "content": "():", "tokens": [3932, 25], "stop": false, "tokens_predicted": 4}\n\n',
    f"data: {json.dumps(FINAL)}\n\n",
    "data: [DONE]\n\n",
    'data: {"never": "read"}\n\n'])


def test_a_streamed_completion_gives_its_tokens_text_and_timings():
    chunks = list(sse_events(STREAM.encode().splitlines(keepends=True)))
    assert len(chunks) == 4
    merged = merge_llama_chunks(chunks)
    assert merged["token_ids"] == [750, 282, 3932, 25]
    assert merged["text"] == "def f():"
    assert merged["timings"]["predicted_per_second"] == 11.43 and merged["timings"]["prompt_ms"] == 412.5


def test_an_unstreamed_completion_gives_the_same():
    body = {"content": "def f():", "tokens": [750, 282, 3932, 25], "stop": True,
            "timings": {"predicted_per_second": 9.5, "prompt_ms": 300.0}}
    merged = merge_llama_chunks([json.loads(json.dumps(body))])
    assert merged == {"token_ids": [750, 282, 3932, 25], "text": "def f():", "timings": body["timings"]}


def test_the_request_is_greedy_exact_length_and_uncached():
    body = llama_request([1, 2, 3], 16)
    assert body["prompt"] == [1, 2, 3] and body["n_predict"] == 16
    assert body["temperature"] == 0 and body["top_k"] == 1 and body["ignore_eos"] is True
    assert body["cache_prompt"] is False and body["return_tokens"] is True and body["stream"] is True
    assert llama_request([1], 4, cache_prompt=True)["cache_prompt"] is True


NEW_HELP = "--spec-type [none|draft-simple|ngram-simple|ngram-mod]\n--spec-draft-n-max N\n--spec-draft-n-min N\n"
OLD_HELP = "--draft-max, --draft, --draft-n N\n--draft-min N\n-md FNAME\n"


def test_llama_flags_follow_what_the_build_lists(tmp_path):
    draft = tmp_path / "draft.gguf"
    assert llama_flags(LLAMA, "", None, "--spec-type ngram-simple") == ([], "")
    assert llama_flags(LLAMA_DRAFT, NEW_HELP, draft, "") == (
        ["-md", str(draft), "--spec-type", "draft-simple", "--spec-draft-n-max", "8", "--spec-draft-n-min", "1"], "")
    assert llama_flags(LLAMA_DRAFT, OLD_HELP, draft, "") == (
        ["-md", str(draft), "--draft-max", "8", "--draft-min", "1"], "")
    flags, why = llama_flags(LLAMA_DRAFT, "--threads N\n", draft, "")
    assert flags == [] and "no draft-model flags" in why
    assert "not a GGUF" in llama_flags(LLAMA_DRAFT, NEW_HELP, None, "")[1]
    assert llama_flags(LLAMA_LOOKUP, NEW_HELP, None, "--spec-type ngram-simple") == (
        ["--spec-type", "ngram-simple"], "")
    flags, why = llama_flags(LLAMA_LOOKUP, OLD_HELP, None, "--spec-type ngram-simple")
    assert flags == [] and "--spec-type" in why and "ngram-simple" in why
    flags, why = llama_flags(LLAMA_LOOKUP, NEW_HELP, None, "--spec-type ngram-cache")
    assert flags == [] and "ngram-cache" in why


def test_shown_command_names_the_binary_and_models_by_file_name_without_the_address():
    command = ["/x/build/bin/llama-server", "-m", "/m/target.gguf", "-t", "2", "--host", "127.0.0.1", "--port",
               "40123", "-md", "/m/draft.gguf"]
    assert shown_command(command) == "llama-server -m target.gguf -t 2 -md draft.gguf"


def test_first_difference_and_mismatches_against_target_only():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 9, 3], [1, 2, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    replies = [reply(TARGET_ONLY, "p1", [1, 2, 3, 4]), reply(LOOKUP, "p1", [1, 2, 7, 4]),
               reply(TARGET_ONLY, "p2", [5, 6]), reply(LOOKUP, "p2", [5, 6]),
               reply(LLAMA, "p1", [9, 9])]  # llama.cpp's numerics differ: not checked
    bad = mismatches(replies)
    assert bad == [{"system": LOOKUP, "workload": "code-edit", "prompt": "p1", "first_difference": 2,
                    "got": [7, 4], "expected": [3, 4]}]


def specd_stats(rounds, lookup_rounds, drafted, accepted, block, new_tokens=8, tokens_per_s=9.0):
    return {"rounds": rounds, "lookup_rounds": lookup_rounds, "drafted_tokens": drafted,
            "accepted_tokens": accepted, "mean_block_length": block, "new_tokens": new_tokens,
            "tokens_per_s": tokens_per_s, "lookup_drafted_tokens": drafted, "lookup_accepted_tokens": accepted}


def test_summaries_take_the_median_the_aggregate_and_the_counters():
    specd = summarise([reply(LOOKUP, "p1", [1] * 8, latency=1.0, ttft=0.2, stats=specd_stats(4, 3, 10, 4, 3.0)),
                       reply(LOOKUP, "p2", [1] * 8, latency=4.0, ttft=0.4, stats=specd_stats(6, 1, 2, 2, 2.0)),
                       reply(LOOKUP, "p3", [1] * 8, latency=2.0, ttft=0.3, stats=specd_stats(6, 0, 0, 0, 0.0))])
    assert specd["tokens_per_s_median"] == pytest.approx(4.0)
    assert specd["tokens_per_s_aggregate"] == pytest.approx(24 / 7)
    assert specd["ttft_median_s"] == pytest.approx(0.3)
    assert (specd["rounds"], specd["lookup_rounds"]) == (16, 4)
    assert specd["tokens_per_round"] == pytest.approx(24 / 16)
    assert specd["acceptance"] == pytest.approx(6 / 12)
    assert specd["mean_block_length"] == pytest.approx(2.5)  # of the requests that verified a draft
    llama = summarise([reply(LLAMA_LOOKUP, "p1", [1] * 8, latency=2.0,
                             stats={"predicted_per_second": 5.0, "prompt_ms": 300.0, "draft_n": 8,
                                    "draft_n_accepted": 6})])
    assert llama["own_tokens_per_s_median"] == 5.0 and llama["acceptance"] == pytest.approx(0.75)
    assert "rounds" not in llama
    plain = summarise([reply(LLAMA, "p1", [1] * 8, stats={"predicted_per_second": 9.0, "prompt_ms": 200.0})])
    assert "acceptance" not in plain


def row(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_table_divides_by_target_only_and_by_llama_cpp():
    summary = {
        TARGET_ONLY: summarise([reply(TARGET_ONLY, "p1", [1] * 10, latency=2.0, stats=specd_stats(10, 0, 0, 0, 0))]),
        LOOKUP: summarise([reply(LOOKUP, "p1", [1] * 10, latency=1.0,
                                 stats=specd_stats(4, 3, 12, 6, 4.0, new_tokens=10))]),
        LLAMA: summarise([reply(LLAMA, "p1", [1] * 10, latency=1.25,
                                stats={"predicted_per_second": 9.0, "prompt_ms": 100.0})]),
    }
    table = markdown_table(summary, NAMES)
    assert len(table.splitlines()) == 5
    target, lookup, llama = (row(table, NAMES[s]) for s in (TARGET_ONLY, LOOKUP, LLAMA))
    assert target[1:5] == ["**5.00**", "5.00", "1.00x", "0.62x"]
    assert lookup[1:5] == ["**10.00**", "10.00", "2.00x", "1.25x"]
    assert lookup[6:10] == ["50% (6/12)", "3 of 4", "2.50", "4.0"]
    assert llama[3:6] == ["1.60x", "1.00x", "9.0"] and llama[6:10] == ["–"] * 4
    # Without llama.cpp the column says so.
    assert row(markdown_table({TARGET_ONLY: summary[TARGET_ONLY]}, NAMES), NAMES[TARGET_ONLY])[4] == "–"


def test_the_workload_report_lists_mismatches_and_llama_cpps_agreement():
    replies = [reply(TARGET_ONLY, "p1", [1, 2, 3]), reply(LOOKUP, "p1", [1, 2, 3]), reply(LLAMA, "p1", [1, 5, 3]),
               reply(TARGET_ONLY, "p2", [4, 5]), reply(LOOKUP, "p2", [4, 6]), reply(LLAMA, "p2", [4, 5])]
    systems = [TARGET_ONLY, LOOKUP, LLAMA]
    bad = mismatches(replies)
    summary = {s: summarise([r for r in replies if r.system == s]) for s in systems}
    text = workload_report(WORKLOADS["code-edit"], summary, replies, bad, NAMES, systems)
    assert text.startswith("### code-edit: 2 prompts")
    assert ": 1 mismatch\n" in text and f"- {NAMES[LOOKUP]}, p2: token 1 is [6], expected [5]" in text
    assert agreement(replies, NAMES, systems).endswith("llama.cpp 1 of 2 (the others part at token 1).")


def test_the_code_edit_prompts_quote_code_to_change():
    rows = read_prompts(WORKLOADS["code-edit"], 6)
    assert [r["id"] for r in rows] == [f"code-edit-0{i}" for i in range(1, 7)]
    languages = set()
    for r in rows:
        fenced = re.search(r"```(\w+)\n(.*?)```", r["prompt"], re.S)
        assert fenced, r["id"]
        languages.add(fenced.group(1))
        assert len(fenced.group(2).splitlines()) >= 30, r["id"]
    assert languages == {"python", "javascript"}
    chat = read_prompts(WORKLOADS["chat"], 6)
    assert [r["category"] for r in chat] == ["chat"] * 6

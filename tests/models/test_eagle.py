"""Feature-level (EAGLE) drafting: the model, the drafter service's rows, the verifier's features,
the coordinator's plumbing, and training."""

from __future__ import annotations

import time
from itertools import islice

import pytest
import torch
from conftest import InProcessStack, hf_greedy, save

from drafter_svc.drafters import FeatureDrafter
from specdec.client import SpecdClient
from specdec.errors import InvalidRequest
from specdec.models.accept_head import lm_head_inputs
from specdec.models.eagle import feed_rows, greedy_drafts, is_feature_drafter
from specdec.models.loader import load_model
from specdec.sampling_params import SamplingParams
from specdec.wire.tensor_messages import hidden_from_proto, hidden_to_proto
from trainer.bootstrap import greedy_with_features
from trainer.eagle import collect_features, draft_acceptance, init_from_target, train_feature_drafter
from verifier_svc.verifier import VerifierCore

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


@pytest.fixture(scope="module")
def eagle_dirs(tmp_path_factory, tiny_dirs):
    """A one-layer feature drafter cut from each tiny target."""
    root = tmp_path_factory.mktemp("eagle")
    dirs = {}
    for arch in ("llama", "gpt2"):
        target = load_model(tiny_dirs[arch]["target"]).model
        dirs[arch] = save(init_from_target(target), root / arch)
    return dirs


def _features(model, ids: list[int]) -> torch.Tensor:
    """The target's features [len(ids), H] by one plain forward."""
    with torch.no_grad():
        return lm_head_inputs(model(input_ids=torch.tensor([ids]), output_hidden_states=True))[0]


def _fresh_drafts(drafter, ids: list[int], features: torch.Tensor, count: int) -> list[int]:
    """Greedy drafts recomputed from nothing: true rows, then the drafter's own features."""
    with torch.no_grad():
        logits, predicted, cache = feed_rows(drafter, None, torch.tensor(ids[1:]), features[:len(ids) - 1])
        return [int(token) for token, _ in islice(greedy_drafts(drafter, cache, logits, predicted), count)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_feature_drafter_loads_and_drafts_incrementally_as_from_scratch(arch, tiny_dirs, eagle_dirs):
    target = load_model(tiny_dirs[arch]["target"]).model
    loaded = load_model(eagle_dirs[arch])
    assert is_feature_drafter(loaded.model)
    drafter = FeatureDrafter(loaded)
    greedy = SamplingParams()
    full = PROMPT + [7, 8, 9, 10]
    features = _features(target, full)

    # A new session gets the prompt with its features (all but the last position, as a prefill sends).
    session = drafter.sync("s", 0, PROMPT, hidden=(0, features[:len(PROMPT) - 1]))
    drafts = [drafter.step(session, greedy, 0)[0].token for _ in range(3)]
    assert drafts == _fresh_drafts(loaded.model, PROMPT, features, 3)

    # The target committed other tokens; their features arrive: rows on predictions are redone.
    session = drafter.sync("s", len(PROMPT), full[len(PROMPT):], hidden=(len(PROMPT) - 1, features[len(PROMPT) - 1:-1]))
    later = [drafter.step(session, greedy, 0)[0].token for _ in range(2)]
    assert later == _fresh_drafts(loaded.model, full, features, 2)

    # Without any target feature there is nothing to draft from.
    assert drafter.step(drafter.sync("bare", 0, PROMPT), greedy, 0) is None
    # A gap in the features means the session lost them: the caller must resend everything.
    with pytest.raises(Exception, match="resend"):
        drafter.sync("s", len(full), [], hidden=(len(full) + 3, features[:1]))


def test_hidden_states_round_trip_and_bad_shapes_are_refused():
    rows = torch.randn(3, 8)
    start, back = hidden_from_proto(hidden_to_proto(5, rows), 8)
    assert start == 5 and torch.allclose(back, rows, atol=1e-2)
    with pytest.raises(InvalidRequest):
        hidden_from_proto(hidden_to_proto(0, rows), 16)
    bad = hidden_to_proto(0, rows)
    bad.data = bad.data[:-2]
    with pytest.raises(InvalidRequest):
        hidden_from_proto(bad, 8)
    with pytest.raises(InvalidRequest):
        hidden_from_proto(hidden_to_proto(0, torch.full((1, 8), float("nan"))), 8)


def test_verifier_sends_the_features_of_committed_positions(tiny_dirs):
    loaded = load_model(tiny_dirs["llama"]["target"])
    core = VerifierCore(loaded)
    committed, kept = core.prefill("v", PROMPT, SamplingParams(), 8, return_hidden=True)
    assert kept is None  # the prompt's features wait for a Verify that asks
    outcome = core.verify("v", committed, [1, 2, 3], None, return_hidden=True)
    start, rows = outcome.hidden
    committed_ids = core.sessions.get("v").ids
    assert start == 0 and rows.shape[0] == len(committed_ids) - 1
    assert torch.allclose(rows, _features(loaded.model, committed_ids)[:-1], atol=1e-5)


@pytest.mark.parametrize("mode", ["overlapped", "sequential"])
def test_greedy_output_with_a_feature_drafter_is_the_targets(mode, tiny_dirs, eagle_dirs):
    target = tiny_dirs["llama"]["target"]
    stack = InProcessStack(target, eagle_dirs["llama"], drafter_overrides={"draft_weights": "fp32"})
    try:
        with SpecdClient(stack.address) as client:
            response = client.generate(token_ids=PROMPT, max_new_tokens=24, mode=mode, policy="static")
        assert list(response.token_ids) == hf_greedy(target, PROMPT, 24)
        # Drafts were made, so the target's features reached the drafter through the coordinator.
        assert response.stats["drafted_tokens"] > 0
    finally:
        stack.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_batched_greedy_keeps_the_features_and_top_k_a_plain_forward_gives(arch, tiny_dirs):
    """Left-padded rows of different lengths decode as each would alone; a row stops at its EOS."""
    model = load_model(tiny_dirs[arch]["target"]).model
    prompts = [PROMPT, PROMPT[:3], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 40]]
    alone = [hf_greedy(tiny_dirs[arch]["target"], p, 10) for p in prompts]
    eos = alone[1][4]  # the short prompt's fifth token ends its row there
    samples = greedy_with_features(model, prompts, 10, pad_id=0, eos_ids={eos}, top_k=4)
    for prompt, reference, sample in zip(prompts, alone, samples):
        cut = next((i + 1 for i, token in enumerate(reference) if token == eos), len(reference))
        assert sample.prompt == prompt and sample.continuation == reference[:cut]
        ids = prompt + sample.continuation
        assert sample.features.dtype == torch.float16 and sample.features.shape[0] == len(ids)
        torch.testing.assert_close(sample.features.float(), _features(model, ids), atol=2e-3, rtol=2e-3)
        assert len(sample.top_ids) == len(sample.top_probs) == len(sample.continuation) + 1
        assert [top[0] for top in sample.top_ids[:-1]] == sample.continuation
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1:].float(), -1)
        torch.testing.assert_close(torch.tensor(sample.top_probs), probs.topk(4, dim=-1).values, atol=1e-4, rtol=1e-3)
    assert len(samples[1].continuation) == 5


def test_training_fits_a_feature_drafter_to_its_traces(tiny_dirs):
    """The random tiny target is chaotic, so nothing generalises to new prompts; what training must
    show is acceptance rising on the continuations it was fitted to."""
    torch.manual_seed(0)
    target = load_model(tiny_dirs["llama"]["target"]).model
    prompts = [torch.randint(0, 256, (6,)).tolist() for _ in range(32)]
    continuations = [s.continuation for s in greedy_with_features(target, prompts, 24, pad_id=0, eos_ids=set())]
    data = collect_features(target, [(p + c, len(p)) for p, c in zip(prompts, continuations)])
    drafter = init_from_target(target)
    before = draft_acceptance(drafter, data[:8])
    train_feature_drafter(drafter, data, epochs=150, lr=3e-3, batch_size=8, noise=0.0)
    after = draft_acceptance(drafter, data[:8])
    assert after["mean_accepted"] > before["mean_accepted"] + 0.15, (before, after)
    # A time limit ends the run (its cosine follows the clock, so it still anneals).
    timed = train_feature_drafter(drafter, data, epochs=10_000, batch_size=8, time_limit_s=1.0)
    assert 0 < timed["steps"] < 10_000 * 4 and timed["seconds"] < 5


def test_distill_eagle_publishes_a_drafter_that_swaps_in_for_its_own_kind_only(tmp_path, tiny_dirs, eagle_dirs,
                                                                                monkeypatch):
    from dataclasses import replace

    from drafter_svc.drafters import ModelDrafter
    from specdec.models.checkpoints import CheckpointStore
    from specdec.traces import TEACHER_DRAFTER_VERSION, TraceRecord
    from trainer.eagle import distill_feature_drafter

    target = load_model(tiny_dirs["llama"]["target"])
    torch.manual_seed(1)
    prompts = [torch.randint(0, 256, (6,)).tolist() for _ in range(12)]
    continuations = [s.continuation for s in greedy_with_features(target.model, prompts, 16, pad_id=0,
                                                                   eos_ids=set())]
    records = [TraceRecord(request_id=f"r{i}", drafter_version=TEACHER_DRAFTER_VERSION, context_ids=p,
                           draft_tokens=c, accepted=len(c)) for i, (p, c) in enumerate(zip(prompts, continuations))]
    store = CheckpointStore(tmp_path / "store")
    # Features kept at generation spare a forward; a stale entry (other ids) is recomputed.
    known = collect_features(target.model, [(p + c, len(p)) for p, c in zip(prompts[:6], continuations[:6])])
    known = {f"r{i}": seq for i, seq in enumerate(known)}
    known["r0"] = replace(known["r0"], ids=known["r0"].ids[:-1])
    recomputed = []
    monkeypatch.setattr("trainer.eagle.collect_features",
                        lambda model, sequences: recomputed.extend(sequences) or collect_features(model, sequences))
    report = distill_feature_drafter(target.model, records, store, head_vocab=128, holdout=4, promote=True,
                                     epochs=2, batch_size=4, known_features=known)
    assert len(recomputed) == report["features_computed"] == 12 - 5
    assert recomputed[0][0] == prompts[0] + continuations[0]
    assert report["holdout_requests"] == 4 and report["steps"] == 4 and store.current() == report["version"]
    meta = store.meta(report["version"])
    assert meta["kind"] == "eagle" and "holdout_after" in meta
    checkpoint = store.load(report["version"])
    assert is_feature_drafter(checkpoint.model)

    drafter = FeatureDrafter(load_model(eagle_dirs["llama"]))
    drafter.swap(replace(drafter.loaded, model=checkpoint.model))
    assert drafter.generation == 1
    token_drafter = ModelDrafter(load_model(tiny_dirs["llama"]["close"]))
    with pytest.raises(InvalidRequest, match="different inputs"):
        token_drafter.swap(replace(token_drafter.loaded, model=checkpoint.model))


@pytest.mark.parametrize("drafter_kind", ["feature", "token"])
def test_losing_the_verifier_mid_stream_re_prefills_elsewhere_with_the_same_output(drafter_kind, tiny_dirs,
                                                                                   eagle_dirs):
    """The second verifier gets the committed text (and, for a feature drafter, restates its features)."""
    from specdec.v1 import verifier_pb2, verifier_pb2_grpc

    target = tiny_dirs["llama"]["target"]
    drafter = eagle_dirs["llama"] if drafter_kind == "feature" else tiny_dirs["llama"]["close"]
    stack = InProcessStack(target, drafter, verifiers=2, drafter_overrides={"draft_weights": "fp32"})
    try:
        with SpecdClient(stack.address) as client:
            chunks = client.stream(token_ids=PROMPT, max_new_tokens=200, mode="overlapped", policy="static")
            tokens = list(next(chunks).token_ids)
            stopped = []
            for name in ("verifier0", "verifier1"):
                with grpc_channel(stack.port(name)) as channel:
                    info = verifier_pb2_grpc.VerifierStub(channel).Info(verifier_pb2.InfoRequest(), timeout=5)
                if info.active_sessions:
                    stack.stop_server(name)
                    stopped.append(name)
            for chunk in chunks:
                tokens.extend(chunk.token_ids)
                if chunk.done:
                    stats = chunk.stats
        assert len(stopped) == 1
        assert tokens == hf_greedy(target, PROMPT, 200)
        assert stats.drafted_tokens > 0
    finally:
        stack.close()


def grpc_channel(port: int):
    import grpc

    return grpc.insecure_channel(f"127.0.0.1:{port}")


def test_a_coordinator_started_before_its_feature_drafter_learns_it_reads_features(tiny_dirs, eagle_dirs,
                                                                                    monkeypatch):
    from drafter_svc.server import start as start_drafter
    from specd.stack import free_port
    from specdec.config import load_settings

    monkeypatch.setenv("SPECD_BACKEND_WAIT_S", "1")  # the drafter is not up yet: start without its Info
    target = tiny_dirs["llama"]["target"]
    port = free_port()
    stack = InProcessStack(target, None, coordinator_overrides={"drafter_addrs": f"127.0.0.1:{port}",
                                                                "drafter_retry_s": 0.2})
    try:
        settings = load_settings("drafter", {"model": eagle_dirs["llama"], "port": port, "draft_weights": "fp32"},
                                 environ={})
        stack.servers["drafter"] = stack.run(start_drafter(settings))
        reference = hf_greedy(target, PROMPT, 24)
        drafted = 0
        deadline = time.monotonic() + 30  # the channel to the late drafter may still be in reconnect backoff
        with SpecdClient(stack.address) as client:
            while not drafted and time.monotonic() < deadline:
                response = client.generate(token_ids=PROMPT, max_new_tokens=24, mode="sequential", policy="static")
                assert list(response.token_ids) == reference
                drafted = response.stats["drafted_tokens"]
                time.sleep(0.2)
        assert drafted > 0
    finally:
        stack.close()


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_hf_assisted_generation_drives_a_feature_drafter_to_the_targets_greedy_output(num_tokens, tiny_dirs, eagle_dirs):
    """The bench's same-drafter HF row: transformers' assisted loop with specd's EAGLE drafter."""
    from bench.hf_eagle import EagleCandidateGenerator, eagle_assisted

    target = load_model(tiny_dirs["llama"]["target"]).model
    drafter = load_model(eagle_dirs["llama"]).model
    ids = torch.tensor([PROMPT])
    with torch.no_grad(), eagle_assisted(target, drafter, num_tokens) as made:
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              assistant_model=drafter, pad_token_id=0)
    assert out[0, len(PROMPT):].tolist() == hf_greedy(tiny_dirs["llama"]["target"], PROMPT, 12)
    generator = made[0]
    assert generator.rounds > 0 and 0 <= generator.accepted <= generator.drafted <= num_tokens * generator.rounds
    assert "_get_candidate_generator" not in vars(target)  # the target's own method is back

    # Its drafts are the drafter's own greedy drafts from the target's features.
    first = [*PROMPT, 7]
    features = _features(target, first)
    direct = EagleCandidateGenerator(drafter, num_tokens, max_length=64)
    prompt_outputs = target(input_ids=torch.tensor([PROMPT]), output_hidden_states=True)
    with torch.no_grad():
        candidates, logits = direct.get_candidates(torch.tensor([first]), model_outputs=prompt_outputs)
    assert candidates[0, len(first):].tolist() == _fresh_drafts(drafter, first, features, num_tokens)
    assert logits.shape == (1, num_tokens, target.config.vocab_size)

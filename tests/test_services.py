"""Verifier and drafter services on their own: rollback, sessions, bad input."""

from __future__ import annotations

import grpc
import pytest
import torch
from conftest import InProcessStack
from transformers import AutoModelForCausalLM

from drafter_svc.drafters import ModelDrafter, PromptLookup
from specdec.client import SpecdClient
from specdec.models.loader import load_model
from specdec.sampling_params import SamplingParams
from specdec.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from verifier_svc.verifier import VerifierCore

GREEDY = common_pb2.SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def stack(tiny_dirs):
    dirs = tiny_dirs["llama"]
    # fp32 drafts: the tests below compare the drafter's numbers with its model's own forward
    running = InProcessStack(dirs["target"], dirs["unrelated"], verifiers=1, drafter_overrides={"draft_weights": "fp32"})
    yield running, dirs
    running.close()


def _stubs(stack):
    running, _ = stack
    verifier = verifier_pb2_grpc.VerifierStub(grpc.insecure_channel(f"127.0.0.1:{running.port('verifier0')}"))
    drafter = drafter_pb2_grpc.DrafterStub(grpc.insecure_channel(f"127.0.0.1:{running.port('drafter')}"))
    return verifier, drafter


def _next_logits(model_dir: str, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def test_verifier_rollback_matches_fresh_prefill(stack):
    verifier, _ = _stubs(stack)
    _, dirs = stack
    prompt = [3, 14, 15, 92, 65, 35]
    verifier.Prefill(verifier_pb2.PrefillRequest(session_id="rb", token_ids=prompt, sampling=GREEDY, max_new_tokens=16))
    # An unlikely draft: the target rejects it early, so the cache must be cropped.
    response = verifier.Verify(verifier_pb2.VerifyRequest(session_id="rb", committed_len=len(prompt),
                                                          draft_tokens=[0, 1, 2, 3, 4], return_top_k=4))
    assert response.accepted < 5
    committed = prompt + [0, 1, 2, 3, 4][: response.accepted] + [response.next_token]
    assert response.committed_len == len(committed)
    # The next step's top-k comes from the rolled-back cache; compare with a fresh forward pass.
    step = verifier.Verify(verifier_pb2.VerifyRequest(session_id="rb", committed_len=len(committed), return_top_k=4))
    fresh = _next_logits(dirs["target"], committed).softmax(-1)
    top = step.target_top_k[0]
    torch.testing.assert_close(torch.tensor(list(top.probs)), fresh[list(top.indices)], atol=1e-4, rtol=1e-3)
    assert step.next_token == int(fresh.argmax())
    verifier.Release(verifier_pb2.ReleaseRequest(session_id="rb"))


def test_drafter_rollback_matches_fresh_prefill(stack):
    _, drafter = _stubs(stack)
    _, dirs = stack
    prompt = [7, 7, 1, 2, 9, 4]
    first = list(drafter.Draft(drafter_pb2.DraftRequest(session_id="drb", tokens=prompt, max_tokens=5, sampling=GREEDY)))
    assert len(first) == 5
    # The target "rejected" the third draft token: continue from prompt + two drafts + a correction.
    corrected = [t.token for t in first[:2]] + [(first[2].token + 1) % 256]
    second = list(drafter.Draft(drafter_pb2.DraftRequest(session_id="drb", base_len=len(prompt), tokens=corrected,
                                                          max_tokens=1, sampling=GREEDY)))
    fresh = _next_logits(dirs["unrelated"], prompt + corrected).softmax(-1)
    assert second[0].token == int(fresh.argmax())
    assert second[0].confidence == pytest.approx(float(fresh.max()), rel=1e-4)
    # An explicit rollback to a shorter prefix works the same way.
    assert drafter.Rollback(drafter_pb2.RollbackRequest(session_id="drb", length=len(prompt) + 1)).length == len(prompt) + 1
    third = list(drafter.Draft(drafter_pb2.DraftRequest(session_id="drb", base_len=len(prompt) + 1, tokens=[],
                                                         max_tokens=1, sampling=GREEDY)))
    fresh = _next_logits(dirs["unrelated"], prompt + [first[0].token]).softmax(-1)
    assert third[0].token == int(fresh.argmax())


def _count_fed_tokens(model) -> list[int]:
    """Records how many tokens each forward of `model` feeds."""
    fed: list[int] = []
    model.register_forward_pre_hook(lambda _m, _args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    return fed


def test_rollbacks_keep_all_valid_kv_and_recompute_nothing(tiny_dirs):
    """A verify round feeds the correction plus the new draft only, and a drafter resumes after a
    partial acceptance by feeding the correction alone: no accepted token is ever fed twice."""
    dirs = tiny_dirs["llama"]
    target = load_model(dirs["target"])
    fed = _count_fed_tokens(target.model)
    core = VerifierCore(target)
    prompt = [3, 14, 15, 92, 65, 35]
    committed, _ = core.prefill("kv", prompt, SamplingParams(), max_new_tokens=16)
    first = core.verify("kv", committed, [0, 1, 2, 3], None)
    second = core.verify("kv", first.committed_len, [5, 6], None)
    core.verify("kv", second.committed_len, [], None)
    assert fed == [len(prompt) - 1, 1 + 4, 1 + 2, 1]

    drafter = ModelDrafter(load_model(dirs["unrelated"]))
    fed = _count_fed_tokens(drafter.loaded.model)
    session = drafter.sync("kv", 0, prompt)
    drafts = [drafter.step(session, SamplingParams(), 0)[0].token for _ in range(3)]
    session = drafter.sync("kv", len(prompt), drafts[:2] + [(drafts[2] + 1) % 256])
    drafter.step(session, SamplingParams(), 0)
    # A rollback into already drafted text with nothing new to feed recomputes the last token only.
    session = drafter.sync("kv", len(prompt), drafts[:1])
    drafter.step(session, SamplingParams(), 0)
    assert fed == [len(prompt), 1, 1, 1, 1]


def test_prompt_lookup_drafts_repeats_for_free_and_the_model_reads_them_in_its_next_step(tiny_dirs):
    dirs = tiny_dirs["llama"]
    drafter = ModelDrafter(load_model(dirs["unrelated"]), lookup=PromptLookup(ngram_max=3, ngram_min=2))
    fed = _count_fed_tokens(drafter.loaded.model)
    prompt = [7, 8, 9, 40, 41, 7, 8]  # "7 8" was followed by 9, and "8 9" by 40
    session = drafter.sync("lookup", 0, prompt)
    first, dist = drafter.step(session, SamplingParams(), 0)
    second, _ = drafter.step(session, SamplingParams(), 0)
    assert (first.token, second.token, first.confidence) == (9, 40, 1.0) and dist is None  # q(token) = 1
    assert fed == []  # nothing ran the model yet
    _, sampled = drafter.step(session, SamplingParams(temperature=1.0, seed=3), 0)
    assert sampled.indices.tolist() == [41] and sampled.probs.tolist() == [1.0]  # one-hot q: exact rejection sampling
    # A context with no repeat goes to the model, which reads the looked-up tokens in the same forward.
    session = drafter.sync("lookup", len(prompt), [9, 40, 41, 200])
    model_step, _ = drafter.step(session, SamplingParams(), 0)
    assert fed == [len(prompt) + 4] and model_step.entropy > 0


def test_lookup_drafts_carry_the_rules_precision_on_committed_text():
    """Stop rules see how often prompt lookup was right on this request, not a blind certainty."""
    import random

    from drafter_svc.drafters import NgramDrafter
    from specdec.stopping import StopRule, should_stop

    rng = random.Random(5)
    drafter = NgramDrafter(vocab_size=500)
    passage = [rng.randrange(100, 500) for _ in range(40)]
    copying = drafter.sync("copy", 0, passage + passage[:30])       # the answer quotes the passage
    copy_step, _ = drafter.step(copying, SamplingParams(), 0)
    varying = [token for i in range(30) for token in (1, 2, 10 + i)]  # "1 2" is followed by something new each time
    guessing = drafter.sync("vary", 0, varying + [1, 2])
    guess_step, _ = drafter.step(guessing, SamplingParams(), 0)
    assert copy_step.token == passage[30] and copy_step.accept_prob > 0.9
    assert guess_step.token == 39 and guess_step.accept_prob < 0.1
    for rule, threshold in [(StopRule.ENTROPY, 0.3), (StopRule.CONFIDENCE, 0.7)]:
        assert not should_stop(rule, threshold, [copy_step]) and should_stop(rule, threshold, [guess_step])
    # Tokens past committed_len are drafts in flight: they do not count for or against the rule.
    before = drafter.lookup.precision(guessing)
    committed = len(varying) + 2
    guessing = drafter.sync("vary", committed, [39, 1, 2, 39], committed_len=committed)
    assert drafter.lookup.precision(guessing) == before


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return info.value.code(), info.value.details()


def test_bad_input_gets_clear_statuses_and_service_keeps_serving(stack):
    running, _ = stack
    verifier, drafter = _stubs(stack)
    client = SpecdClient(running.address)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = {
        "empty prompt": lambda: client.generate(token_ids=[], max_new_tokens=4),
        "empty text prompt": lambda: client.generate(prompt="", max_new_tokens=4),
        "too long": lambda: client.generate(token_ids=[1] * 600, max_new_tokens=4),
        "negative temperature": lambda: client.generate(token_ids=[1, 2], max_new_tokens=4, temperature=-1.0),
        "nan temperature": lambda: client.generate(token_ids=[1, 2], max_new_tokens=4, temperature=float("nan")),
        "top_p > 1": lambda: client.generate(token_ids=[1, 2], max_new_tokens=4, temperature=1.0, top_p=1.5),
        "top_p < 0": lambda: client.generate(token_ids=[1, 2], max_new_tokens=4, temperature=1.0, top_p=-0.2),
        "zero tokens": lambda: client.generate(token_ids=[1, 2], max_new_tokens=0),
        "huge tokens": lambda: client.generate(token_ids=[1, 2], max_new_tokens=10**9),
        "prompt out of vocabulary": lambda: client.generate(token_ids=[1, 99999], max_new_tokens=4),
    }
    for name, call in cases.items():
        code, details = _code(call)
        assert code == invalid, name
        assert details, name
    code, details = _code(lambda: verifier.Verify(verifier_pb2.VerifyRequest(session_id="nope", committed_len=1)))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown session" in details
    verifier.Prefill(verifier_pb2.PrefillRequest(session_id="oov", token_ids=[1, 2], sampling=GREEDY, max_new_tokens=4))
    code, details = _code(lambda: verifier.Verify(verifier_pb2.VerifyRequest(session_id="oov", committed_len=2,
                                                                            draft_tokens=[5, 4096])))
    assert code == invalid and "vocabulary" in details
    code, _ = _code(lambda: verifier.Verify(verifier_pb2.VerifyRequest(session_id="oov", committed_len=7)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = _code(lambda: drafter.Draft(drafter_pb2.DraftRequest(session_id="d", tokens=[1, 300], max_tokens=2)))
    assert code == invalid
    code, _ = _code(lambda: drafter.Draft(drafter_pb2.DraftRequest(session_id="ghost", base_len=3, tokens=[1], max_tokens=2)))
    assert code == grpc.StatusCode.NOT_FOUND
    # Still serving afterwards.
    assert len(client.generate(token_ids=[1, 2, 3], max_new_tokens=5).token_ids) == 5


def test_capacity_bound_gives_resource_exhausted(tiny_dirs):
    from specdec.config import load_settings
    from verifier_svc.server import start

    running = InProcessStack(tiny_dirs["llama"]["target"], None)
    try:
        settings = load_settings("verifier", {"model": tiny_dirs["llama"]["target"], "max_sessions": 2}, environ={})
        server = running.run(start(settings))
        stub = verifier_pb2_grpc.VerifierStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        for sid in ("a", "b"):
            stub.Prefill(verifier_pb2.PrefillRequest(session_id=sid, token_ids=[1], sampling=GREEDY, max_new_tokens=1))
        code, details = _code(lambda: stub.Prefill(verifier_pb2.PrefillRequest(session_id="c", token_ids=[1],
                                                                               sampling=GREEDY, max_new_tokens=1)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "sessions" in details
        stub.Release(verifier_pb2.ReleaseRequest(session_id="a"))
        stub.Prefill(verifier_pb2.PrefillRequest(session_id="c", token_ids=[1], sampling=GREEDY, max_new_tokens=1))
        running.run(server.drain(0))
    finally:
        running.close()


def test_mismatched_drafter_is_refused(tiny_dirs, tmp_path):
    from conftest import save, tiny_model

    from drafter_svc.server import build_drafter
    from specdec.config import load_settings
    from specdec.models.sources import ModelLoadError

    other_vocab = save(tiny_model("llama", seed=5, vocab_size=300), tmp_path / "other")
    settings = load_settings("drafter", {"model": other_vocab, "target": "smollm2-135m"}, environ={})
    with pytest.raises(ModelLoadError, match="does not share the tokenizer"):
        build_drafter(settings)
    # The coordinator refuses the pair too, by tokenizer fingerprint.
    with pytest.raises(RuntimeError, match="does not share the tokenizer"):
        InProcessStack(tiny_dirs["llama"]["target"], other_vocab)

"""The drafter service on its own: a rollback drafts what a fresh prefill drafts, a resumed session feeds only
the correction, prompt lookup drafts repeats for free with the precision it has had, and a drafter whose
tokenizer is not the target's is refused."""

from __future__ import annotations

import pytest
from conftest import InProcessStack
from service_stubs import GREEDY, count_fed_tokens, next_logits, stubs
from service_stubs import stack  # noqa: F401 - a fixture

from drafter_svc.drafters import ModelDrafter, PromptLookup
from specdec.models.loader import load_model
from specdec.sampling_params import SamplingParams
from specdec.v1 import drafter_pb2


def test_drafter_rollback_matches_fresh_prefill(stack):
    _, drafter = stubs(stack)
    _, dirs = stack
    prompt = [7, 7, 1, 2, 9, 4]
    first = list(drafter.Draft(drafter_pb2.DraftRequest(session_id="drb", tokens=prompt, max_tokens=5, sampling=GREEDY)))
    assert len(first) == 5
    # The target "rejected" the third draft token: continue from prompt + two drafts + a correction.
    corrected = [t.token for t in first[:2]] + [(first[2].token + 1) % 256]
    second = list(drafter.Draft(drafter_pb2.DraftRequest(session_id="drb", base_len=len(prompt), tokens=corrected,
                                                          max_tokens=1, sampling=GREEDY)))
    fresh = next_logits(dirs["unrelated"], prompt + corrected).softmax(-1)
    assert second[0].token == int(fresh.argmax())
    assert second[0].confidence == pytest.approx(float(fresh.max()), rel=1e-4)
    # An explicit rollback to a shorter prefix works the same way.
    assert drafter.Rollback(drafter_pb2.RollbackRequest(session_id="drb", length=len(prompt) + 1)).length == len(prompt) + 1
    third = list(drafter.Draft(drafter_pb2.DraftRequest(session_id="drb", base_len=len(prompt) + 1, tokens=[],
                                                         max_tokens=1, sampling=GREEDY)))
    fresh = next_logits(dirs["unrelated"], prompt + [first[0].token]).softmax(-1)
    assert third[0].token == int(fresh.argmax())


def test_a_drafter_resumes_after_a_partial_acceptance_by_feeding_the_correction_alone(tiny_dirs):
    """No accepted token is ever fed twice: the drafter feeds the correction alone."""
    dirs = tiny_dirs["llama"]
    prompt = [3, 14, 15, 92, 65, 35]
    drafter = ModelDrafter(load_model(dirs["unrelated"]))
    fed = count_fed_tokens(drafter.loaded.model)
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
    fed = count_fed_tokens(drafter.loaded.model)
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

"""Continuous batching in the verifier: many sessions per forward pass, each with the bits it has alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import hf_greedy, tiny_model

from specdec import metrics
from specdec.compute import packed, small_gemm
from specdec.compute.paged_kv import KVPool, PagedCache
from specdec.models.loader import load_model
from specdec.sampling_params import SamplingParams
from verifier_svc.scheduler import VerifierOptions
from verifier_svc.verifier import VerifierCore

ARCHS = ["llama", "qwen2", "gpt2"]
PROMPTS = [[5, 9, 14, 2, 77, 31], [100, 3, 8], [42, 42, 17, 250, 6, 1, 90, 12, 33], [7]]


def _kernel_model(arch: str):
    model = tiny_model(arch)
    if not small_gemm.install(model):
        pytest.skip("the batch-invariant kernel needs x86 with AVX2 and FMA and a C compiler")
    packed.install(model)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_pass_gives_each_session_its_own_bits(arch):
    """A session's logits and features are bit-identical alone and packed with others, and match HF's own forward."""
    model, reference = _kernel_model(arch), tiny_model(arch)
    cpu = torch.device("cpu")
    keep = [min(2, len(p)) for p in PROMPTS]
    pool = KVPool()
    alone = [packed.packed_forward(model, [(p, 0, PagedCache(pool))], cpu, [k], True)[0] for p, k in zip(PROMPTS, keep)]
    together = packed.packed_forward(model, [(p, 0, PagedCache(pool)) for p in PROMPTS], cpu, keep, True)
    for prompt, (logits, hidden), (batched_logits, batched_hidden) in zip(PROMPTS, alone, together):
        assert torch.equal(logits, batched_logits) and torch.equal(hidden, batched_hidden)
        expected = reference(input_ids=torch.tensor([prompt])).logits[0, -min(2, len(prompt)):]
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_prompt_cached_in_any_chunks_beside_any_rows_has_the_same_bits(arch):
    """The scheduler chunks prompts by the room verifies leave: the chunking and the company must not matter."""
    model = _kernel_model(arch)
    cpu, pool = torch.device("cpu"), KVPool()
    prompt = [(11 * i) % 250 + 1 for i in range(40)]
    [(whole, _)] = packed.packed_forward(model, [(prompt, 0, PagedCache(pool))], cpu, [1], False)
    chunked, other = PagedCache(pool), PagedCache(pool)
    packed.packed_forward(model, [(prompt[:5], 0, chunked), ([9, 8, 7], 0, other)], cpu, [0, 1], False)
    packed.packed_forward(model, [([6, 5], 3, other), (prompt[5:21], 5, chunked)], cpu, [2, 0], False)
    _, (last, _) = packed.packed_forward(model, [([1], 5, other), (prompt[21:], 21, chunked)], cpu, [1, 1], False)
    assert torch.equal(whole, last)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_shared_prompt_prefix_gives_the_bits_of_computing_it(arch):
    model = _kernel_model(arch)
    cpu, pool = torch.device("cpu"), KVPool()
    system = [(13 * i) % 250 + 1 for i in range(35)]  # two full blocks in common
    first, second = system + [7, 8, 9], system + [60, 61]
    [(alone, _)] = packed.packed_forward(model, [(second, 0, PagedCache(pool))], cpu, [1], False)
    owner = PagedCache(pool)
    packed.packed_forward(model, [(first, 0, owner)], cpu, [1], False)
    owner.publish_prefix(first)
    sharer = PagedCache(pool)
    assert sharer.adopt_prefix(second) == 32
    [(shared, _)] = packed.packed_forward(model, [(second[32:], 32, sharer)], cpu, [1], False)
    assert torch.equal(alone, shared)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prefix_caching_changes_no_token(tiny_dirs, prefix_caching):
    """Prompts with a common preamble decode, concurrently, exactly what each decodes alone without sharing."""
    target_dir = tiny_dirs["llama"]["target"]
    core = VerifierCore(load_model(target_dir), VerifierOptions(small_gemm=True, prefix_caching=prefix_caching))
    preamble = [(17 * i) % 250 + 1 for i in range(40)]
    prompts = [preamble + p for p in PROMPTS]
    hits = metrics.PREFIX_CACHE_HITS.labels(service="verifier")
    try:
        reference = [hf_greedy(target_dir, p, 10) for p in prompts]
        results = {0: _greedy_by_verifier(core, "first", prompts[0], 10, [0])[0]}  # computes the preamble
        before = hits._value.get()
        threads = [threading.Thread(target=lambda i=i, p=p: results.__setitem__(
            i, _greedy_by_verifier(core, f"s{i}", p, 10, [0])[0])) for i, p in enumerate(prompts) if i]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [results[i] for i in range(len(prompts))] == reference
        assert hits._value.get() - before == (32 * (len(prompts) - 1) if prefix_caching else 0)
    finally:
        core.close()


def _greedy_by_verifier(core: VerifierCore, session_id: str, prompt: list[int], new_tokens: int,
                        drafts: list[int]) -> tuple[list[int], list[int]]:
    """Decodes greedily through verify calls that each send a few draft tokens (right or wrong):
    returns the committed tokens and the sessions per pass the calls saw."""
    committed, _ = core.prefill(session_id, prompt, SamplingParams(), new_tokens)
    out, batch_sessions, step = [], [], 0
    while len(out) < new_tokens:
        draft = drafts[step % len(drafts): step % len(drafts) + 1 + step % 3]
        outcome = core.verify(session_id, committed, draft, None)
        out += draft[:outcome.accepted] + [outcome.next_token]
        committed = outcome.committed_len
        batch_sessions.append(outcome.batch_sessions)
        step += 1
    core.release(session_id)
    return out[:new_tokens], batch_sessions


@pytest.mark.parametrize("arch", ARCHS)
def test_concurrent_sessions_decode_exactly_what_they_decode_alone(arch, tiny_dirs):
    """Interleaved accept and reject patterns across sessions: rolling one back never touches another's KV."""
    target_dir = tiny_dirs[arch]["target"]
    loaded = load_model(target_dir)
    core = VerifierCore(loaded, VerifierOptions(small_gemm=True))
    try:
        reference = [hf_greedy(target_dir, p, 12) for p in PROMPTS]
        # Drafts drawn from the right continuation of another prompt: some accepted, most rejected.
        drafts = [reference[(i + 1) % len(PROMPTS)] + reference[i] for i in range(len(PROMPTS))]
        alone = [_greedy_by_verifier(core, f"alone-{i}", p, 12, drafts[i])[0] for i, p in enumerate(PROMPTS)]
        results: dict[int, tuple[list[int], list[int]]] = {}
        threads = [threading.Thread(target=lambda i=i, p=p: results.__setitem__(
            i, _greedy_by_verifier(core, f"together-{i}", p, 12, drafts[i]))) for i, p in enumerate(PROMPTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [results[i][0] for i in range(len(PROMPTS))] == alone
        assert alone == reference
        assert max(s for i in results for s in results[i][1]) > 1, "no pass ever held two sessions"
        assert len(core.sessions) == 0
    finally:
        core.close()


def test_sampled_verification_draws_the_same_tokens_in_a_batch(tiny_dirs):
    """Randomness is a function of (seed, position): with the same bits, a batched session samples exactly
    what it samples alone, so the distribution tests on single sessions carry over."""
    loaded = load_model(tiny_dirs["llama"]["target"])
    core = VerifierCore(loaded, VerifierOptions(small_gemm=True))
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)

    def run(session_id: str) -> list[int]:
        committed, _ = core.prefill(session_id, PROMPTS[0], sampling, 16)
        tokens = []
        for _ in range(10):
            outcome = core.verify(session_id, committed, [], [])
            tokens.append(outcome.next_token)
            committed = outcome.committed_len
        core.release(session_id)
        return tokens

    try:
        alone = run("alone")
        together: dict[str, list[int]] = {}
        threads = [threading.Thread(target=lambda n=n: together.__setitem__(n, run(n))) for n in ("a", "b", "c")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert together == {"a": alone, "b": alone, "c": alone}
    finally:
        core.close()


def test_a_long_prefill_does_not_stall_other_sessions(tiny_dirs):
    """Prefill runs a chunk per step: another session keeps verifying while a long prompt is cached."""
    loaded = load_model(tiny_dirs["llama"]["target"])
    core = VerifierCore(loaded, VerifierOptions(small_gemm=True, prefill_chunk=16))
    try:
        committed, _ = core.prefill("short", PROMPTS[0], SamplingParams(), 64)
        long_prompt = [(7 * i) % 250 for i in range(400)]
        pending = core.submit_prefill("long", long_prompt, SamplingParams(), 8)
        steps_during_prefill = 0
        while not pending.done():
            outcome = core.verify("short", committed, [], None)
            committed = outcome.committed_len
            steps_during_prefill += 1
            if committed >= len(PROMPTS[0]) + 60:
                break
        assert pending.result(timeout=60)[0] == len(long_prompt)
        assert steps_during_prefill >= 5, f"only {steps_during_prefill} verify steps ran during a 25-chunk prefill"
    finally:
        core.close()


def test_a_release_queued_behind_an_abandoned_prefill_frees_the_session(tiny_dirs):
    loaded = load_model(tiny_dirs["llama"]["target"])
    core = VerifierCore(loaded, VerifierOptions(small_gemm=True, prefill_chunk=16))
    try:
        pending = core.submit_prefill("gone", [(3 * i) % 250 for i in range(200)], SamplingParams(), 8)
        core.release("gone")  # the caller gave up; the prefill is already queued and runs anyway
        core.after_pending(lambda: core.release("gone"))
        pending.result(timeout=60)
        deadline = time.monotonic() + 10
        while len(core.sessions) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(core.sessions) == 0
    finally:
        core.close()


def _features(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0]  # [len(ids), H], what the verifier sends


@pytest.mark.parametrize("kind", ["model", "feature"])
def test_batched_draft_steps_propose_what_single_steps_propose(kind, tiny_dirs, tmp_path):
    """One packed pass drafts for every stream; each session's drafts equal its drafts stepped alone."""
    from conftest import save

    from drafter_svc.drafters import FeatureDrafter, ModelDrafter, StepItem
    from trainer.eagle import init_from_target

    target = load_model(tiny_dirs["llama"]["target"]).model
    if kind == "model":
        drafter_dir, make = tiny_dirs["llama"]["close"], ModelDrafter
    else:
        drafter_dir, make = save(init_from_target(target), tmp_path / "eagle"), FeatureDrafter
    greedy = SamplingParams()

    def open_sessions(drafter, prefix: str):
        sessions = []
        for i, prompt in enumerate(PROMPTS[:3]):
            hidden = (0, _features(target, prompt)[:len(prompt) - 1]) if kind == "feature" else None
            sessions.append(drafter.sync(f"{prefix}{i}", 0, prompt + [11, 12], hidden=hidden))
        return sessions

    alone_drafter = make(load_model(drafter_dir), small_gemm=True)
    alone = [[alone_drafter.step(s, greedy, 0)[0].token for _ in range(4)] for s in open_sessions(alone_drafter, "a")]
    batched_drafter = make(load_model(drafter_dir), small_gemm=True)
    sessions = open_sessions(batched_drafter, "b")
    together = [[] for _ in sessions]
    for _ in range(4):
        for out, (step, _dist) in zip(together, batched_drafter.step_many([StepItem(s, greedy, 0) for s in sessions])):
            out.append(step.token)
    assert together == alone

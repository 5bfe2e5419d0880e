"""The verifier service on its own: a rollback's cache equals a fresh prefill's, a verify round feeds only the
tokens it has not seen, and a session limit answers RESOURCE_EXHAUSTED."""

from __future__ import annotations

import grpc
import torch
from conftest import InProcessStack
from service_stubs import GREEDY, count_fed_tokens, next_logits, status_of, stubs
from service_stubs import stack  # noqa: F401 - a fixture

from specdec.models.loader import load_model
from specdec.sampling_params import SamplingParams
from specdec.v1 import verifier_pb2, verifier_pb2_grpc
from verifier_svc.scheduler import VerifierOptions
from verifier_svc.verifier import VerifierCore


def test_verifier_rollback_matches_fresh_prefill(stack):
    verifier, _ = stubs(stack)
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
    fresh = next_logits(dirs["target"], committed).softmax(-1)
    top = step.target_top_k[0]
    torch.testing.assert_close(torch.tensor(list(top.probs)), fresh[list(top.indices)], atol=1e-4, rtol=1e-3)
    assert step.next_token == int(fresh.argmax())
    verifier.Release(verifier_pb2.ReleaseRequest(session_id="rb"))


def test_a_verify_round_feeds_the_correction_and_the_new_drafts_only(tiny_dirs):
    """A verify round feeds the correction plus the new draft only: no accepted token is ever fed twice."""
    dirs = tiny_dirs["llama"]
    target = load_model(dirs["target"])
    fed = count_fed_tokens(target.model)
    core = VerifierCore(target, VerifierOptions(measure_pass_cost=False))  # its timing passes would count too
    prompt = [3, 14, 15, 92, 65, 35]
    committed, _ = core.prefill("kv", prompt, SamplingParams(), max_new_tokens=16)
    first = core.verify("kv", committed, [0, 1, 2, 3], None)
    second = core.verify("kv", first.committed_len, [5, 6], None)
    core.verify("kv", second.committed_len, [], None)
    assert fed == [len(prompt) - 1, 1 + 4, 1 + 2, 1]


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
        code, details = status_of(lambda: stub.Prefill(verifier_pb2.PrefillRequest(session_id="c", token_ids=[1],
                                                                                   sampling=GREEDY, max_new_tokens=1)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "sessions" in details
        stub.Release(verifier_pb2.ReleaseRequest(session_id="a"))
        stub.Prefill(verifier_pb2.PrefillRequest(session_id="c", token_ids=[1], sampling=GREEDY, max_new_tokens=1))
        running.run(server.drain(0))
    finally:
        running.close()

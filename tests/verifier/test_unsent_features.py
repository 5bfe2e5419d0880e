"""A session that reads the target's features gets them only when it asks; the verifier keeps them meanwhile."""

import torch

from specdec.models.loader import load_model
from specdec.sampling_params import SamplingParams
from verifier_svc.scheduler import VerifierOptions
from verifier_svc.verifier import UNSENT_FEATURES, VerifierCore

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def reference_features(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0]  # [len(ids), H]


def test_rounds_that_ask_for_no_features_keep_them_for_the_next_round_that_asks(tiny_dirs):
    loaded = load_model(tiny_dirs["llama"]["target"])
    core = VerifierCore(loaded, VerifierOptions(measure_pass_cost=False))
    try:
        committed, kept = core.prefill("v", PROMPT, SamplingParams(), 16, return_hidden=True)
        assert kept is None  # the prompt's features wait too
        quiet = core.verify("v", committed, [], None, return_hidden=False)
        assert quiet.hidden is None
        quiet = core.verify("v", quiet.committed_len, [1, 2], None, return_hidden=False)
        assert quiet.hidden is None
        asked = core.verify("v", quiet.committed_len, [], None, return_hidden=True)
        start, rows = asked.hidden
        ids = list(core.sessions.get("v").ids)
        # every committed position from the prompt's first, but the last (its token is not fed yet)
        assert start == 0 and rows.shape[0] == len(ids) - 1
        assert torch.allclose(rows, reference_features(loaded.model, ids)[:-1], atol=1e-5)
        again = core.verify("v", asked.committed_len, [], None, return_hidden=True)
        assert again.hidden[0] == len(ids) - 1 and again.hidden[1].shape[0] == 1  # nothing is sent twice

        core.prefill("w", PROMPT, SamplingParams(), 8)
        assert core.verify("w", len(PROMPT), [], None).hidden is None
        assert UNSENT_FEATURES not in core.sessions.get("w").extra  # it never asked: nothing is kept
    finally:
        core.close()

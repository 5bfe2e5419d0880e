"""HF assisted generation driving a feature-level (EAGLE) drafter: the bench's same-drafter HF row.

transformers' assisted decoding loop gives a candidate generator that sets
`requires_model_outputs` the target's outputs of the previous forward, as it
does for its own feature-reading drafters (MTP, Gemma 4 assistants). This one
reads their last hidden states, the features the drafter was trained on, and
drafts with `specdec.models.eagle.feed_rows` as specd's drafter service does, in the
same process as the target and without specd's kernel or services.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from itertools import islice

import torch
from transformers.generation.candidate_generator import CandidateGenerator

from specdec.compute.sessions import crop_cache
from specdec.models.accept_head import lm_head_inputs
from specdec.models.eagle import feed_rows, greedy_drafts


class EagleCandidateGenerator(CandidateGenerator):
    """Greedy drafts of `num_tokens` tokens per round from an EAGLE drafter, for one generate call."""

    requires_model_outputs = True
    model_kwargs_overrides = {"output_hidden_states": True}

    def __init__(self, drafter: torch.nn.Module, num_tokens: int, max_length: int):
        self.drafter, self.num_tokens, self.max_length = drafter, num_tokens, max_length
        self.features: torch.Tensor | None = None  # [n, H]: the target's features of committed positions 0..n-1
        self.cache = None
        self.true_rows = 0  # drafter KV rows [0, true_rows) were fed the target's features
        self.drafted = self.accepted = self.rounds = 0
        self.draft_s = 0.0

    def get_candidates(self, input_ids: torch.LongTensor, model_outputs=None, **kwargs):
        """input_ids [1, L] -> (candidates [1, L + k], draft logits [1, k, V]), or (input_ids, None)."""
        length = input_ids.shape[1]
        if model_outputs is not None:
            # The last forward fed positions known .. ; those up to L-2 are now committed.
            fed = lm_head_inputs(model_outputs)[0]  # [fed, H]
            known = 0 if self.features is None else self.features.shape[0]
            fresh = fed[: length - 1 - known]
            self.features = fresh if self.features is None else torch.cat([self.features, fresh])
        count = min(self.num_tokens, self.max_length - length - 1)
        if self.features is None or count <= 0:
            return input_ids, None  # the first round: the target's prompt forward brings the features
        started = time.perf_counter()
        ids = input_ids[0]
        if self.cache is not None:
            crop_cache(self.cache, self.true_rows)  # rows fed predicted features are recomputed
        # Row j reads (token j+1, feature j); the last row's logits are the first draft's.
        logits, predicted, self.cache = feed_rows(self.drafter, self.cache, ids[self.true_rows + 1:],
                                                  self.features[self.true_rows:], keep_logits=1)
        self.true_rows = length - 1
        drafts, draft_logits = zip(*islice(greedy_drafts(self.drafter, self.cache, logits, predicted), count))
        self.drafted += count
        self.rounds += 1
        self.draft_s += time.perf_counter() - started
        candidates = torch.cat([input_ids, torch.stack(drafts).view(1, -1)], dim=1)
        return candidates, torch.stack(draft_logits)[None]

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        """Counts what was accepted; the draft length stays fixed, as in the static specd rows it is compared with."""
        self.accepted += int(num_matches)


@contextmanager
def eagle_assisted(target: torch.nn.Module, drafter: torch.nn.Module, num_tokens: int):
    """Within the block, `target.generate(..., assistant_model=drafter)` drafts with `drafter` as an EAGLE
    drafter; yields the list of generators made, one per generate call (their counts are the acceptance)."""
    made: list[EagleCandidateGenerator] = []

    def candidate_generator(generation_config, **_):
        made.append(EagleCandidateGenerator(drafter, num_tokens, generation_config.max_length))
        return made[-1]

    target._get_candidate_generator = candidate_generator  # an instance attribute shadows the method
    try:
        yield made
    finally:
        del target._get_candidate_generator

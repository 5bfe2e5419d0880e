"""Prompt lookup in the coordinator: draft blocks copied from the request's own text, with no drafter call.

The coordinator holds every request's committed text, so a lookup draft costs it a dictionary probe,
where a drafter service would cost a Draft RPC and a step on the model thread each round, matched or
not. Drafts are certain (q is one-hot), so speculative sampling over them stays exact.
"""

from __future__ import annotations

from specdec.lookup import NgramIndex
from specdec.v1 import common_pb2, drafter_pb2

LOOKUP_VERSION = "lookup"


class LookupDrafts:
    def __init__(self, max_tokens: int, greedy: bool, ngram_max: int = 3, ngram_min: int = 2):
        self.max_tokens, self.greedy = max_tokens, greedy
        self.index = NgramIndex(ngram_max, ngram_min)

    def propose(self, committed: list[int], budget: int) -> list[int]:
        """Up to min(max_tokens, budget) tokens that followed the last earlier match of the text's tail."""
        if budget <= 0:
            return []
        self.index.extend(committed[len(self.index.ids):])  # committed text only grows
        return self.index.propose(min(self.max_tokens, budget))

    def block(self, tokens: list[int]) -> list[drafter_pb2.DraftToken]:
        return [drafter_pb2.DraftToken(
            token=token, confidence=1.0, accept_prob=1.0, drafter_version=LOOKUP_VERSION,
            probs=None if self.greedy else common_pb2.DraftProbs(indices=[token], probs=[1.0]))
            for token in tokens]

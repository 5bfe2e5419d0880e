"""Prompt lookup: where the text's last n-gram occurred before, the tokens that followed it are a draft.

Text that quotes its prompt (edits, extraction, code changes, RAG answers) repeats long spans, and a
lookup draft costs no model. `lookup_continuation` is the rule on one token; `NgramIndex` keeps every
n-gram's latest continuation as the text grows, so a proposal of k tokens costs O(ngram_max + k), not
a scan of the context.
"""

from __future__ import annotations


def lookup_continuation(ids: list[int], ngram_max: int, ngram_min: int) -> int | None:
    """The token that followed the most recent earlier match of ids' last n-gram, longest n first."""
    for n in range(min(ngram_max, len(ids) - 1), ngram_min - 1, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == tail:
                return ids[start + n]
    return None


class NgramIndex:
    """An append-only text and, for each n-gram of ngram_min..ngram_max tokens, where the token after
    its latest occurrence sits; `propose` follows the longest n-gram that ends the text."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 2):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.ids: list[int] = []
        self._follower: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence

    def extend(self, ids: list[int]) -> None:
        """Appends ids; each new position becomes the follower of the n-grams that end just before it."""
        text = self.ids
        for token in ids:
            position = len(text)
            for n in range(self.ngram_min, min(self.ngram_max, position) + 1):
                self._follower[tuple(text[position - n:position])] = position
            text.append(token)

    def propose(self, max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens that followed the latest earlier occurrence of the text's last n-gram
        (longest n first), stopping where the text ends; [] when the tail never occurred before."""
        text = self.ids
        for n in range(min(self.ngram_max, len(text) - 1), self.ngram_min - 1, -1):
            follower = self._follower.get(tuple(text[len(text) - n:]))
            if follower is not None:
                return text[follower:follower + max_tokens]
        return []

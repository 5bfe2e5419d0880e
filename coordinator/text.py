"""Incremental detokenisation with stop strings."""

from __future__ import annotations


class TextStream:
    """Turns committed token ids into text deltas, holding back partial characters
    and cutting the text at the first stop string."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.token_ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def _decode(self) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def push(self, token_ids: list[int]) -> tuple[list[int], str]:
        """Adds tokens; returns (tokens kept, text delta). After a stop string, nothing more is kept."""
        kept = []
        for token in token_ids:
            if self.stopped:
                break
            self.token_ids.append(token)
            kept.append(token)
            if self.stop_strings and self._stop_index(self._decode()) is not None:
                self.stopped = True
        text = self._decode()
        cut = self._stop_index(text)
        if cut is not None:
            text = text[:cut]
        elif text.endswith("\ufffd"):
            text = text[:-1]  # an incomplete UTF-8 sequence; wait for the next token
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text if text.startswith(self.emitted) else self.emitted + delta
        return kept, delta

    def _stop_index(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stop_strings if s in text]
        return min(hits) if hits else None

    @property
    def text(self) -> str:
        return self.emitted

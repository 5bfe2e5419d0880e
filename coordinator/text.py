"""Text in and out: prompts and chat messages into token ids, and incremental detokenisation with stop strings.

Both run on worker threads (tokenizers release the GIL), never on the coordinator's event loop."""

from __future__ import annotations

import re

from jinja2 import TemplateError

from specdec.errors import InvalidRequest

CHAT_ROLES = frozenset({"system", "user", "assistant"})
# Roles a chat template compares against, e.g. message['role'] == 'tool' or message.role == "ipython".
_TEMPLATE_ROLE = re.compile(r"""role['"]?\]?\s*[!=]=\s*['"]([^'"]{1,32})['"]""")


def template_roles(chat_template: str | None) -> frozenset[str]:
    """The roles a chat message may have: the usual three and any other the template names."""
    return CHAT_ROLES | frozenset(_TEMPLATE_ROLE.findall(chat_template or ""))


def longest_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes one token stands for, with one byte to spare for the word-start space a lone
    SentencePiece decode leaves out: a text of B bytes needs at least B / this many tokens."""
    pieces = tokenizer.batch_decode([[token] for token in range(len(tokenizer))])
    return max(len(piece.encode()) for piece in pieces) + 1


class PromptEncoder:
    """Token ids for a prompt or chat messages, as the target's tokenizer and chat template make them.
    What callers write stays text: special-token strings in it (say "<|im_end|>") are not turned into
    the special tokens, unless the caller asks for `raw` (or sends token ids, which bypass this)."""

    def __init__(self, tokenizer, max_context: int):
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.max_token_bytes = longest_token_bytes(tokenizer)
        self.roles = template_roles(tokenizer.chat_template)

    def check_fits(self, texts: list[str], max_new_tokens: int) -> None:
        """Refuses, without tokenising, text too long to fit the context whatever its tokens turn out to be."""
        room = max(self.max_context - max_new_tokens, 0)
        size = sum(len(text.encode()) for text in texts)
        if size > room * self.max_token_bytes:
            raise InvalidRequest(f"the prompt is {size} bytes: more than {room} tokens (the context of "
                                 f"{self.max_context} less max_new_tokens {max_new_tokens}) can hold, at most "
                                 f"{self.max_token_bytes} bytes a token")

    def encode_prompt(self, prompt: str, raw: bool, max_new_tokens: int) -> list[int]:
        if not prompt.strip():
            raise InvalidRequest("the prompt is empty")
        if not raw and self.tokenizer.chat_template:
            return self.encode_messages([("user", prompt)], False, max_new_tokens)
        self.check_fits([prompt], max_new_tokens)
        return self.tokenizer(prompt, add_special_tokens=True, split_special_tokens=not raw)["input_ids"]

    def encode_messages(self, messages: list[tuple[str, str]], raw: bool, max_new_tokens: int) -> list[int]:
        if not messages:
            raise InvalidRequest("messages is empty")
        unknown = sorted({role for role, _ in messages} - self.roles)
        if unknown:
            raise InvalidRequest(f"unknown message role {unknown[0][:32]!r}: the chat template takes "
                                 f"{', '.join(sorted(self.roles))}")
        self.check_fits([content for _, content in messages], max_new_tokens)
        chat = [{"role": role, "content": content} for role, content in messages]
        try:
            encoded = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True, sanitize_control_tokens=not raw)
        except (TemplateError, ValueError) as err:  # the template's own checks (say, roles must alternate)
            raise InvalidRequest(f"the chat template refused the messages: {err}") from None
        return list(encoded["input_ids"])


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

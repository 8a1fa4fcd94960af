"""Incremental detokenization: turn one new token at a time into new text.

Decoding a token alone is wrong for byte-level and sentencepiece vocabularies (a character
can span tokens; a leading space depends on the previous token), and decoding the whole
output every step is quadratic. So each step decodes a short window: the tokens since the
last emitted text plus a few before them for context, and emits only text that is
complete (no trailing U+FFFD from a partial UTF-8 sequence).
"""

from __future__ import annotations

from typing import Protocol

_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Accumulates a sequence's output text, token by token; special tokens are left out
    of it when `skip_special_tokens`."""

    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""

    def append(self, token_id: int) -> str:
        """Add one token; return the text it completed (possibly empty), also kept in `text`."""
        self.token_ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of the sequence: emit held-back text even if it is not valid UTF-8."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        skip = self.skip_special_tokens
        prefix = self.tokenizer.decode(self.token_ids[self.prefix_offset:self.read_offset],
                                       skip_special_tokens=skip)
        full = self.tokenizer.decode(self.token_ids[self.prefix_offset:], skip_special_tokens=skip)
        if len(full) <= len(prefix) or (full.endswith(_INCOMPLETE) and not final):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.text += delta
        return delta

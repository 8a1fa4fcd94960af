"""Text <-> token ids, from a model directory's tokenizer.json (Hugging Face `tokenizers`).

A checkpoint without tokenizer.json can still be served, but then prompts must be token-id
lists and outputs carry token ids only (their text stays empty).
"""

from __future__ import annotations

import os

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """Thin wrapper so the engine depends on two calls, not on a library's whole API."""

    def __init__(self, tokenizer: _HFTokenizer) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def from_model_dir(cls, model_dir: str) -> "Tokenizer | None":
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(path):
            return None
        return cls(_HFTokenizer.from_file(path))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

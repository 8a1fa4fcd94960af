"""Text <-> token ids, from a model directory's tokenizer.json (Hugging Face `tokenizers`).

A checkpoint without tokenizer.json can still be served, but then prompts must be token-id
lists and outputs carry token ids only (their text stays empty). The chat template, if
any, comes from tokenizer_config.json ("chat_template") or chat_template.jinja.
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat

from tokenizers import Tokenizer as _HFTokenizer

from shardline.engine.chat_template import Message, render_chat
from shardline.presets import byte_level_alphabet


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")   # SentencePiece's byte tokens
_BYTE_OF_CHAR = {char: byte for byte, char in byte_level_alphabet().items()}


def read_text_file(path: str) -> str | None:
    """The UTF-8 text of the file `path`, None if there is none; a ValueError if `path` is
    something else (a directory, or a FIFO, whose open would block forever) or not UTF-8,
    a PermissionError if this user cannot read it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ValueError(f"{path} is {kind}: expected a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except PermissionError:
        raise PermissionError(f"{path} cannot be read by this user (mode "
                              f"{stat.S_IMODE(mode):o})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: byte {data[exc.start]:#04x} at offset "
                         f"{exc.start}") from None


class Tokenizer:
    """Thin wrapper so the engine depends on a few calls, not on a library's whole API."""

    def __init__(self, tokenizer: _HFTokenizer, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None) -> None:
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}

    @classmethod
    def from_model_dir(cls, model_dir: str) -> "Tokenizer | None":
        """The tokenizer of `model_dir`, None if it has no tokenizer.json; a ValueError
        (PermissionError for one the user cannot read) naming the file that cannot be used."""
        path = os.path.join(model_dir, "tokenizer.json")
        text = read_text_file(path)
        if text is None:
            return None
        try:
            tokenizer = _HFTokenizer.from_str(text)
        except Exception as exc:   # the tokenizers package raises a bare Exception
            raise ValueError(f"{path} cannot be loaded by the tokenizers package ({exc}): "
                             "expected a Hugging Face tokenizer.json, the JSON object "
                             "tokenizers' Tokenizer.save writes") from None
        config_path = os.path.join(model_dir, "tokenizer_config.json")
        config = {}
        config_text = read_text_file(config_path)
        if config_text is not None:
            try:
                config = json.loads(config_text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_path} holds a JSON {type(config).__name__}: "
                                 "expected an object")
        template = config.get("chat_template")
        if isinstance(template, list):   # named templates: the default one serves chat
            template = next((t["template"] for t in template if t.get("name") == "default"),
                            None)
        if template is None:
            template = read_text_file(os.path.join(model_dir, "chat_template.jinja"))
        special = {k: v for k, v in config.items()
                   if k in ("bos_token", "eos_token") and isinstance(v, str)}
        return cls(tokenizer, template, special)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor
        adds (e.g. a BOS), which a rendered chat template already holds."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for, which its decoded text can hide: a token
        holding part of a multi-byte character decodes to U+FFFD alone. Exact for
        byte-level BPE and SentencePiece byte tokens; other tokens give their text's bytes."""
        piece = self._tokenizer.id_to_token(token_id)
        if piece is not None and self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        if piece is not None and (byte := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(byte.group(1), 16)])
        return self.decode([token_id], skip_special_tokens=False).encode()

    @functools.cached_property
    def _byte_level(self) -> bool:
        """Whether tokens are spelled in byte_level_alphabet (GPT-2 style byte-level BPE)."""
        decoder = json.loads(self._tokenizer.to_str()).get("decoder") or {}
        kinds = [d.get("type") for d in decoder.get("decoders", [decoder])]
        return "ByteLevel" in kinds

    def apply_chat_template(self, messages: list[Message],
                            add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation; ValueError if the model has no chat template."""
        if self.chat_template is None:
            raise ValueError("the model has no chat template (tokenizer_config.json has no "
                             "chat_template): use generate() with a plain prompt")
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           **self.special_tokens)

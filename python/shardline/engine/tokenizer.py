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
import reprlib
import stat

from tokenizers import Tokenizer as _HFTokenizer

from shardline.engine.chat_template import Message, render_chat
from shardline.presets import byte_level_alphabet


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")   # SentencePiece's byte tokens
_BYTE_OF_CHAR = {char: byte for byte, char in byte_level_alphabet().items()}


def read_text_file(path: str) -> str | None:
    """The UTF-8 text of the file `path`, None if there is none; a ValueError if `path` is
    something else (a directory, a FIFO, whose open would block forever, or a link to
    nothing, as a Hugging Face cache leaves when its blobs are deleted) or not UTF-8, a
    PermissionError if this user cannot read it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise ValueError(f"{path} is a symbolic link to {os.readlink(path)!r}, which does "
                             "not exist: expected a file") from None
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


def read_tokenizer_config(path: str) -> dict:
    """The JSON object in tokenizer_config.json at `path` ({} if there is none)."""
    text = read_text_file(path)
    if text is None:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}: expected an object")
    return config


def default_chat_template(template: object, config_path: str) -> str | None:
    """The template that serves chat, of tokenizer_config.json's "chat_template": a string,
    or a list of named templates, of which the one named "default" (None if none is)."""
    if isinstance(template, str):
        return template
    if not isinstance(template, list):
        raise ValueError(f"{config_path}: chat_template={reprlib.repr(template)} is invalid: "
                         'expected a Jinja template string or a list of {"name": ..., '
                         '"template": ...} objects')
    for i, named in enumerate(template):
        if not (isinstance(named, dict) and isinstance(named.get("name"), str)
                and isinstance(named.get("template"), str)):
            raise ValueError(f"{config_path}: chat_template[{i}]={reprlib.repr(named)} is "
                             'invalid: expected a {"name": ..., "template": ...} object of '
                             "strings")
    return next((named["template"] for named in template if named["name"] == "default"), None)


def special_tokens(config: dict, config_path: str, tokenizer: _HFTokenizer) -> dict[str, str]:
    """tokenizer_config.json's bos_token and eos_token (given as a string, or as an
    AddedToken object holding it in "content"), which chat templates write into prompts;
    each must be a token of the vocabulary, or the template's text would be split into
    other tokens."""
    tokens = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        token = value.get("content") if isinstance(value, dict) else value
        if value is None:
            continue
        if not isinstance(token, str):
            raise ValueError(f"{config_path}: {key}={reprlib.repr(value)} is invalid: expected "
                             'a token string or an object {"content": token, ...}')
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"{config_path}: {key}={token!r} is not a token of the "
                             "vocabulary of tokenizer.json beside it: expected one of its "
                             "tokens")
        tokens[key] = token
    return tokens


def check_added_token_ids(tokenizer: _HFTokenizer, spec: dict, path: str) -> None:
    """Refuse an added token whose id in tokenizer.json is not the id the tokenizers package
    gives it: one beyond the vocabulary or in use is renumbered silently, so the model
    would see ids the checkpoint's author did not mean."""
    for entry in spec.get("added_tokens") or []:
        given = tokenizer.token_to_id(entry["content"])
        if given != entry["id"]:
            raise ValueError(f"{path}: added token {entry['content']!r} has id {entry['id']}, "
                             f"but the tokenizers package numbers it {given} (a vocabulary "
                             f"of {tokenizer.get_vocab_size(with_added_tokens=False)} tokens): "
                             "expected each added token's id to be the next free one or its "
                             "id in the vocabulary")


class Tokenizer:
    """Thin wrapper so the engine depends on a few calls, not on a library's whole API."""

    def __init__(self, tokenizer: _HFTokenizer, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None,
                 chat_template_source: str | None = None) -> None:
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}
        self.chat_template_source = chat_template_source   # the file, for errors

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
        check_added_token_ids(tokenizer, json.loads(text), path)
        config_path = os.path.join(model_dir, "tokenizer_config.json")
        config = read_tokenizer_config(config_path)
        template, source = None, config_path
        if config.get("chat_template") is not None:
            template = default_chat_template(config["chat_template"], config_path)
        if template is None:
            source = os.path.join(model_dir, "chat_template.jinja")
            template = read_text_file(source)
        return cls(tokenizer, template, special_tokens(config, config_path, tokenizer), source)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor
        adds (e.g. a BOS), which a rendered chat template already holds."""
        # encode_batch releases the GIL while it works and encode does not: a long prompt
        # tokenized on the server's worker thread stalled every stream for seconds.
        return self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

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

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The prompt text of a conversation, given `tools` (their definitions, for a
        template that reads them: see render_chat); ValueError if the model has no chat
        template."""
        if self.chat_template is None:
            raise ValueError("the model has no chat template (tokenizer_config.json has no "
                             "chat_template): use generate() with a plain prompt")
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           self.chat_template_source, tools, **self.special_tokens)

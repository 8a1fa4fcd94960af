"""Tokenizer.from_model_dir: the files a tokenizer is read from, refused by name when they
cannot be used. Tokenizer.token_bytes: the bytes behind each token, which its text can hide
(a token holding part of a multi-byte character decodes to U+FFFD alone)."""

import os
import random
import re
import shutil

import pytest

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from shardline import LLM
from shardline.engine.tokenizer import Tokenizer
from shardline.presets import byte_tokenizer, resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_copy(target) -> str:
    """tiny-llama's directory at `target`: its tokenizer files copied (to be broken), the
    rest linked."""
    source = resolve_model("tiny-llama")
    for name in os.listdir(source):
        if name in TOKENIZER_FILES:
            shutil.copy(os.path.join(source, name), target / name)
        else:
            os.symlink(os.path.join(source, name), target / name)
    return str(target)


def cut_short(path, rng: random.Random) -> None:
    """The file at `path` cut at a random byte (its JSON then never parses)."""
    data = path.read_bytes()
    path.write_bytes(data[:rng.randrange(len(data) - 1)])


@pytest.mark.parametrize("name", TOKENIZER_FILES)
def test_a_tokenizer_file_that_is_not_json_is_named(name, tmp_path, rng):
    """tokenizer.json raised the tokenizers package's bare Exception ('EOF while parsing a
    string at line 259 column 9', exit 1 from the command line), tokenizer_config.json a
    bare JSONDecodeError; neither named the file."""
    model_copy(tmp_path)
    cut_short(tmp_path / name, rng)
    path = re.escape(str(tmp_path / name))
    expected = {"tokenizer.json": f"{path} cannot be loaded by the tokenizers package "
                                  r"\(.* at line \d+ column \d+\): expected a Hugging Face "
                                  "tokenizer.json",
                "tokenizer_config.json": f"{path} is not valid JSON: "}[name]
    with pytest.raises(ValueError, match=expected):
        LLM(str(tmp_path), device="cpu")


@pytest.mark.parametrize("content", ["[]", '"text"', "3"])
def test_a_tokenizer_config_that_is_not_an_object_is_named(content, tmp_path):
    """It raised AttributeError ("'list' object has no attribute 'get'")."""
    model_copy(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'tokenizer_config.json'} holds a JSON {type(eval(content)).__name__}"
            ": expected an object")):
        Tokenizer.from_model_dir(str(tmp_path))


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", [*TOKENIZER_FILES, "chat_template.jinja"])
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_tokenizer_file_that_is_not_a_file_is_named(name, kind, tmp_path):
    """A FIFO named tokenizer.json blocked LLM(path) forever in its open; a directory raised
    'Is a directory (os error 21)' naming no path, or was taken for no tokenizer_config.json
    or chat_template.jinja at all."""
    model_copy(tmp_path)
    path = tmp_path / name
    if path.exists():
        path.unlink()
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    found = "a directory" if kind == "directory" else "not a regular file"
    with pytest.raises(ValueError, match=re.escape(f"{path} is {found}: expected a file")):
        Tokenizer.from_model_dir(str(tmp_path))


def test_a_chat_template_file_that_is_not_utf8_is_named(tmp_path, rng):
    """It raised a bare UnicodeDecodeError."""
    model_copy(tmp_path)
    prefix = "{{ messages }}" * rng.randint(0, 5)
    (tmp_path / "chat_template.jinja").write_bytes(prefix.encode() + b"\xff{{")
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'chat_template.jinja'} is not UTF-8 text: byte 0xff at offset "
            f"{len(prefix)}")):
        Tokenizer.from_model_dir(str(tmp_path))


def test_a_tokenizer_json_this_user_cannot_read_is_named(tmp_path):
    """It was the tokenizers package's 'Permission denied (os error 13)', naming no file.
    (A user whose privileges read any file, such as root, cannot meet this error.)"""
    model_copy(tmp_path)
    path = tmp_path / "tokenizer.json"
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("this user reads a file of mode 000")
    with pytest.raises(PermissionError, match=re.escape(
            f"{path} cannot be read by this user (mode 0)")):
        LLM(str(tmp_path), device="cpu")


def random_text(rng: random.Random) -> str:
    """ASCII mixed with 2-, 3- and 4-byte characters."""
    pools = ["abc xyz", "éüßñ", "中文字节", "🙂🚀"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 24)))


def byte_fallback_tokenizer() -> Tokenizer:
    """SentencePiece-style BPE: no pieces but the ASCII letters and '▁', every other
    character spelled as its UTF-8 bytes <0xNN>."""
    pieces = (["<unk>", "▁"] + [f"<0x{b:02X}>" for b in range(256)]
              + [chr(c) for c in range(ord("a"), ord("z") + 1)])
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>",
                                       byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    return Tokenizer(tokenizer)


def test_byte_level_tokens_give_back_the_text_bytes(rng):
    tokenizer = Tokenizer(byte_tokenizer())
    for _ in range(20):
        text = random_text(rng)
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(tokenizer.token_bytes(t) for t in ids) == text.encode()
        assert any(tokenizer.decode([t]) == "\ufffd" for t in ids) == (len(text.encode())
                                                                       > len(text))


def test_byte_fallback_tokens_give_their_byte(rng):
    tokenizer = byte_fallback_tokenizer()
    for _ in range(20):
        text = random_text(rng).replace(" ", "")
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(tokenizer.token_bytes(t) for t in ids) == text.encode()

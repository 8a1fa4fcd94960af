"""Tokenizer.from_model_dir: the files a tokenizer is read from, refused by name when they
cannot be used. Tokenizer.token_bytes: the bytes behind each token, which its text can hide
(a token holding part of a multi-byte character decodes to U+FFFD alone)."""

import json
import os
import random
import re
import shutil
import threading
import time

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
    """The file at `path` cut at a random character (its JSON then never parses). At a
    character, not a byte: a cut inside a UTF-8 sequence makes the file no text at all,
    which is refused as such, before any JSON is read."""
    text = path.read_text(encoding="utf-8")
    path.write_text(text[:rng.randrange(len(text) - 1)], encoding="utf-8")


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


@pytest.mark.parametrize("name", [*TOKENIZER_FILES, "chat_template.jinja"])
def test_a_tokenizer_file_linked_to_nothing_is_named(name, tmp_path, rng):
    """A link whose target is gone (a Hugging Face cache whose blobs were deleted) was taken
    for no file: a model without tokenizer ('the model has no tokenizer.json: pass token
    ids'), without tokenizer_config.json or without chat template."""
    model_copy(tmp_path)
    path = tmp_path / name
    if path.exists():
        path.unlink()
    target = str(tmp_path / "blobs" / f"{rng.getrandbits(64):016x}")
    os.symlink(target, path)
    with pytest.raises(ValueError, match=re.escape(
            f"{path} is a symbolic link to {target!r}, which does not exist: expected a file")):
        LLM(str(tmp_path), device="cpu")


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


def write_tokenizer_config(model_dir: str, **fields: object) -> None:
    """tiny-llama's tokenizer_config.json with `fields` set."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **fields}, f)


@pytest.mark.parametrize("template, found", [
    (5, "chat_template=5 is invalid: expected a Jinja template string or a list"),
    ({"default": "{{ x }}"}, "chat_template={'default': '{{ x }}'} is invalid: expected"),
    (["{{ x }}"], "chat_template[0]='{{ x }}' is invalid: expected a {\"name\": ..., "),
    ([{"name": "default"}], "chat_template[0]={'name': 'default'} is invalid: expected"),
    ([{"name": "tool_use", "template": 3}], "chat_template[0]={'name': 'tool_use', 'template': "
                                            "3} is invalid"),
])
def test_a_chat_template_of_the_wrong_type_is_named(template, found, tmp_path):
    """A number loaded, then raised TypeError ("Can't compile non template nodes") at each
    chat; a malformed named template raised KeyError or AttributeError at load."""
    write_tokenizer_config(model_copy(tmp_path), chat_template=template)
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'tokenizer_config.json'}: {found}")):
        LLM(str(tmp_path), device="cpu")


def test_named_templates_without_a_default_leave_chat_template_jinja(tmp_path, rng):
    jinja = "{{ messages[0].content }}" * rng.randint(1, 3)
    write_tokenizer_config(model_copy(tmp_path),
                           chat_template=[{"name": "tool_use", "template": "{{ tools }}"}])
    (tmp_path / "chat_template.jinja").write_text(jinja)
    tokenizer = Tokenizer.from_model_dir(str(tmp_path))
    assert tokenizer.chat_template == jinja
    assert tokenizer.chat_template_source == str(tmp_path / "chat_template.jinja")


@pytest.mark.parametrize("key", ["bos_token", "eos_token"])
def test_special_tokens_written_as_added_tokens_reach_the_template(key, tmp_path, rng):
    """Older checkpoints (Llama 2, Mistral) write {"content": "<s>", "__type": "AddedToken",
    ...}; it was dropped, so a template's {{ bos_token }} rendered as nothing."""
    token = rng.choice(["<s>", "</s>", "<pad>"])
    write_tokenizer_config(model_copy(tmp_path), **{key: {
        "__type": "AddedToken", "content": token, "lstrip": False, "normalized": False,
        "rstrip": False, "single_word": False}}, chat_template=f"{{{{ {key} }}}}|")
    tokenizer = Tokenizer.from_model_dir(str(tmp_path))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == f"{token}|"


@pytest.mark.parametrize("key", ["bos_token", "eos_token"])
def test_a_special_token_outside_the_vocabulary_is_named(key, tmp_path, rng):
    """It loaded, and a template wrote it as text, which was tokenized into other tokens."""
    token = f"<|{''.join(rng.choices('abcdefgh', k=6))}|>"
    value = rng.choice([token, {"content": token}])
    write_tokenizer_config(model_copy(tmp_path), **{key: value})
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'tokenizer_config.json'}: {key}={token!r} is not a token of the "
            "vocabulary of tokenizer.json beside it")):
        LLM(str(tmp_path), device="cpu")


@pytest.mark.parametrize("value", [3, {"id": 1}, ["<s>"]])
def test_a_special_token_that_is_no_string_is_named(value, tmp_path):
    write_tokenizer_config(model_copy(tmp_path), bos_token=value)
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'tokenizer_config.json'}: bos_token={value!r} is invalid: expected a "
            "token string")):
        Tokenizer.from_model_dir(str(tmp_path))


def test_an_added_token_numbered_outside_the_vocabulary_is_named(tmp_path, rng):
    """The tokenizers package renumbers an added token whose id is beyond the vocabulary
    (here 259, the next free id), so prompts held ids the checkpoint did not mean."""
    model_copy(tmp_path)
    path = tmp_path / "tokenizer.json"
    spec = json.loads(path.read_text())
    size = len(spec["model"]["vocab"])
    token_id = rng.randrange(size + 1, 4 * size)
    spec["added_tokens"].append({"id": token_id, "content": "<|tool|>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False,
                                 "special": True})
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: added token '<|tool|>' has id {token_id}, but the tokenizers package "
            f"numbers it {size} (a vocabulary of {size} tokens)")):
        LLM(str(tmp_path), device="cpu")
    spec["added_tokens"][-1]["id"] = size
    path.write_text(json.dumps(spec))
    assert Tokenizer.from_model_dir(str(tmp_path)).encode("<|tool|>") == [size]


def test_a_long_text_is_encoded_while_other_threads_run(rng):
    """The server tokenizes a prompt on a worker thread; holding the GIL through a long
    text's encoding stalled its event loop, and every stream, for seconds."""
    tokenizer = Tokenizer(byte_tokenizer())
    text = "".join(rng.choice("abc xyz.\n") for _ in range(200_000))
    ticks, done = [], threading.Event()

    def tick() -> None:
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        began = time.perf_counter()
        ids = tokenizer.encode(text, add_special_tokens=False)
        ended = time.perf_counter()
    finally:
        done.set()
        ticker.join()
    assert ids == byte_tokenizer().encode(text, add_special_tokens=False).ids
    quarter = (ended - began) / 4
    assert sum(began + quarter < t < ended - quarter for t in ticks) >= 5

"""Incremental detokenization equals decoding the whole output at once."""

import random

from shardline.engine.detokenizer import IncrementalDetokenizer
from shardline.engine.tokenizer import Tokenizer
from shardline.presets import byte_tokenizer

ALPHABET = "abc xyz.,!é漢字ö🙂\n"


def test_streamed_text_equals_full_decode_for_multibyte_text():
    tokenizer = Tokenizer(byte_tokenizer())
    rng = random.Random()
    for _ in range(20):
        prompt = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 10)))
        output = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30)))
        prompt_ids = tokenizer.encode(prompt)
        output_ids = tokenizer.encode(output)
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        deltas = [detokenizer.append(t) for t in output_ids]
        assert "".join(deltas) == detokenizer.text == tokenizer.decode(output_ids) == output
        assert not any("\ufffd" in d for d in deltas)


def test_incomplete_character_is_held_back_until_complete():
    tokenizer = Tokenizer(byte_tokenizer())
    ids = tokenizer.encode("🙂")
    assert len(ids) == 4
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("hi"))
    assert [detokenizer.append(t) for t in ids] == ["", "", "", "🙂"]


def test_flush_emits_an_unfinished_character_at_the_end():
    tokenizer = Tokenizer(byte_tokenizer())
    partial = tokenizer.encode("ok🙂")[:4]
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("hi"))
    assert "".join(detokenizer.append(t) for t in partial) == "ok"
    assert detokenizer.flush() == tokenizer.decode(partial)[2:] != ""
    assert detokenizer.text == tokenizer.decode(partial)

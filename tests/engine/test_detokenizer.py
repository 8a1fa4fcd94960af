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


def test_streamed_text_equals_full_decode_for_any_token_ids(rng):
    """Outputs cut inside a character, or of random byte tokens (invalid UTF-8): the
    streamed text plus the final flush is exactly the whole output decoded at once."""
    tokenizer = Tokenizer(byte_tokenizer())
    for _ in range(200):
        prompt_ids = tokenizer.encode("".join(rng.choice(ALPHABET)
                                              for _ in range(rng.randint(1, 6))))
        output_ids = tokenizer.encode("".join(rng.choice(ALPHABET)
                                              for _ in range(rng.randint(1, 12))))
        output_ids = output_ids[:rng.randint(1, len(output_ids))]
        if rng.random() < 0.5:
            output_ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 12))]
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        streamed = "".join(detokenizer.append(t) for t in output_ids) + detokenizer.flush()
        assert streamed == detokenizer.text == tokenizer.decode(output_ids), output_ids

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


class CountingTokenizer(Tokenizer):
    """The byte tokenizer, recording the longest window of tokens it was asked to decode."""

    longest = 0

    def decode(self, token_ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(token_ids))
        return super().decode(token_ids, skip_special_tokens)


def test_bytes_that_never_complete_a_character_are_emitted_as_they_come(rng):
    """A long run of lone UTF-8 lead bytes (as allowed_token_ids can force) always decodes
    to a trailing U+FFFD: the text is not held back to the end, and each step decodes a
    window of a few tokens, not the whole run (which made every step slower by the run's
    length: 1.6 ms at 8000 tokens)."""
    tokenizer = CountingTokenizer(byte_tokenizer())
    leads = [t for t in range(tokenizer.vocab_size)
             if tokenizer.decode([t]) == "\ufffd"
             and tokenizer.decode([t] + tokenizer.encode("\u00e9")[1:]) != "\ufffd" * 2]
    assert leads   # bytes that begin a character (the 2nd byte of é does not)
    run = [rng.choice(leads) for _ in range(rng.randint(200, 400))]
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("hi"))
    streamed = "".join(detokenizer.append(t) for t in run)
    assert len(streamed) >= len(run) - 12 and tokenizer.longest <= 20
    streamed += detokenizer.flush()
    assert streamed == tokenizer.decode(run)


def test_long_runs_of_mixed_bytes_stream_exactly_the_whole_decode(rng):
    """Characters of 1 to 4 bytes, lone lead and continuation bytes in long runs: the text
    let out early (see the test above) is never one a later byte changes."""
    tokenizer = Tokenizer(byte_tokenizer())
    pieces = [tokenizer.encode(c) for c in ALPHABET]
    bad = [tokenizer.encode(c)[i] for c in "é漢🙂" for i in range(1, len(c.encode()))]
    for _ in range(50):
        output_ids = []
        while len(output_ids) < rng.randint(20, 120):
            if rng.random() < 0.4:
                output_ids += rng.choice(pieces)[:rng.randint(1, 4)]
            else:
                output_ids.append(rng.choice(bad) if rng.random() < 0.5
                                  else rng.randrange(tokenizer.vocab_size))
        detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("ab"))
        streamed = "".join(detokenizer.append(t) for t in output_ids) + detokenizer.flush()
        assert streamed == detokenizer.text == tokenizer.decode(output_ids), output_ids

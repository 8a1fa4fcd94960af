"""Tokenizer.token_bytes: the bytes behind each token, which its text can hide (a token
holding part of a multi-byte character decodes to U+FFFD alone)."""

import random

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from shardline.engine.tokenizer import Tokenizer
from shardline.presets import byte_tokenizer


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

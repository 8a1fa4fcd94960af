"""The output processor on random token streams and random stop strings: streamed text is
never taken back, it holds back exactly what could still begin a stop string, and the
final text is the decoded output cut before the earliest stop string."""

from __future__ import annotations

import random

import pytest

from fake_model import PieceTokenizer
from shardline.engine.output_processor import OutputProcessor, RequestState
from shardline.engine.sequence import Sequence
from shardline.engine.tokenizer import Tokenizer
from shardline.presets import byte_tokenizer
from shardline.sampling_params import SamplingParams

NUM_CASES = 300
EOS = 0
# Multi-byte characters, so the detokenizer also holds back incomplete ones.
BYTE_ALPHABET = "ab é漢🙂"


class Retirer:
    """The scheduler's part the output processor uses: retiring a finished sequence."""

    def finish(self, seq: Sequence, status) -> None:
        seq.status = status


def random_stops(rng: random.Random, alphabet: str) -> list[str]:
    """One to three stop strings, often sharing letters, so they overlap and nest."""
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
            for _ in range(rng.randint(1, 3))]


def random_case(rng: random.Random):
    """A tokenizer, the params, and one random token stream per sequence (longer than any
    run needs: the sequence stops before it ends)."""
    n = rng.choice([1, 1, 2, 3])
    if rng.random() < 0.7:
        tokenizer = PieceTokenizer()
        stops = random_stops(rng, "abc")
        streams = [[rng.randrange(2 * len(PieceTokenizer.PIECES)) for _ in range(40)]
                   for _ in range(n)]
    else:
        tokenizer = Tokenizer(byte_tokenizer())
        stops = random_stops(rng, BYTE_ALPHABET)
        streams = [tokenizer.encode("".join(rng.choice(BYTE_ALPHABET) for _ in range(40)))
                   for _ in range(n)]
    params = SamplingParams(
        n=n, max_tokens=rng.choice([None, *range(1, 30)]), stop=stops,
        stop_token_ids=[rng.randrange(1, 12)] if rng.random() < 0.3 else [],
        ignore_eos=rng.random() < 0.5)
    return tokenizer, params, streams


def held_from(text: str, stops: list[str]) -> int:
    """Where the text that could still begin a stop string starts, by brute force."""
    return next((i for i in range(len(text)) if any(s.startswith(text[i:]) for s in stops)),
                len(text))


def run(tokenizer, params: SamplingParams, streams: list[list[int]]):
    """Feed each sequence its stream one token per step until every one finishes; each
    sequence's outputs, and the tokens it took."""
    prompt = [1, 2, 3]
    seqs = [Sequence(f"r#{i}", "r", i, prompt, params, 0, len(prompt) + len(streams[i]))
            for i in range(params.n)]
    processor = OutputProcessor(Retirer(), [EOS])
    processor.add(RequestState("r", None, prompt, seqs, tokenizer))
    streamed: list[list] = [[] for _ in seqs]
    while not all(seq.finished for seq in seqs):
        stepped = [seq for seq in seqs if not seq.finished]
        for seq in stepped:
            seq.append_output(streams[seq.index][seq.num_output_tokens], None)
        (output,) = processor.process(stepped)
        for completion in output.outputs:
            if completion.index in [seq.index for seq in stepped]:
                streamed[completion.index].append(completion)
    assert not processor.requests
    return streamed, [seq.output_token_ids for seq in seqs]


@pytest.mark.parametrize("case", range(NUM_CASES))
def test_streamed_text_is_never_taken_back_and_holds_back_only_a_stop_prefix(case, fresh_seed):
    rng = random.Random(f"{fresh_seed}-{case}")
    tokenizer, params, streams = random_case(rng)
    streamed, taken = run(tokenizer, params, streams)
    ends = set(params.stop_token_ids) | (set() if params.ignore_eos else {EOS})
    for completions, token_ids in zip(streamed, taken):
        final = completions[-1]
        assert final.finished and not any(c.finished for c in completions[:-1])
        by_token = token_ids[-1] in ends
        full = tokenizer.decode(token_ids[:-1] if by_token else token_ids)
        hits = [full.find(s) for s in params.stop if s in full]
        # Exactly today's final text: nothing is held back once the sequence finishes.
        assert final.text == full[:min(hits, default=len(full))], (params.stop, full)
        for before, after in zip(completions, completions[1:]):
            assert after.text.startswith(before.text), (params.stop, before.text, after.text)
        for completion in completions[:-1]:
            assert final.text.startswith(completion.text)
            so_far = tokenizer.decode(list(completion.token_ids)).rstrip("\ufffd")
            # Held back: the longest end that begins a stop string, and nothing more.
            assert completion.text == so_far[:held_from(so_far, params.stop)], (
                params.stop, so_far, completion.text)
            assert list(completion.token_ids) == token_ids[:len(completion.token_ids)]


@pytest.mark.parametrize("case", range(50))
def test_stop_strings_do_not_end_a_sequence_short_of_min_tokens(case, fresh_seed):
    """One byte a token: a stop string that ends before token min_tokens is passed over, and
    the sequence stops at the first token from min_tokens on that completes one."""
    rng = random.Random(f"{fresh_seed}-{case}")
    tokenizer = Tokenizer(byte_tokenizer())
    text = "".join(rng.choice("ab") for _ in range(40))
    min_tokens = rng.randint(3, 20)
    end = rng.randint(1, min_tokens - 1)
    stops = [text[rng.randint(0, end - 1):end], *random_stops(rng, "ab")]
    params = SamplingParams(stop=stops, min_tokens=min_tokens, max_tokens=40)
    streamed, (taken,) = run(tokenizer, params, [tokenizer.encode(text)])
    stop_at = next((t for t in range(min_tokens, 41)
                    if any(text[:t].endswith(s) for s in stops)), None)
    final = streamed[0][-1]
    if stop_at is None:
        assert (final.finish_reason, final.text) == ("length", text)
        return
    cut = min(stop_at - len(s) for s in stops if text[:stop_at].endswith(s))
    assert len(taken) == stop_at >= min_tokens
    assert (final.finish_reason, final.text) == ("stop", text[:cut])
    assert final.stop_reason in stops and text[:stop_at].endswith(final.stop_reason)


class ScanCountingList(list):
    """A list that counts the scans `in` makes of it."""

    scans = 0

    def __contains__(self, item) -> bool:
        ScanCountingList.scans += 1
        return super().__contains__(item)


def test_stop_token_ids_are_looked_up_without_scanning_the_list(rng):
    """They may number a vocabulary (150k ids: about 1.5 ms a sequence a step to scan), and
    each step looked every sequence's new token up in the list, once or twice. The request
    now keeps them as a set, made when it is added; the tokens still stop it."""
    tokenizer = Tokenizer(byte_tokenizer())
    stream = [rng.randrange(100, 200) for _ in range(30)]
    stop_at = rng.randrange(5, 30)
    stream[stop_at] = rng.randrange(200, 300)   # the first token among the stop ids
    ids = [t for t in range(300) if t not in stream[:stop_at]]
    params = SamplingParams(stop_token_ids=ids, max_tokens=40, ignore_eos=True)
    params.stop_token_ids = ScanCountingList(params.stop_token_ids)
    ScanCountingList.scans = 0
    streamed, (taken,) = run(tokenizer, params, [stream])
    assert ScanCountingList.scans == 0
    assert taken == stream[:stop_at + 1]
    assert (streamed[0][-1].finish_reason, streamed[0][-1].stop_reason) == ("stop", taken[-1])

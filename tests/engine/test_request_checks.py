"""The checks a request passes before the engine takes it (engine/request_checks.py); the
engine's own refusals, end to end, are in test_llm_engine_refusals.py."""

import pytest

from shardline.engine.request_checks import check_logprobs, token_ids
from shardline.sampling_params import SamplingParams


@pytest.mark.parametrize("values, message", [
    ([5, True], r"ids\[1\]=True is not a token id: token ids are integers, not bools"),
    (b"\x05", r"ids=b'\\x05' \(bytes\) is not a list of token ids"),
    ({5, 6}, r"ids=\{5, 6\} \(set\) is not a list of token ids"),
    ("56", r"ids='56' \(str\) is not a list of token ids"),
    ([5, 1.0], r"ids\[1\]=1.0 is not a token id: token ids are integers"),
])
def test_token_ids_accept_only_sequences_of_integers(values, message, rng):
    vocab = rng.randint(7, 1000)
    with pytest.raises(ValueError, match=message):
        token_ids(values, "ids", vocab)
    ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
    assert token_ids(tuple(ids), "ids", vocab) == ids
    with pytest.raises(ValueError, match=rf"ids\[{len(ids)}\]={vocab} is outside the "
                                         rf"vocabulary \[0, {vocab}\)"):
        token_ids(ids + [vocab], "ids", vocab)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_are_bounded_by_max_logprobs_and_the_vocabulary(field, rng):
    vocab, limit = rng.randint(50, 1000), rng.randint(0, 40)
    check_logprobs(SamplingParams(**{field: limit}), vocab, limit)
    with pytest.raises(ValueError, match=rf"SamplingParams.{field}={limit + 1} is invalid: must "
                                         rf"be None or at most {limit}, the engine's "
                                         r"max_logprobs \(pass a larger max_logprobs, or -1"):
        check_logprobs(SamplingParams(**{field: limit + 1}), vocab, limit)
    check_logprobs(SamplingParams(**{field: vocab}), vocab, -1)
    with pytest.raises(ValueError, match=rf"at most {vocab}, the model's vocabulary size"):
        check_logprobs(SamplingParams(**{field: vocab + 1}), vocab, -1)

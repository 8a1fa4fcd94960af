"""SamplingParams validation: every bad value is a ValueError naming the field, the value
and what is allowed, never a TypeError from a comparison deep inside."""

import math
import random
import re

import pytest

from shardline.sampling_params import SamplingParams

REAL_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
               "frequency_penalty")


@pytest.mark.parametrize("field", REAL_FIELDS)
@pytest.mark.parametrize("value", ["0.5", None, [1.0], True, math.inf, -math.inf, math.nan])
def test_real_fields_refuse_non_numbers_by_name(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=.* is invalid: must be a "
                                         "finite number"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", ["n", "seed", "top_k", "logprobs", "prompt_logprobs",
                                   "max_tokens"])
def test_integer_fields_refuse_bools(field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=True is invalid"):
        SamplingParams(**{field: True})


@pytest.mark.parametrize("field", ["ignore_eos", "skip_special_tokens"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_flags_must_be_bools(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}={value!r} is invalid: "
                                         "must be True or False"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field,value", [("stop", 5), ("stop", {"a": 1}),
                                         ("stop_token_ids", "7"), ("stop_token_ids", 2.0)])
def test_stop_lists_of_the_wrong_type_are_named(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=.* is invalid: must be "
                                         "None, a"):
        SamplingParams(**{field: value})


def test_stop_lists_take_none_a_lone_item_or_a_sequence(fresh_seed):
    rng = random.Random(fresh_seed)
    token = rng.randrange(1000)
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(stop="x", stop_token_ids=token).stop_token_ids == [token]
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(token,)).stop == ["a", "b"]


def test_stop_strings_are_capped(rng):
    """Every step checks each stop string against each sequence's new text: 10,000 of them
    cost 1.7 ms a sequence a step, slowing the whole batch. MAX_STOP_STRINGS pass."""
    from shardline.sampling_params import MAX_STOP_STRINGS
    stops = [f"{rng.randrange(10**6)}-{i}" for i in range(2 * MAX_STOP_STRINGS)]
    assert SamplingParams(stop=stops[:MAX_STOP_STRINGS]).stop == stops[:MAX_STOP_STRINGS]
    count = rng.randint(MAX_STOP_STRINGS + 1, len(stops))
    with pytest.raises(ValueError, match=rf"^SamplingParams\.stop=<{count} strings> is invalid: "
                                         rf"must be a list of at most {MAX_STOP_STRINGS} "
                                         "strings$"):
        SamplingParams(stop=stops[:count])


def test_valid_values_still_pass(fresh_seed):
    rng = random.Random(fresh_seed)
    params = SamplingParams(n=rng.randint(1, 8), temperature=rng.uniform(0.1, 2.0),
                            top_p=rng.uniform(0.01, 1.0), top_k=rng.randint(1, 50),
                            min_p=rng.uniform(0, 1), seed=rng.randrange(2**31),
                            repetition_penalty=rng.uniform(0.5, 2),
                            presence_penalty=rng.uniform(-2, 2), logprobs=rng.randint(0, 5),
                            frequency_penalty=rng.uniform(-2, 2), max_tokens=rng.randint(1, 99))
    assert SamplingParams.from_dict(params.to_dict()) == params
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1).top_p == 1.0


def test_numpy_scalars_and_sets_are_taken_as_python_values(fresh_seed):
    np = pytest.importorskip("numpy")
    temperature, seed = random.uniform(0.1, 2.0), random.randrange(2**31)
    params = SamplingParams(temperature=np.float32(temperature), top_p=np.float16(0.5),
                            n=np.int32(2), max_tokens=np.int64(7), seed=np.int64(seed),
                            stop_token_ids={np.int64(3), 5})
    assert type(params.temperature) is float
    assert params.temperature == float(np.float32(temperature))
    assert (params.n, params.max_tokens, params.seed) == (2, 7, seed)
    assert all(type(v) is int for v in (params.n, params.max_tokens, params.seed))
    assert sorted(params.stop_token_ids) == [3, 5]
    assert SamplingParams.from_dict(params.to_dict()) == params
    with pytest.raises(ValueError, match=r"max_tokens=.*5\.0.* is invalid"):
        SamplingParams(max_tokens=np.float64(5.0))


def test_n_beyond_its_limit_is_refused_at_once(fresh_seed):
    """n=10**30 made the engine build sequences until the host ran out of memory."""
    from shardline.sampling_params import MAX_N

    rng = random.Random(fresh_seed)
    for n in (0, -rng.randint(1, 100), MAX_N + 1, rng.randint(MAX_N + 2, 10**30)):
        with pytest.raises(ValueError, match=rf"SamplingParams\.n={n} is invalid: must be an "
                                             f"integer from 1 to {MAX_N}"):
            SamplingParams(n=n)
    assert SamplingParams(n=MAX_N).n == MAX_N


@pytest.mark.parametrize("field,lowest,highest", [("top_k", 1, 2**63 - 1),
                                                  ("max_tokens", 1, 2**63 - 1),
                                                  ("logprobs", 0, 2**63 - 1),
                                                  ("prompt_logprobs", 0, 2**63 - 1)])
def test_integers_beyond_64_bits_are_refused_by_name(field, lowest, highest, fresh_seed):
    """The params cross the rings to the workers, whose msgpack carries 64-bit integers:
    top_k=2**70 was accepted, then failed the multi-process engine's next step for good."""
    rng = random.Random(fresh_seed)
    too_big = highest + rng.randint(1, 2**80)
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}={too_big} is invalid: "
                                         rf"must be .*{lowest} to 2\*\*63 - 1"):
        SamplingParams(**{field: too_big})
    _assert_crosses_the_rings(SamplingParams(**{field: highest}))


def test_seed_of_every_sample_fits_in_64_bits(fresh_seed):
    """Sample i of n draws with seed + i; each must travel to the workers."""
    rng = random.Random(fresh_seed)
    n = rng.randint(1, 64)
    for seed in (-2**63, 2**64 - n):
        _assert_crosses_the_rings(SamplingParams(n=n, seed=seed))
    for seed in (-2**63 - rng.randint(1, 2**70), 2**64 - n + rng.randint(1, 2**70)):
        with pytest.raises(ValueError, match=rf"SamplingParams\.seed={seed} is invalid: must "
                                             rf"be None or an integer from -2\*\*63 to "
                                             rf"2\*\*64 - {n} \(sample i of n={n}"):
            SamplingParams(n=n, seed=seed)


def test_stop_token_ids_beyond_64_bits_are_refused(fresh_seed):
    rng = random.Random(fresh_seed)
    ids = [rng.randrange(1000) for _ in range(rng.randint(0, 4))]
    with pytest.raises(ValueError, match=r"SamplingParams\.stop_token_ids=.* is invalid"):
        SamplingParams(stop_token_ids=ids + [2**63 + rng.randint(0, 2**70)])
    _assert_crosses_the_rings(SamplingParams(stop_token_ids=ids + [2**63 - 1]))


def _assert_crosses_the_rings(params: SamplingParams) -> None:
    from shardline.ipc.serializer import Decoder, Encoder

    frame = b"".join(bytes(part) for part in Encoder().encode(params.to_dict()))
    assert SamplingParams.from_dict(Decoder().decode(frame)) == params


@pytest.mark.parametrize("field", REAL_FIELDS)
def test_numpy_float64_is_taken_as_a_python_float(field, fresh_seed):
    """numpy.float64 subclasses float, so it was kept as is (and shown as np.float64(...))."""
    np = pytest.importorskip("numpy")
    value = {"temperature": 0.5, "top_p": 0.5, "min_p": 0.5, "repetition_penalty": 1.5,
             "presence_penalty": 1.0, "frequency_penalty": -1.0}[field]
    value *= random.Random(fresh_seed).uniform(0.5, 1.0)
    params = SamplingParams(**{field: np.float64(value)})
    assert type(getattr(params, field)) is float and getattr(params, field) == value
    assert "np." not in repr(params)


@pytest.mark.parametrize("field,kind", [("stop", "a string"), ("stop_token_ids", "an integer")])
def test_stop_lists_name_their_item_type(field, kind):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=.* is invalid: must be "
                                         rf"None, {kind} or a list of them"):
        SamplingParams(**{field: 2.5})


def test_fields_changed_after_construction_are_taken_as_the_constructor_takes_them(
        fresh_seed):
    """validate, which the engine runs on every request's params, raised TypeError ('NoneType'
    object is not iterable) for stop or stop_token_ids set to None or to a lone token id
    after construction, values the constructor takes."""
    np = pytest.importorskip("numpy")
    rng = random.Random(fresh_seed)
    token, text = rng.randrange(1000), "".join(rng.choices("abcxyz", k=rng.randint(1, 4)))
    params = SamplingParams(stop=["q"], stop_token_ids=[rng.randrange(1000)])
    params.stop, params.stop_token_ids = None, token
    params.validate()
    assert (params.stop, params.stop_token_ids) == ([], [token])
    params.stop, params.stop_token_ids = text, np.int64(token)
    params.validate()
    assert (params.stop, params.stop_token_ids) == ([text], [token])
    assert type(params.stop_token_ids[0]) is int
    assert SamplingParams(stop_token_ids=np.int32(token)).stop_token_ids == [token]
    for field, value, kind in [("stop", token, "a string"), ("stop_token_ids", text, "an integer")]:
        params = SamplingParams()
        setattr(params, field, value)
        with pytest.raises(ValueError, match=rf"SamplingParams\.{field}={value!r} is invalid: "
                                             rf"must be None, {kind} or a list of them"):
            params.validate()


@pytest.mark.parametrize("surrogate", ["\ud800", "\udfff"])
def test_a_stop_string_with_a_lone_surrogate_crosses_the_rings(surrogate, fresh_seed):
    """JSON's "\\ud800" escape gives a lone surrogate. The rings' serializer carries any
    str (tests/ipc/test_serializer.py), so such a stop string is taken; it never matches
    decoded text, which is valid UTF-8."""
    rng = random.Random(fresh_seed)
    text = "".join(rng.choices("abc", k=rng.randint(0, 3)))
    _assert_crosses_the_rings(SamplingParams(stop=["ok", text + surrogate + text,
                                                   text + "\U0001F600" + text]))


@pytest.mark.parametrize("side", ["low", "high"])
def test_repetition_penalty_beyond_float32_logits_is_refused(side, fresh_seed):
    """repetition_penalty=1e-40 was taken: the seen tokens' positive logits overflowed to
    inf, the logprobs came out NaN and sampling drew token 0 at every step. 1e39 did the
    same where every token was seen with a negative logit (all -inf)."""
    import torch

    from shardline.layers.sampler import Sampler, SamplingBatch
    from shardline.sampling_params import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY

    rng = random.Random(fresh_seed)
    limit, beyond = ((MIN_REPETITION_PENALTY, MIN_REPETITION_PENALTY * rng.uniform(1e-40, 0.99))
                     if side == "low" else
                     (MAX_REPETITION_PENALTY, MAX_REPETITION_PENALTY * rng.uniform(1.01, 1e40)))
    with pytest.raises(ValueError, match=rf"SamplingParams\.repetition_penalty="
                                         rf"{re.escape(repr(beyond))} is invalid: must be "
                                         r"from 1e-05 to 100000"):
        SamplingParams(repetition_penalty=beyond)
    # At the limit, every token seen and logits as large as a model's (all negative on the
    # high side), the logprobs stay finite.
    vocab = rng.randint(8, 64)
    logits = torch.randn(2, vocab) * 30
    if side == "high":
        logits = -logits.abs() - 1
    params = [SamplingParams(temperature=t, repetition_penalty=limit, logprobs=vocab,
                             seed=rng.randrange(2**31)) for t in (0.0, 1.0)]
    batch = SamplingBatch(params=params, prompt_token_ids=[list(range(vocab))] * 2,
                          output_token_ids=[[], []],
                          generators=[torch.Generator().manual_seed(p.seed) for p in params])
    tokens, logprobs = Sampler()(logits, batch).to_host()
    for token, lp in zip(tokens, logprobs):
        assert 0 <= token < vocab
        assert all(math.isfinite(v) for v in (lp.sampled_logprob, *lp.top_logprobs)), lp


def test_min_tokens_is_an_integer_up_to_max_tokens(fresh_seed):
    rng = random.Random(fresh_seed)
    max_tokens = rng.randint(1, 1000)
    with pytest.raises(ValueError, match=rf"SamplingParams\.min_tokens={max_tokens + 1} is "
                       rf"invalid: must be an integer from 0 to max_tokens={max_tokens}"):
        SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens + 1)
    for bad in (-rng.randint(1, 2**70), True, 1.0, "3", None):
        with pytest.raises(ValueError, match=r"SamplingParams\.min_tokens=.* is invalid"):
            SamplingParams(max_tokens=None, min_tokens=bad)
    with pytest.raises(ValueError, match=r"SamplingParams\.min_tokens=.* from 0 to 2\*\*63"):
        SamplingParams(max_tokens=None, min_tokens=2**63)
    _assert_crosses_the_rings(SamplingParams(max_tokens=max_tokens,
                                             min_tokens=rng.randint(0, max_tokens)))
    _assert_crosses_the_rings(SamplingParams(max_tokens=None, min_tokens=2**63 - 1))

"""SamplingParams.logit_bias and allowed_token_ids: what each takes, how it is normalized,
how a bad entry is named, and that both cross the rings to the workers."""

import math
import random

import numpy as np
import pytest

from shardline.ipc.serializer import Decoder, Encoder
from shardline.sampling_params import MAX_LOGIT_BIAS, InvalidSamplingParam, SamplingParams


def _through_the_rings(params: SamplingParams) -> SamplingParams:
    frame = b"".join(bytes(part) for part in Encoder().encode(params.to_dict()))
    return SamplingParams.from_dict(Decoder().decode(frame))


def test_a_bias_map_is_taken_as_ints_to_floats_and_crosses_the_rings(fresh_seed):
    rng = random.Random(fresh_seed)
    ids = rng.sample(range(2**20), rng.randint(1, 30))
    given = {np.int64(t) if rng.random() < 0.5 else t:
             rng.choice([np.float32(rng.uniform(-100, 100)), rng.randint(-100, 100),
                         -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]) for t in ids}
    params = SamplingParams(logit_bias=given, allowed_token_ids=tuple(np.int32(t) for t in ids))
    assert params.logit_bias == {int(t): float(v) for t, v in given.items()}
    assert {type(t) for t in params.logit_bias} == {int}
    assert {type(v) for v in params.logit_bias.values()} == {float}
    assert params.allowed_token_ids == ids and {type(t) for t in ids} == {int}
    assert _through_the_rings(params) == params
    assert SamplingParams(logit_bias={}).logit_bias is None


@pytest.mark.parametrize("key, bias, where, allowed", [
    ("7", 1.0, "logit_bias['7']", "keyed by a token id"),
    (-1, 1.0, "logit_bias[-1]", "keyed by a token id"),
    (2**63, 1.0, "logit_bias[9223372036854775808]", "keyed by a token id"),
    (True, 1.0, "logit_bias[True]", "keyed by a token id"),
    (3.0, 1.0, "logit_bias[3.0]", "keyed by a token id"),
    (5, 100.5, "logit_bias[5]", "a finite number from -100 to 100"),
    (5, -101, "logit_bias[5]", "a finite number from -100 to 100"),
    (5, math.nan, "logit_bias[5]", "a finite number from -100 to 100"),
    (5, math.inf, "logit_bias[5]", "a finite number from -100 to 100"),
    (5, "1", "logit_bias[5]", "a finite number from -100 to 100"),
    (5, None, "logit_bias[5]", "a finite number from -100 to 100"),
])
def test_a_bad_bias_entry_is_named_by_its_key(key, bias, where, allowed, fresh_seed):
    rng = random.Random(fresh_seed)
    good = {rng.randrange(1000) + 10: rng.uniform(-100, 100) for _ in range(rng.randint(0, 5))}
    with pytest.raises(InvalidSamplingParam) as refused:
        SamplingParams(logit_bias={**good, key: bias})
    assert refused.value.name == "logit_bias"
    assert str(refused.value).startswith(f"SamplingParams.{where}={bias!r} is invalid: must "
                                         f"be {allowed}")


@pytest.mark.parametrize("value", [[1, 2], "x", 3, {1, 2}])
def test_a_bias_that_is_no_map_is_refused(value):
    with pytest.raises(InvalidSamplingParam, match=r"SamplingParams\.logit_bias=.* is invalid: "
                       "must be None or a dict of token ids to biases"):
        SamplingParams(logit_bias=value)


@pytest.mark.parametrize("value", [[], (), [-1], [1, True], [2**63], [1.0], ["3"], "abc"])
def test_bad_allowed_token_ids_are_refused(value):
    with pytest.raises(InvalidSamplingParam) as refused:
        SamplingParams(allowed_token_ids=value)
    assert refused.value.name == "allowed_token_ids"
    assert str(refused.value).startswith("SamplingParams.allowed_token_ids=")


def test_fields_set_after_construction_are_checked_again(fresh_seed):
    rng = random.Random(fresh_seed)
    params = SamplingParams()
    params.logit_bias = {np.int64(rng.randrange(100)): rng.randint(-100, 100)}
    params.allowed_token_ids = np.int64(rng.randrange(100))
    params.validate()
    assert {type(t) for t in params.logit_bias} == {int}
    assert params.allowed_token_ids == [int(params.allowed_token_ids[0])]
    params.logit_bias = {1: 1000}
    with pytest.raises(InvalidSamplingParam, match=r"logit_bias\[1\]=1000"):
        params.validate()

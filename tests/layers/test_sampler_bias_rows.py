"""logit_bias and allowed_token_ids written by a vocabulary row: a request's allowed ids and
biases (TokenSet) are written by index when they are few and by a mask and a dense bias
row, made once per request, when they number an eighth of the vocabulary; both forms must
give exactly the logits, tokens and logprobs of writing each id by index."""

import math
import random

import numpy as np
import pytest
import torch

from odd_logits import odd_logits
from shardline.layers.sampler import Sampler, SamplingBatch
from shardline.layers.token_sets import TokenBias, TokenSet, apply_bias
from shardline.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _count(rng: random.Random, vocab: int) -> int:
    many = -(-vocab // 8)   # the fewest ids written by a vocabulary row
    return rng.choice([0, 1, 3, many - 1, many, rng.randint(many, vocab), vocab])


def _random_bias(rng: random.Random, vocab: int) -> TokenBias | None:
    """None, or a TokenBias whose biases and allowed ids are none, few or many each."""
    if rng.random() < 0.15:
        return None
    ids = rng.sample(range(vocab), _count(rng, vocab))
    values = [rng.choice([-100.0, 100.0, rng.uniform(-100, 100)]) for _ in ids]
    allowed = rng.sample(range(vocab), _count(rng, vocab))
    return TokenBias(np.asarray(ids, dtype=np.int64), np.asarray(values, dtype=np.float32),
                     np.asarray(allowed, dtype=np.int64))


def _by_index(logits: torch.Tensor, token_bias: list) -> torch.Tensor:
    """Each row's ids outside its allowed ids at -inf, then its biases added, id by id."""
    out = logits.clone()
    for row, bias in enumerate(token_bias):
        if bias is None:
            continue
        if len(bias.allowed):
            keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            keep[bias.allowed.tolist()] = True
            out[row, ~keep] = -math.inf
        ids = bias.ids.tolist()
        out[row, ids] = out[row, ids] + torch.from_numpy(bias.values).to(logits.device)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_both_forms_bias_and_mask_exactly_as_by_index(device, rng):
    """Rows with no bias, few or many biases and few or many allowed ids, in any mix: the
    logits equal those written id by id, bit for bit (+inf, -inf and NaN logits too, a
    token at -inf staying there whatever its bias), written into the logits given, and each
    request's mask and bias row are made once. So too when every row, or all but
    one, is written by its vocabulary rows."""
    vocab = rng.randint(16, 3000)
    token_bias = [_random_bias(rng, vocab) for _ in range(rng.randint(4, 12))]
    many = -(-vocab // 8)
    token_bias[0] = TokenBias(np.asarray(rng.sample(range(vocab), many)),
                              np.random.default_rng(rng.randrange(99)).uniform(
                                  -100, 100, many).astype(np.float32),
                              np.asarray(rng.sample(range(vocab), many)))
    logits = odd_logits(len(token_bias), vocab, device)
    before = logits.clone()
    rows = {}
    for _ in range(2):
        logits = before.clone()
        out = apply_bias(logits, token_bias)
        assert out is logits
        torch.testing.assert_close(out, _by_index(before, token_bias), rtol=0, atol=0,
                                   equal_nan=True)
        for row, bias in enumerate(token_bias):
            for name, ids in (("biased", bias and bias.biased),
                              ("permitted", bias and bias.permitted)):
                if ids is not None and ids.uses_row(vocab):
                    made = ids.row(vocab, logits.device)
                    assert rows.setdefault((row, name), made) is made
    dense, biases_only = ([TokenBias(np.asarray(rng.sample(range(vocab), many)),
                                     np.full(many, rng.uniform(-100, 100), dtype=np.float32),
                                     np.asarray(rng.sample(range(vocab), allowed)))
                           for _ in token_bias] for allowed in (many, 0))
    for form in (dense, [None] + dense[1:], biases_only, [None] + biases_only[1:],
                 dense[:-1] + [_random_bias(rng, vocab)]):
        logits = before.clone()
        assert apply_bias(logits, form) is logits
        torch.testing.assert_close(logits, _by_index(before, form), rtol=0, atol=0,
                                   equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_the_sampler_draws_the_same_by_rows_as_by_index(device, rng, monkeypatch):
    """Greedy and seeded sampled rows, penalized, some short of min_tokens with +100 of
    bias on their stop ids, draw the same tokens with the same logprobs whether their many
    allowed ids and biases are written by vocabulary rows or (the fraction made huge) by
    index, and never a stop id nor one outside the allowed ids."""
    vocab = rng.randint(64, 2000)
    params, blocked = [], []
    for row in range(rng.randint(4, 10)):
        bias = {t: rng.uniform(-10, 10) for t in rng.sample(range(vocab), _count(rng, vocab))}
        allowed = rng.sample(range(vocab), max(_count(rng, vocab), 2)) if row % 2 else None
        stops = rng.sample(allowed or range(vocab), 1)
        bias.update({t: 100.0 for t in stops})
        blocked.append(stops if row % 3 else [])
        params.append(SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), logprobs=3,
                                     top_p=rng.choice([1.0, 0.9]), logit_bias=bias,
                                     repetition_penalty=rng.choice([1.0, 1.3]),
                                     allowed_token_ids=allowed))
    logits = (torch.randn(len(params), vocab) * 3).to(device)
    outputs = [[rng.randrange(vocab) for _ in range(5)] for _ in params]
    seeds = [rng.randrange(2**31) for _ in params]
    results = []
    for fraction in (8, 10**9):
        monkeypatch.setattr(TokenSet, "_ROW_FROM_FRACTION", fraction)
        gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        batch = SamplingBatch(params, [[1, 2]] * len(params), outputs, gens,
                              blocked_token_ids=blocked)
        results.append(Sampler()(logits, batch).to_host())
    assert any(t is not None and (t.biased.uses_row(vocab) or t.permitted.uses_row(vocab))
               for t in SamplingBatch(params, [], [], []).token_bias)
    (tokens, logprobs), (ref_tokens, ref_logprobs) = results
    assert tokens == ref_tokens
    assert logprobs == ref_logprobs
    for token, p, stops in zip(tokens, params, blocked):
        assert token not in stops
        assert token in (p.allowed_token_ids or [token])


def test_an_id_outside_the_vocabulary_is_refused_by_name(rng):
    vocab = rng.randint(8, 100)
    ids = np.arange(vocab + 1)
    bias = TokenBias(ids[::-1].copy(), np.ones(vocab + 1, dtype=np.float32), ids)
    assert [v for _, v in sorted(zip(bias.biased.ids, bias.biased.values))] == [1.0] * len(ids)
    for name, tokens in (("logit_bias id", bias.biased), ("allowed token id", bias.permitted)):
        with pytest.raises(ValueError, match=f"{name} {vocab} is invalid.*\\[0, {vocab}\\)"):
            tokens.row(vocab, torch.device("cpu"))
    with pytest.raises(ValueError, match="2 values for 3 logit_bias ids"):
        TokenSet([1, 2, 3], np.zeros(2, dtype=np.float32), "logit_bias id")

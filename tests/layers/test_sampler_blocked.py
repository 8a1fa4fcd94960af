"""The min_tokens mask in the sampler: a request's blocked ids (BlockedTokens) mask its row by
index when they are few and by a boolean vocabulary mask, made once, when they are many; both
forms must give exactly the logits, tokens and logprobs of masking each id by index."""

import math
import random

import numpy as np
import pytest
import torch

from shardline.layers.sampler import Sampler, SamplingBatch
from shardline.layers.token_sets import BlockedTokens, mask_blocked
from shardline.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _random_rows(rng: random.Random, rows: int, vocab: int, most: int) -> list:
    """Each row's blocked ids (at most `most`) in one of the forms the sampler takes; among
    them a row without ids, a BlockedTokens masked by index and two masked by their
    vocabulary masks."""
    many = -(-vocab // 8)   # the fewest ids masked by a vocabulary mask
    few = many - 1
    blocked = [[], BlockedTokens(rng.sample(range(vocab), rng.randint(1, few)))]
    blocked += [BlockedTokens(rng.sample(range(vocab), rng.randint(many, most)))
                for _ in range(2)]
    for _ in range(rows - 4):
        ids = rng.sample(range(vocab), rng.choice([0, 1, 3, few, many, vocab - 1, most]))
        blocked.append(rng.choice([ids, np.asarray(ids, dtype=np.int64), BlockedTokens(ids)]))
    rng.shuffle(blocked)
    return blocked


def _ids(blocked) -> list[list[int]]:
    return [(b.ids if isinstance(b, BlockedTokens) else np.asarray(b, np.int64)).tolist()
            for b in blocked]


@pytest.mark.parametrize("device", DEVICES)
def test_both_forms_mask_exactly_the_ids(device, rng):
    """Rows masked by index, by a vocabulary mask or not at all, in any mix: each blocked
    logit is -inf, whatever it was (+inf and NaN included), and every other one is as it
    was, bit for bit, in the logits given; and the mask is made once."""
    vocab = rng.randint(16, 3000)
    blocked = _random_rows(rng, rng.randint(4, 12), vocab, vocab)
    assert {b.uses_row(vocab) for b in blocked if isinstance(b, BlockedTokens)} == {
        False, True}
    logits = torch.randn(len(blocked), vocab, device=device) * 5
    odd = torch.rand(logits.shape, device=device)
    logits[odd < 0.01] = math.inf
    logits[odd > 0.99] = math.nan
    before = logits.clone()
    expected = logits.clone()
    for row, ids in enumerate(_ids(blocked)):
        expected[row, ids] = -math.inf
    masks = {}
    for _ in range(2):
        logits = before.clone()
        out = mask_blocked(logits, blocked)
        assert out is logits
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        for row, b in enumerate(blocked):
            if isinstance(b, BlockedTokens) and b.uses_row(vocab):
                mask = b.row(vocab, logits.device)
                assert masks.setdefault(row, mask) is mask
    masks_only = [BlockedTokens(rng.sample(range(vocab), vocab // 8 + 1))
                  for _ in range(len(blocked))]
    for rows in (masks_only, [[]] + masks_only[1:]):   # every row by mask, or all but one
        expected = before.clone()
        for row, ids in enumerate(_ids(rows)):
            expected[row, ids] = -math.inf
        logits = before.clone()
        assert mask_blocked(logits, rows) is logits
        torch.testing.assert_close(logits, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_the_sampler_draws_the_same_with_either_form_whatever_the_bias(device, rng):
    """Greedy and seeded sampled rows draw the same tokens, with the same logprobs, from
    ids given as BlockedTokens as from the same ids given as lists (masked by index), and
    never a blocked one, though +100 of logit_bias is on some of them (a row keeps one
    token at least: engine.request_checks refuses min_tokens that would mask them all)."""
    vocab = rng.randint(64, 2000)
    blocked = _random_rows(rng, rng.randint(4, 10), vocab, vocab - 1)
    ids = _ids(blocked)
    params = []
    for row_ids in ids:
        bias = {t: 100.0 for t in rng.sample(row_ids, min(len(row_ids), 3))}
        bias[rng.randrange(vocab)] = rng.uniform(-5, 5)
        params.append(SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), logprobs=3,
                                     top_p=rng.choice([1.0, 0.9]), logit_bias=bias))
    logits = (torch.randn(len(blocked), vocab) * 3).to(device)
    seeds = [rng.randrange(2**31) for _ in params]
    results = []
    for form in (blocked, ids):
        gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        n = len(params)
        batch = SamplingBatch(params, [[]] * n, [[]] * n, gens, blocked_token_ids=form)
        results.append(Sampler()(logits, batch).to_host())
    (tokens, logprobs), (ref_tokens, ref_logprobs) = results
    assert tokens == ref_tokens
    assert logprobs == ref_logprobs
    for token, row_ids in zip(tokens, ids):
        assert token not in row_ids


def test_ids_are_kept_once_each_and_an_id_outside_the_vocabulary_is_refused(rng):
    ids = [rng.randrange(100) for _ in range(rng.randint(1, 50))]
    blocked = BlockedTokens(ids + ids[:5])
    assert blocked.ids.tolist() == sorted(set(ids)) and len(blocked) == len(set(ids))
    with pytest.raises(ValueError, match=f"blocked token id {max(ids)} .*\\[0, {max(ids)}\\)"):
        blocked.row(max(ids), torch.device("cpu"))

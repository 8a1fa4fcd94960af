"""logit_bias and allowed_token_ids in the sampler, against references computed here: the
bias is added after the stop-token masks and the penalties, before temperature and the
filters; allowed_token_ids leaves only its tokens to draw; rows without either are
untouched."""

import math
import random

import numpy as np
import pytest
import torch

from shardline.layers.sampler import Sampler, SamplingBatch, apply_penalties
from shardline.layers.token_sets import TokenBias, apply_bias
from shardline.sampling_params import SamplingParams

V = 64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _batch(params, seeds, device="cpu", prompts=None, outputs=None) -> SamplingBatch:
    n = len(params)
    gens = [torch.Generator(device).manual_seed(s) for s in seeds]
    return SamplingBatch(params, prompts or [[]] * n, outputs or [[]] * n, gens)


def _random_bias(rng: random.Random) -> dict[int, float] | None:
    if rng.random() < 0.3:
        return None
    ids = rng.sample(range(V), rng.randint(1, 12))
    return {t: rng.choice([-100.0, 100.0, rng.uniform(-100, 100)]) for t in ids}


def _reference(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's biases added one by one, and the tokens outside its allowed ids at -inf."""
    out = logits.clone()
    for row, p in enumerate(params):
        for token, bias in (p.logit_bias or {}).items():
            out[row, token] += bias
        if p.allowed_token_ids:
            keep = torch.zeros(V, dtype=torch.bool)
            keep[p.allowed_token_ids] = True
            out[row, ~keep] = -math.inf
    return out


def test_apply_bias_matches_the_reference_in_the_logits_given(rng):
    """apply_bias writes into the logits it is given (the sampler's own) and returns them."""
    rows = rng.randint(1, 24)
    logits = torch.randn(rows, V) * 3
    logits[0, rng.randrange(V)] = -math.inf     # a masked token stays masked
    params = [SamplingParams(logit_bias=_random_bias(rng),
                             allowed_token_ids=(rng.sample(range(V), rng.randint(1, V))
                                                if rng.random() < 0.4 else None))
              for _ in range(rows)]
    before = logits.clone()
    out = apply_bias(logits, [TokenBias.of(p) for p in params])
    torch.testing.assert_close(out, _reference(before, params))
    assert out is logits


def test_rows_without_bias_pay_nothing(rng):
    """No row with a bias or allowed ids: the very tensor comes back, no work queued."""
    logits = torch.randn(rng.randint(1, 8), V)
    params = [SamplingParams(temperature=rng.choice([0.0, 1.0]), logit_bias={})
              for _ in range(logits.shape[0])]
    assert all(p.logit_bias is None for p in params)
    token_bias = [TokenBias.of(p) for p in params]
    assert token_bias == [None] * len(params)
    assert apply_bias(logits, token_bias) is logits


@pytest.mark.parametrize("device", DEVICES)
def test_bias_follows_masks_and_penalties_and_logprobs_report_it(device, rng):
    """Greedy rows take the argmax of the masked, penalized, biased logits, and report
    its log-softmax; sampled rows report it over temperature (no filters here)."""
    rows = rng.randint(4, 16)
    logits = torch.randn(rows, V) * 3
    params = []
    for _ in range(rows):
        bias = _random_bias(rng)
        if bias and rng.random() < 0.5:   # often against the row's favourite
            bias[int(logits[len(params)].argmax())] = -100.0
        params.append(SamplingParams(temperature=rng.choice([0.0, 0.0, 0.7, 1.0]),
                                     repetition_penalty=rng.choice([1.0, 1.4]),
                                     frequency_penalty=rng.choice([0.0, 0.5]),
                                     logit_bias=bias, logprobs=3, seed=len(params)))
    blocked = [rng.sample(range(V), rng.randint(0, 3)) for _ in range(rows)]
    batch = _batch(params, range(rows), device, prompts=[[1, 2, 3]] * rows,
                   outputs=[[rng.randrange(V) for _ in range(4)] for _ in range(rows)])
    batch.blocked_token_ids = blocked
    tokens, logprobs = Sampler()(logits.to(device), batch).to_host()
    masked = logits.clone()
    for row, ids in enumerate(blocked):
        masked[row, ids] = -math.inf
    expected = _reference(apply_penalties(masked, _batch(params, range(rows),
                                                         prompts=batch.prompt_token_ids,
                                                         outputs=batch.output_token_ids)),
                          params)
    for row, (p, token, lp) in enumerate(zip(params, tokens, logprobs)):
        assert token not in blocked[row]
        reference = (expected[row] / (p.temperature or 1.0)).log_softmax(-1)
        if p.greedy:
            assert token == int(expected[row].argmax()), f"row {row}"
        assert lp.sampled_logprob == pytest.approx(float(reference[token]), abs=1e-4)
        assert lp.top_token_ids == reference.topk(3).indices.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_a_forcing_bias_is_drawn_and_a_blocked_token_stays_blocked(device, rng):
    """+100 on a token makes every row, greedy or sampled, take it, unless the token is
    masked (a stop token short of min_tokens): then it is never drawn."""
    rows = 12
    logits = torch.randn(rows, V) * 3
    forced = [rng.randrange(V) for _ in range(rows)]
    params = [SamplingParams(temperature=rng.choice([0.0, 1.0]), top_p=rng.choice([1.0, 0.9]),
                             logit_bias={t: 100.0}) for t in forced]
    batch = _batch(params, [rng.randrange(2**31) for _ in range(rows)], device)
    batch.blocked_token_ids = [[t] if row % 3 == 0 else [] for row, t in enumerate(forced)]
    for _ in range(10):
        tokens, _ = Sampler()(logits.to(device), batch).to_host()
        for row, token in enumerate(tokens):
            assert (token != forced[row]) if row % 3 == 0 else (token == forced[row])


@pytest.mark.parametrize("device", DEVICES)
def test_every_draw_is_one_of_the_allowed_ids(device, rng):
    """Many rows, greedy and seeded random, top-k among them: each token drawn in 30 steps
    is one of its row's allowed ids (the greedy one the best of them), mostly excluding
    the row's favourite token; rows whose allowed ids are equally likely draw several."""
    rows = 48
    logits = torch.randn(rows, V) * 4
    allowed = []
    for row in range(rows):
        ids = rng.sample(range(V), rng.randint(1, 6))
        if rng.random() < 0.8:
            ids = [t for t in ids if t != int(logits[row].argmax())] or [(ids[0] + 1) % V]
        allowed.append(ids)
    params = [SamplingParams(temperature=rng.choice([0.0, 0.5, 1.0, 2.0]),
                             top_k=rng.choice([-1, 1, 3]), allowed_token_ids=ids)
              for ids in allowed]
    # The last rows draw evenly among four allowed ids of equal logits: they sample.
    even = range(rows - 4, rows)
    for row in even:
        allowed[row] = rng.sample(range(V), 4)
        logits[row, allowed[row]] = 0.0
        params[row] = SamplingParams(allowed_token_ids=allowed[row])
    batch = _batch(params, [rng.randrange(2**31) for _ in range(rows)], device)
    seen = [set() for _ in range(rows)]
    for _ in range(30):
        tokens, _ = Sampler()(logits.to(device), batch).to_host()
        for row, token in enumerate(tokens):
            assert token in allowed[row], f"row {row}: {token} not in {allowed[row]}"
            if params[row].greedy:
                assert token == max(allowed[row], key=lambda t: float(logits[row, t]))
            seen[row].add(token)
    assert all(len(seen[row]) > 1 for row in even)


def test_unbiased_rows_draw_as_in_a_batch_without_bias(rng):
    """Seeded rows without bias get the same tokens and logprobs whether their batch
    mates are biased or restricted or not."""
    rows = 10
    logits = torch.randn(rows, V) * 2
    plain = [SamplingParams(temperature=rng.choice([0.0, 1.0]), seed=row, logprobs=2)
             for row in range(rows)]
    mixed = [SamplingParams(temperature=p.temperature, seed=p.seed, logprobs=2,
                            logit_bias=_random_bias(rng) if row % 2 else None,
                            allowed_token_ids=[row] if row % 4 == 3 else None)
             for row, p in enumerate(plain)]
    seeds = [rng.randrange(2**31) for _ in range(rows)]
    alone = Sampler()(logits, _batch(plain, seeds)).to_host()
    together = Sampler()(logits, _batch(mixed, seeds)).to_host()
    for row in range(0, rows, 2):
        assert together[0][row] == alone[0][row]
        assert together[1][row] == alone[1][row]
    assert all(together[0][row] == row for row in range(3, rows, 4))


def test_one_sampler_over_changing_batches_biases_each_as_its_batch_says(rng):
    """One Sampler over batches that drop, add, reorder and replace requests, and change a
    request's bias in place: each batch is biased as its params say now, as a fresh
    Sampler biases it. The Sampler kept each request's arrays in a cache keyed by
    id(params), which went on biasing a changed params by its old arrays."""
    pool = [SamplingParams(logit_bias=_random_bias(rng) or {rng.randrange(V): 50.0},
                           allowed_token_ids=(rng.sample(range(V), rng.randint(1, 20))
                                              if rng.random() < 0.4 else None))
            for _ in range(12)] + [SamplingParams() for _ in range(4)]
    sampler, params = Sampler(), []
    for step in range(30):
        if rng.random() < 0.5:
            # A request finishes and a new one comes: freed first, so that CPython often
            # gives the new params the finished one's id.
            gone = rng.choice(params or pool)
            pool.remove(gone)
            del gone, params
            pool.append(SamplingParams(logit_bias=_random_bias(rng)))
        params = rng.sample(pool, rng.randint(1, len(pool)))
        if step % 3 == 2:
            changed = rng.choice(params)
            changed.logit_bias = {t: -b for t, b in (changed.logit_bias or {3: 1.0}).items()}
            changed.allowed_token_ids = None
            changed.validate()
        for p in params:
            p.temperature, p.logprobs = 0.0, 4
        logits = torch.randn(len(params), V)
        batch = _batch(params, range(len(params)))
        got = sampler(logits, batch).to_host()
        assert got == Sampler()(logits, _batch(params, range(len(params)))).to_host()
        assert got[0] == _reference(logits, params).argmax(-1).tolist()


def test_a_batch_biases_by_the_arrays_it_is_given(rng):
    """The sampler reads a row's bias and allowed ids from its TokenBias only: the model
    runner's batches carry arrays made once per request, so params are not looked at."""
    logits = torch.randn(3, V)
    forced, allowed = rng.randrange(V), rng.sample(range(V), rng.randint(1, 5))
    params = [SamplingParams(temperature=0.0, logit_bias={int(row.argmin()): 100.0})
              for row in logits]
    given = [TokenBias(np.asarray([forced]), np.asarray([100.0], dtype=np.float32),
                       np.asarray([], dtype=np.int64)),
             None,
             TokenBias(np.asarray([], dtype=np.int64), np.asarray([], dtype=np.float32),
                       np.asarray(allowed))]
    batch = SamplingBatch(params, [[]] * 3, [[]] * 3, [torch.Generator()] * 3,
                          token_bias=given)
    assert Sampler()(logits, batch).to_host()[0] == [
        forced, int(logits[1].argmax()), max(allowed, key=lambda t: float(logits[2, t]))]
    made = _batch(params, range(3)).token_bias
    assert [(t.ids.tolist(), t.values.tolist(), t.allowed.tolist()) for t in made] == [
        (list(p.logit_bias), [100.0], []) for p in params]

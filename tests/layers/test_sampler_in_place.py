"""The sampler writes its masks, penalties, biases and filters into one fp32 tensor: the
logits themselves when the caller hands them over (overwrite=True, as the model runner
does), else one copy. It wrote each into a new [N, V] tensor (at 256 rows over a 151k
vocabulary, 155 MB copied for one stop id a row). Whatever it writes into, the tokens and
logprobs must be bit for bit those of the out-of-place reference here."""

import math
import random

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from odd_logits import odd_logits
from shardline.layers.sampler import Sampler, SamplingBatch, apply_filters, draw
from shardline.layers.token_sets import BlockedTokens, TokenBias
from shardline.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class NewLogitsSized(TorchDispatchMode):
    """Counts the ops that return a new floating tensor of `shape`: one sharing the storage
    of no tensor in `known` nor of one counted before (an op in place on it returns it)."""

    def __init__(self, shape: torch.Size, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.shape = shape
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == self.shape
                    and t.untyped_storage().data_ptr() not in self.known):
                self.ops.append(str(func))
                self.known.add(t.untyped_storage().data_ptr())
        return out


def _random_batch(rng: random.Random, rows: int, vocab: int, device: str) -> dict:
    """SamplingBatch arguments: rows greedy or sampled (filtered or not), with or without
    logprobs, penalties, stop ids (by index or by mask), biases and allowed ids (few or
    many), in any mix; seeds for their generators."""
    many = -(-vocab // 8)
    params, blocked = [], []
    for _ in range(rows):
        count = rng.choice([0, 1, 3, many, vocab // 2])
        blocked.append(rng.choice([BlockedTokens, list])(rng.sample(range(vocab), count)))
        bias = {t: rng.uniform(-20, 20)
                for t in rng.sample(range(vocab), rng.choice([0, 2, many]))}
        allowed = rng.sample(range(vocab), rng.choice([many, vocab // 2, 5]))
        penalized = rng.random() < 0.3
        params.append(SamplingParams(
            temperature=rng.choice([0.0, 0.0, 0.7, 1.3]), top_k=rng.choice([-1, 5]),
            top_p=rng.choice([1.0, 0.8]), min_p=rng.choice([0.0, 0.05]),
            logprobs=rng.choice([None, 0, 3]), logit_bias=bias or None,
            allowed_token_ids=allowed if rng.random() < 0.3 else None,
            repetition_penalty=1.3 if penalized else 1.0,
            frequency_penalty=0.4 if penalized else 0.0,
            presence_penalty=-0.5 if penalized else 0.0))
    return {"params": params, "blocked": blocked,
            "prompts": [rng.sample(range(vocab), 4) for _ in params],
            "outputs": [[rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
                        for _ in params],
            "seeds": [rng.randrange(2**31) for _ in params], "device": device}


def _batch(spec: dict) -> SamplingBatch:
    gens = [torch.Generator(spec["device"]).manual_seed(s) for s in spec["seeds"]]
    return SamplingBatch(spec["params"], spec["prompts"], spec["outputs"], gens,
                         blocked_token_ids=spec["blocked"])


def _reference(logits: torch.Tensor, spec: dict) -> tuple[torch.Tensor, ...]:
    """Tokens, sampled logprobs and top-n (values, ids) of the sampler's order of work, each
    step into a new tensor: stop ids to -inf, penalties, allowed ids and biases id by id,
    then the filters and the draw."""
    params, vocab = spec["params"], logits.shape[1]
    x = logits.float().clone()
    for row, ids in enumerate(spec["blocked"]):
        x[row, np.asarray(getattr(ids, "ids", ids), dtype=np.int64)] = -math.inf
    if any(p.needs_token_history for p in params):
        counts = torch.zeros_like(x)
        seen = torch.zeros_like(x, dtype=torch.bool)
        for row, (prompt, output) in enumerate(zip(spec["prompts"], spec["outputs"])):
            for t in output:
                counts[row, t] += 1
            seen[row, prompt + output] = True
        column = lambda name: torch.tensor(  # noqa: E731
            [getattr(p, name) for p in params], device=x.device)[:, None]
        rep = column("repetition_penalty")
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - column("frequency_penalty") * counts
        x = x - column("presence_penalty") * (counts > 0)
    for row, p in enumerate(params):
        if p.allowed_token_ids:
            keep = torch.zeros(vocab, dtype=torch.bool, device=x.device)
            keep[p.allowed_token_ids] = True
            x[row] = torch.where(keep, x[row], -math.inf)
        for t, b in (p.logit_bias or {}).items():
            x[row, t] = x[row, t] + torch.tensor(b, dtype=torch.float32)
    greedy = [p.greedy for p in params]
    tokens = x.argmax(dim=-1)
    processed = apply_filters(x.clone(), params)
    rows = [i for i, g in enumerate(greedy) if not g]
    if rows:
        gens = [torch.Generator(spec["device"]).manual_seed(spec["seeds"][i]) for i in rows]
        tokens[rows] = draw(processed[rows].softmax(dim=-1), gens)
    is_greedy = torch.tensor(greedy, device=x.device)[:, None]
    lp = torch.where(is_greedy, x, processed).log_softmax(dim=-1)
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    top = lp.topk(min(max(wanted), vocab)) if wanted else (None, None)
    return tokens, lp.gather(1, tokens[:, None])[:, 0], *top


def _check(out, ref: tuple[torch.Tensor, ...], params: list[SamplingParams]) -> None:
    """Tokens equal; the logprobs of the rows that asked equal bit for bit (NaN too)."""
    tokens, sampled, top_values, top_ids = ref
    assert out.token_ids.tolist() == tokens.tolist()
    for row, p in enumerate(params):
        if p.logprobs is None:
            continue
        n = p.logprobs
        got = (out.sampled_logprobs[row], out.top_logprobs[row, :n], out.top_token_ids[row, :n])
        for a, b in zip(got, (sampled[row], top_values[row, :n], top_ids[row, :n])):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_every_form_of_the_logits_samples_as_the_reference(device, rng):
    """fp32 logits handed over, the same logits kept by the caller (left as they were), a
    view into a wider buffer handed over (the LM head's output over a padded vocabulary)
    and bf16 logits (float() copies them, the bf16 left alone): each gives the reference's
    tokens and logprobs, over random batches of every kind of row, +-inf and NaN logits."""
    for _ in range(4):
        vocab = rng.randint(40, 700)
        spec = _random_batch(rng, rng.randint(2, 9), vocab, device)
        logits = odd_logits(len(spec["params"]), vocab, device)
        ref = _reference(logits, spec)
        _check(Sampler()(logits.clone(), _batch(spec), overwrite=True), ref, spec["params"])
        before = logits.clone()
        _check(Sampler()(logits, _batch(spec)), ref, spec["params"])
        torch.testing.assert_close(logits, before, rtol=0, atol=0, equal_nan=True)
        wide = torch.randn(logits.shape[0], vocab + 13, device=device)
        wide[:, :vocab] = logits
        _check(Sampler()(wide[:, :vocab], _batch(spec), overwrite=True), ref, spec["params"])
        half = logits.bfloat16()
        half_before = half.clone()
        _check(Sampler()(half, _batch(spec)), _reference(half, spec), spec["params"])
        torch.testing.assert_close(half, half_before, rtol=0, atol=0, equal_nan=True)


def test_filters_in_place_write_the_bits_of_the_copy(rng):
    """apply_filters(in_place=True) overwrites its input with exactly what the copying
    form returns (+-inf and NaN logits, every filter in any mix)."""
    vocab = rng.randint(20, 500)
    params = [SamplingParams(temperature=rng.choice([0.0, 0.5, 1.0, 2.0]),
                             top_k=rng.choice([-1, 1, 7, vocab]), top_p=rng.choice([1.0, 0.5]),
                             min_p=rng.choice([0.0, 0.1])) for _ in range(rng.randint(1, 9))]
    logits = odd_logits(len(params), vocab, "cpu")
    expected = apply_filters(logits, params)
    assert apply_filters(logits, params, in_place=True) is logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0, equal_nan=True)


def test_masking_makes_no_logits_sized_tensor_when_the_logits_are_handed_over(rng):
    """Greedy rows with stop ids, biases and allowed ids (each by index and by vocabulary
    row): handed over, the logits are written where they lie, no new [N, V] tensor made;
    kept by the caller, one copy is made (the one that protects them)."""
    vocab = rng.randint(200, 2000)
    many = -(-vocab // 8)
    rows = 6
    blocked = [BlockedTokens(rng.sample(range(vocab), k)) for k in (1, many, 0, 3, many, 2)]
    params = [SamplingParams(temperature=0.0)]
    for k in (2, many, 3, many, 4):
        params.append(SamplingParams(
            temperature=0.0, logit_bias={t: rng.uniform(-5, 5)
                                         for t in rng.sample(range(vocab), k)},
            allowed_token_ids=rng.sample(range(vocab), rng.choice([5, many]))))
    bias = [TokenBias.of(p) for p in params]
    logits = torch.randn(rows, vocab)
    expected = Sampler()(logits.clone(), SamplingBatch(
        params, [[]] * rows, [[]] * rows, [torch.Generator()] * rows,
        blocked_token_ids=[b.ids.tolist() for b in blocked])).token_ids
    for overwrite, copies in ((True, 0), (False, 1)):
        batch = SamplingBatch(params, [[]] * rows, [[]] * rows, [torch.Generator()] * rows,
                              blocked_token_ids=blocked, token_bias=bias)
        given = logits.clone()
        with NewLogitsSized(logits.shape, [given]) as made:
            out = Sampler()(given, batch, overwrite=overwrite)
        assert len(made.ops) == copies, made.ops
        assert torch.equal(out.token_ids, expected)
        assert torch.equal(given, logits) != overwrite

import math
import random

import numpy as np
import pytest
import torch

from shardline.sampling_params import SamplingParams
from shardline.layers.sampler import (Sampler, SamplingBatch, apply_filters, apply_penalties,
                                     draw)

V = 50


def sample(logits, batch):
    """The sampler's tokens and logprobs, read back to the host."""
    return Sampler()(logits, batch).to_host()


def _batch(params, prompts=None, outputs=None, seeds=None) -> SamplingBatch:
    n = len(params)
    gens = [torch.Generator().manual_seed(s) for s in (seeds or range(n))]
    return SamplingBatch(params, prompts or [[]] * n, outputs or [[]] * n, gens)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(3, V)
    out = apply_filters(logits, [SamplingParams(top_k=k) for k in (1, 5, -1)])
    for row, k in zip(range(3), (1, 5, V)):
        kept = torch.isfinite(out[row]).nonzero().flatten()
        assert set(kept.tolist()) == set(logits[row].topk(k).indices.tolist())


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.randn(1, V)
    p = 0.6
    out = apply_filters(logits, [SamplingParams(top_p=p)])
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True)
    need = int((probs[order].cumsum(0) < p).sum()) + 1
    kept = torch.isfinite(out[0]).nonzero().flatten()
    assert set(kept.tolist()) == set(order[:need].tolist())


def test_min_p_drops_tokens_below_fraction_of_max():
    logits = torch.randn(1, V)
    out = apply_filters(logits, [SamplingParams(min_p=0.3)])
    probs = logits.softmax(-1)[0]
    expected = (probs >= 0.3 * probs.max()).nonzero().flatten()
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == expected.tolist()


def test_temperature_scales_logits():
    logits = torch.randn(1, V)
    out = apply_filters(logits, [SamplingParams(temperature=0.5)])
    torch.testing.assert_close(out, logits / 0.5)


def test_penalties_math():
    logits = torch.randn(1, V) * 3
    prompt, output = [1, 2], [2, 3, 3]
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), _batch([params], [prompt], [output]))
    expected = logits.clone()
    for t in {1, 2, 3}:
        x = expected[0, t]
        expected[0, t] = x / 1.5 if x > 0 else x * 1.5
    for t, count in ((2, 1), (3, 2)):
        expected[0, t] -= 0.25 * count + 0.5
    torch.testing.assert_close(out, expected)


def test_greedy_takes_argmax_after_penalties():
    logits = torch.randn(2, V)
    best = int(logits[0].argmax())
    params = [SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, frequency_penalty=2.0)]
    logits[1, best] = logits[1].max() + 1.0
    tokens, _ = sample(logits, _batch(params, outputs=[[], [best] * 3]))
    assert tokens[0] == best
    assert tokens[1] != best


def test_seeded_draw_ignores_batch_mates():
    logits = torch.randn(1, V)
    alone, _ = sample(logits, _batch([SamplingParams(seed=1)], seeds=[7]))
    mates = torch.randn(3, V)
    batch = _batch([SamplingParams()] * 3 + [SamplingParams(seed=1)], seeds=[1, 2, 3, 7])
    together, _ = sample(torch.cat([mates, logits]), batch)
    assert together[3] == alone[0]


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)] + [-1e9] * (V - 2)])
    gen = torch.Generator().manual_seed(0)
    batch = SamplingBatch([SamplingParams()], [[]], [[]], [gen])
    draws = [sample(logits, batch)[0][0] for _ in range(400)]
    assert set(draws) <= {0, 1}
    assert 0.65 < draws.count(1) / 400 < 0.85


def test_rows_sharing_a_generator_each_follow_their_own_distribution(fresh_seed):
    p_one = torch.tensor([0.2, 0.5, 0.9])
    probs = torch.zeros(3, V)
    probs[:, 0], probs[:, 1] = 1 - p_one, p_one
    shared = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    # 3000 draws put 0.07 at 7 sigma of p = 0.5 (with 800, at 4: a false alarm in 13000 runs)
    draws = torch.stack([draw(probs, [shared] * 3) for _ in range(3000)])
    assert set(draws.flatten().tolist()) <= {0, 1}
    assert torch.allclose(draws.float().mean(0), p_one, atol=0.07)


def test_seeded_row_ignores_mates_that_share_the_engine_generator():
    logits = torch.randn(1, V)
    alone, _ = sample(logits, _batch([SamplingParams(seed=1)], seeds=[7]))
    engine_gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    batch = _batch([SamplingParams()] * 3 + [SamplingParams(seed=1)], seeds=[0, 0, 0, 7])
    batch.generators[:3] = [engine_gen] * 3
    together, _ = sample(torch.cat([torch.randn(3, V), logits]), batch)
    assert together[3] == alone[0]


def test_sampled_token_respects_filters():
    logits = torch.randn(8, V)
    tokens, _ = sample(logits, _batch([SamplingParams(top_k=3)] * 8))
    for row, tok in enumerate(tokens):
        assert tok in logits[row].topk(3).indices.tolist()


def test_logprobs_top_n_and_sampled():
    logits = torch.randn(2, V)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(logprobs=0)]
    tokens, logprobs = sample(logits, _batch(params))
    ref = logits.log_softmax(-1)
    assert logprobs[0].top_token_ids == ref[0].topk(3).indices.tolist()
    assert logprobs[0].top_logprobs == pytest.approx(ref[0].topk(3).values.tolist(), abs=1e-5)
    assert logprobs[0].sampled_logprob == pytest.approx(float(ref[0, tokens[0]]), abs=1e-5)
    assert logprobs[1].top_token_ids == []
    assert logprobs[1].sampled_logprob == pytest.approx(float(ref[1, tokens[1]]), abs=1e-5)


def test_no_logprobs_unless_asked():
    _, logprobs = sample(torch.randn(2, V), _batch([SamplingParams()] * 2))
    assert logprobs == [None, None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_reading_the_tokens_does_not_wait_for_work_queued_after_them():
    """Async scheduling queues step N+1 before it reads step N's tokens: that read must wait
    for step N alone (its copy to the host was queued right behind the sampling)."""
    import time

    logits = torch.randn(4, V, device="cuda")
    gens = [torch.Generator("cuda").manual_seed(i) for i in range(4)]
    out = Sampler()(logits, SamplingBatch([SamplingParams(logprobs=2)] * 4, [[]] * 4,
                                          [[]] * 4, gens))
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)   # about a second of device time, queued after them
    start = time.perf_counter()
    tokens, logprobs = out.to_host()
    waited = time.perf_counter() - start
    torch.cuda.synchronize()
    assert waited < 0.2, f"the read waited {waited:.2f} s for later work"
    assert tokens == out.token_ids.tolist() and all(lp is not None for lp in logprobs)


def test_a_zero_noise_draw_never_picks_a_token_filtered_out(monkeypatch, fresh_seed):
    """torch's CPU exponential_ can return 0 (pytorch#22557); where it did at a token that
    top-k had filtered out, p / E was 0 / 0 = NaN, which argmax takes as the largest: the
    row drew that token."""
    rows, k = 4, 3
    logits = torch.randn(rows, V)
    real_exponential = torch.Tensor.exponential_

    def exponential_with_zeros(self, *args, **kwargs):
        real_exponential(self, *args, **kwargs)
        flat = self.view(-1)
        flat[torch.randperm(flat.numel())[:flat.numel() // 2]] = 0.0
        return self
    monkeypatch.setattr(torch.Tensor, "exponential_", exponential_with_zeros)
    for batch in (_batch([SamplingParams(top_k=k, seed=s) for s in range(rows)]),
                  SamplingBatch([SamplingParams(top_k=k)] * rows, [[]] * rows, [[]] * rows,
                                [torch.Generator().manual_seed(fresh_seed)] * rows)):
        tokens, _ = sample(logits, batch)
        for row, tok in enumerate(tokens):
            assert tok in logits[row].topk(k).indices.tolist()


def test_top_k_keeps_all_k_and_unfiltered_mates_keep_everything(fresh_seed):
    """With top_p = 1, the top-p mask still compared each token's preceding mass with 1,
    and fp32 rounding of the cumulative sum takes it above 1 in the tail: a quarter of the
    rows with top_k over a 1000-token vocabulary kept fewer than k tokens, and rows with no
    filter lost tail tokens whenever a batch mate had one."""
    vocab, rows = 1000, 16
    logits = torch.randn(rows, vocab) * torch.rand(rows, 1) * 20
    ks = torch.randint(2, vocab, (rows,)).tolist()
    ks[::4] = [-1] * len(ks[::4])
    out = apply_filters(logits, [SamplingParams(top_k=k) for k in ks])
    for row, k in enumerate(ks):
        kept = torch.isfinite(out[row]).nonzero().flatten()
        expected = logits[row].topk(k if k > 0 else vocab).indices
        assert set(kept.tolist()) == set(expected.tolist()), f"row {row}, top_k={k}"


def test_blocked_tokens_are_never_drawn_and_logprobs_are_of_the_masked_rows(fresh_seed):
    """Each row's blocked ids (a sequence's stop tokens while it is short of min_tokens) get
    -inf before penalties and filters: greedy rows take the best of the rest, sampled rows
    never draw one, and the logprobs are the log-softmax of the masked distribution."""
    rng = random.Random(fresh_seed)
    rows = 6
    logits = torch.randn(rows, V) * 3
    blocked = [rng.sample(range(V), rng.randint(0, 5)) for _ in range(rows)]
    for row, ids in enumerate(blocked):
        if ids and rng.random() < 0.7:   # often the row's favourite, so masking matters
            logits[row, ids[0]] = logits[row].max() + 5
    params = [SamplingParams(temperature=rng.choice([0.0, 0.8, 1.0]), logprobs=3,
                             repetition_penalty=rng.choice([1.0, 1.3]), seed=row)
              for row in range(rows)]
    before = logits.clone()
    batch = _batch(params, prompts=[[1, 2]] * rows, outputs=[[3]] * rows)
    # As the model runner gives them (an int64 array per request) or as lists.
    batch.blocked_token_ids = [np.asarray(ids, dtype=np.int64) if rng.random() < 0.5 else ids
                               for ids in blocked]
    for _ in range(20):
        tokens, logprobs = sample(logits, batch)
        masked = before.clone()
        for row, ids in enumerate(blocked):
            masked[row, ids] = -math.inf
        expected = apply_penalties(masked, batch)
        for row, (token, lp) in enumerate(zip(tokens, logprobs)):
            assert token not in blocked[row]
            if params[row].greedy:
                assert token == int(expected[row].argmax())
                reference = expected[row].log_softmax(-1)
                assert lp.sampled_logprob == pytest.approx(float(reference[token]), abs=1e-5)
                assert not set(lp.top_token_ids) & set(blocked[row])
    assert torch.equal(logits, before)   # the caller's logits are left as they were

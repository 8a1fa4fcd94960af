"""Sampling end to end on a real preset (fp32, CPU): reported logprobs against the
log-softmax of transformers' logits, seeded draws against each request run alone under
preemption, chunked prefill and async scheduling, and the edge values of the filters
against greedy decoding."""

import random
import warnings

import pytest
import torch

from fake_engine_checks import assert_all_free
from near_ties import NEAR_TIE
from shardline import LLM, SamplingParams
from shardline.presets import resolve_model
from shardline.sampling_params import MIN_TEMPERATURE

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            resolve_model(MODEL), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def roomy_llm():
    """Each request run alone: no prefix caching, room for everything in one step."""
    return LLM(MODEL, block_size=4, num_kv_blocks=256, max_model_len=96,
               enable_prefix_caching=False)


def tight_llm(async_scheduling: bool) -> LLM:
    """A KV cache of 12 blocks of 4 and 8 tokens a step: prompts go in chunks, and
    sequences are preempted and recomputed."""
    return LLM(MODEL, block_size=4, num_kv_blocks=12, max_model_len=96,
               max_num_batched_tokens=8, max_num_seqs=8, async_scheduling=async_scheduling)


def random_prompts(rng: random.Random, count: int, high: int = 30) -> list[list[int]]:
    return [[rng.randrange(3, 259) for _ in range(rng.randint(1, high))] for _ in range(count)]


def completions(outputs) -> list[list[int]]:
    return [list(c.token_ids) for o in outputs for c in o.outputs]


def reference_logprobs(hf_model, prompt: list[int], output: list[int],
                       params: SamplingParams) -> torch.Tensor:
    """log-softmax of the distribution each output token was drawn from: transformers'
    logits over temperature, with top-k's excluded tokens at -inf (greedy: the logits)."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1]
    logits = logits.float() / (params.temperature or 1.0)
    if params.top_k > 0 and not params.greedy:
        kth = logits.topk(params.top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(-1)


def test_logprobs_are_the_log_softmax_of_the_model_logits(hf_model, rng):
    llm = tight_llm(async_scheduling=rng.random() < 0.5)
    prompts = random_prompts(rng, 6)
    params = [SamplingParams(temperature=t, top_k=k, seed=rng.randrange(2**31),
                             logprobs=rng.randint(0, 6), max_tokens=rng.randint(1, 8),
                             ignore_eos=True)
              for t, k in [(0.0, -1), (0.0, 3), (1.0, -1), (0.7, -1), (1.3, 4), (1.0, 1)]]
    for prompt, p, output in zip(prompts, params, llm.generate(prompts, params)):
        out = output.outputs[0]
        ref = reference_logprobs(hf_model, prompt, list(out.token_ids), p)
        assert len(out.logprobs) == len(out.token_ids) == p.max_tokens
        for pos, (token, reported) in enumerate(zip(out.token_ids, out.logprobs)):
            assert token in reported and len(reported) <= p.logprobs + 1
            expected = ref[pos, list(reported)]
            got = torch.tensor(list(reported.values()))
            assert torch.equal(expected.isinf(), got.isinf()), (p, pos, reported)
            finite = expected.isfinite()
            assert torch.allclose(got[finite], expected[finite], atol=1e-4), (p, pos)
            alternatives = sorted(reported.values(), reverse=True)[:p.logprobs]
            if p.logprobs:   # the n best, up to rounding
                assert alternatives[-1] >= ref[pos].topk(p.logprobs).values[-1] - 1e-4
        assert out.cumulative_logprob == pytest.approx(
            sum(lp[t] for lp, t in zip(out.logprobs, out.token_ids)))
    assert_all_free(llm.engine)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_seeded_draws_ignore_batch_mates_order_and_preemption(roomy_llm, async_scheduling,
                                                              rng):
    """A seeded request samples the same tokens alone as in a shuffled batch that is
    computed in chunks, preempted and recomputed, with or without steps going ahead."""
    prompts = random_prompts(rng, 8)
    params = [SamplingParams(
        n=rng.choice([1, 2]), seed=rng.randrange(2**40), temperature=rng.choice([0.5, 1.0, 1.5]),
        top_k=rng.choice([-1, 5, 1000]), top_p=rng.choice([1.0, 0.8]),
        min_p=rng.choice([0.0, 0.05]), repetition_penalty=rng.choice([1.0, 1.2]),
        presence_penalty=rng.choice([0.0, 0.5]), max_tokens=rng.choice([1, 8, 16]),
        ignore_eos=True) for _ in prompts]
    alone = [completions(roomy_llm.generate(p, sp)) for p, sp in zip(prompts, params)]
    llm = tight_llm(async_scheduling)
    order = rng.sample(range(len(prompts)), len(prompts))
    batch = llm.generate([prompts[i] for i in order], [params[i] for i in order])
    assert [completions([batch[order.index(i)]]) for i in range(len(prompts))] == alone
    assert llm.stats.num_preemptions > 0
    assert_all_free(llm.engine)


def test_filters_at_their_edge_values_decode_greedily(roomy_llm, rng):
    """top_k=1, a top_p below every probability, min_p=1 and the lowest temperature each
    leave only the most likely token: the tokens are the greedy ones, except where the
    greedy run had two tokens within NEAR_TIE of each other."""
    prompts = random_prompts(rng, 4)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    expected = roomy_llm.generate(prompts, greedy)
    for edge in (dict(top_k=1), dict(top_p=1e-9), dict(min_p=1.0),
                 dict(temperature=MIN_TEMPERATURE)):
        params = SamplingParams(max_tokens=8, ignore_eos=True, seed=rng.randrange(2**31),
                                **edge)
        for want, got in zip(expected, roomy_llm.generate(prompts, params)):
            want, tokens = want.outputs[0], list(got.outputs[0].token_ids)
            pos = next((i for i, (a, b) in enumerate(zip(want.token_ids, tokens)) if a != b),
                       None)
            if pos is not None:
                top2 = sorted(want.logprobs[pos].values(), reverse=True)[:2]
                assert top2[0] - top2[1] <= NEAR_TIE, (edge, list(want.token_ids), tokens)

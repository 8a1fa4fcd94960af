"""Sampling end to end on a real preset (fp32, CPU): reported logprobs against the
log-softmax of transformers' logits, seeded draws against each request run alone under
preemption, chunked prefill and async scheduling, the edge values of the filters
against greedy decoding, and min_tokens against transformers' greedy tokens with the stop
tokens masked, on one rank and two."""

import json
import os
import random

import pytest
import torch

from fake_engine_checks import assert_all_free
from near_ties import (NEAR_TIE, assert_greedy_match, assert_sampled_match, sampled_run,
                       worker_device)
from shardline import LLM, SamplingParams
from shardline.presets import resolve_model
from shardline.sampling_params import MIN_TEMPERATURE

MODEL = "tiny-llama"


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


def reference_logprobs(hf_tiny_llama, prompt: list[int], output: list[int],
                       params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """log-softmax of the distribution each output token was drawn from: transformers'
    logits over temperature, with top-k's excluded tokens at -inf (greedy: the logits);
    and the logits over temperature before top-k."""
    with torch.no_grad():
        logits = hf_tiny_llama(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1]
    scaled = logits = logits.float() / (params.temperature or 1.0)
    if params.top_k > 0 and not params.greedy:
        kth = logits.topk(params.top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(-1), scaled


def test_logprobs_are_the_log_softmax_of_the_model_logits(hf_tiny_llama, rng):
    llm = tight_llm(async_scheduling=rng.random() < 0.5)
    prompts = random_prompts(rng, 6)
    params = [SamplingParams(temperature=t, top_k=k, seed=rng.randrange(2**31),
                             logprobs=rng.randint(0, 6), max_tokens=rng.randint(1, 8),
                             ignore_eos=True)
              for t, k in [(0.0, -1), (0.0, 3), (1.0, -1), (0.7, -1), (1.3, 4), (1.0, 1)]]
    for prompt, p, output in zip(prompts, params, llm.generate(prompts, params)):
        out = output.outputs[0]
        ref, scaled = reference_logprobs(hf_tiny_llama, prompt, list(out.token_ids), p)
        assert len(out.logprobs) == len(out.token_ids) == p.max_tokens
        for pos, (token, reported) in enumerate(zip(out.token_ids, out.logprobs)):
            assert token in reported and len(reported) <= p.logprobs + 1
            expected = ref[pos, list(reported)]
            got = torch.tensor(list(reported.values()))
            if not torch.equal(expected.isinf(), got.isinf()):
                # Only where top-k cuts between two tokens within rounding of each other
                # may the engine keep the one transformers drops (and so renormalize apart).
                assert p.top_k > 0 and not p.greedy, (p, pos, reported)
                cut = scaled[pos].topk(p.top_k + 1).values
                assert cut[-2] - cut[-1] <= NEAR_TIE, (p, pos, reported)
                continue
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
    computed in chunks, preempted and recomputed, with or without steps going ahead (up
    to a near tie of a draw: the two round apart)."""
    prompts = random_prompts(rng, 8)
    params = [SamplingParams(
        n=rng.choice([1, 2]), seed=rng.randrange(2**40), temperature=rng.choice([0.5, 1.0, 1.5]),
        top_k=rng.choice([-1, 5, 1000]), top_p=rng.choice([1.0, 0.8]),
        min_p=rng.choice([0.0, 0.05]), repetition_penalty=rng.choice([1.0, 1.2]),
        presence_penalty=rng.choice([0.0, 0.5]), max_tokens=rng.choice([1, 8, 16]),
        ignore_eos=True, logprobs=0) for _ in prompts]
    alone, drawn_with = sampled_run([roomy_llm.generate(p, sp)[0]
                                     for p, sp in zip(prompts, params)], params)
    llm = tight_llm(async_scheduling)
    order = rng.sample(range(len(prompts)), len(prompts))
    batch = llm.generate([prompts[i] for i in order], [params[i] for i in order])
    got, _ = sampled_run([batch[order.index(i)] for i in range(len(prompts))], params)
    assert_sampled_match(alone, got, drawn_with, llm.engine.vocab_size, worker_device(llm))
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


def with_eos(directory, eos: int) -> str:
    """tiny-llama (its weights, through links) with `eos` as its eos token."""
    source = resolve_model(MODEL)
    for name in os.listdir(source):
        if name in ("config.json", "generation_config.json"):
            with open(os.path.join(source, name)) as f:
                config = json.load(f)
            (directory / name).write_text(json.dumps({**config, "eos_token_id": eos}))
        else:
            os.symlink(os.path.join(source, name), directory / name)
    return str(directory)


def hf_greedy_with_min_tokens(hf_tiny_llama, prompt: list[int], params: SamplingParams,
                              eos: int) -> tuple[list[int], list[dict[int, float]]]:
    """transformers' greedy tokens with the stop tokens' logits at -inf for the first
    min_tokens steps, ending at a stop token; the top 3 logprobs at each step."""
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else {eos})
    tokens, logprobs = [], []
    with torch.no_grad():
        while len(tokens) < params.max_tokens:
            logits = hf_tiny_llama(torch.tensor([prompt + tokens])).logits[0, -1].float()
            if len(tokens) < params.min_tokens:
                logits[list(stops)] = float("-inf")
            values, ids = logits.log_softmax(-1).topk(3)
            logprobs.append(dict(zip(ids.tolist(), values.tolist())))
            tokens.append(int(ids[0]))
            if tokens[-1] in stops:
                break
    return tokens, logprobs


def min_tokens_case(roomy_llm, rng: random.Random, tmp_path):
    """Prompts whose greedy tokens, run freely, hit the eos or a stop token id before
    min_tokens: the first prompt's token at step j < min_tokens becomes the model's eos
    (a copy of tiny-llama with that eos), the others stop on their own token at step k <
    min_tokens; one of those ignores eos. Returns the model, prompts, params and eos."""
    prompts = random_prompts(rng, 4)
    free = roomy_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12,
                                                      ignore_eos=True))
    params, eos = [], None
    for i, tokens in enumerate(completions(free)):
        step = tokens.index(tokens[rng.randrange(4)])   # its first occurrence
        if eos is None:
            eos, stop_ids = tokens[step], []
        else:
            stop_ids = [tokens[step]]
        params.append(SamplingParams(temperature=0.0, max_tokens=12, logprobs=3,
                                     min_tokens=rng.randint(step + 1, 10),
                                     stop_token_ids=stop_ids, ignore_eos=i == 3))
    return with_eos(tmp_path, eos), prompts, params, eos


def assert_min_tokens_hold(outputs, params: list[SamplingParams], eos: int) -> None:
    for output, p in zip(outputs, params):
        out = output.outputs[0]
        assert len(out.token_ids) >= p.min_tokens, (p, list(out.token_ids))
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else {eos})
        assert not stops & set(out.token_ids[:p.min_tokens])
        assert out.finish_reason == ("stop" if out.token_ids[-1] in stops else "length")


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached(hf_tiny_llama, roomy_llm,
                                                               rng, tmp_path):
    """Where the free greedy run ends (eos or a stop token id) before min_tokens, the
    sequence goes on with the tokens transformers picks once those ids are masked, in
    chunks and with steps going ahead or not."""
    model, prompts, params, eos = min_tokens_case(roomy_llm, rng, tmp_path)
    llm = LLM(model, block_size=4, num_kv_blocks=64, max_model_len=96,
              max_num_batched_tokens=8, max_num_seqs=8, async_scheduling=rng.random() < 0.5)
    outputs = llm.generate(prompts, params)
    assert_min_tokens_hold(outputs, params, eos)
    expected = [hf_greedy_with_min_tokens(hf_tiny_llama, prompt, p, eos)
                for prompt, p in zip(prompts, params)]
    assert_greedy_match(expected, [(list(o.outputs[0].token_ids), list(o.outputs[0].logprobs))
                                   for o in outputs])
    assert_all_free(llm.engine)


@pytest.mark.usefixtures("no_process_left_behind")
def test_min_tokens_under_tensor_parallelism_matches_one_rank(roomy_llm, rng, tmp_path):
    """The workers of a TP2 engine mask the same tokens (its first rank samples, and under
    async scheduling counts the token it sampled ahead of the engine)."""
    model, prompts, params, eos = min_tokens_case(roomy_llm, rng, tmp_path)
    reference = LLM(model, block_size=4, num_kv_blocks=64, max_model_len=96,
                    async_scheduling=True)
    expected = reference.generate(prompts, params)
    reference.shutdown()
    llm = LLM(model, block_size=4, num_kv_blocks=64, max_model_len=96, device="cpu",
              tensor_parallel_size=2, async_scheduling=True)
    try:
        outputs = llm.generate(prompts, params)
    finally:
        llm.shutdown()
    assert_min_tokens_hold(outputs, params, eos)
    assert_greedy_match([(list(o.outputs[0].token_ids), list(o.outputs[0].logprobs))
                         for o in expected],
                        [(list(o.outputs[0].token_ids), list(o.outputs[0].logprobs))
                         for o in outputs])

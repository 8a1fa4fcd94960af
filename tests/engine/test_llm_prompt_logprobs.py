"""Prompt logprobs end to end on tiny-llama (fp32, CPU) against the log-softmax of
transformers' logits: prompts computed in chunks, sharing a cached prefix with an earlier
request, preempted and recomputed, and under TP2 and PP2 engines."""

from __future__ import annotations

import random

import pytest
import torch

from fake_engine_checks import assert_all_free
from shardline import LLM, SamplingParams

MODEL = "tiny-llama"
TOLERANCE = 1e-4


def random_prompt(rng: random.Random, low: int = 1, high: int = 40) -> list[int]:
    return [rng.randrange(3, 320) for _ in range(rng.randint(low, high))]


def assert_prompt_logprobs(hf_tiny_llama, prompt: list[int], reported, k: int) -> None:
    """One entry per prompt token: None, then the token's logprob and the k best, each the
    log-softmax of transformers' logits at the position before."""
    with torch.no_grad():
        reference = hf_tiny_llama(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    assert reported is not None and len(reported) == len(prompt)
    assert reported[0] is None
    for i, entry in enumerate(reported[1:], start=1):
        expected = reference[i - 1]
        assert prompt[i] in entry and k <= len(entry) <= k + 1, (i, entry)
        got = torch.tensor(list(entry.values()))
        assert torch.allclose(got, expected[list(entry)], atol=TOLERANCE), (i, entry)
        if k:   # the k best, up to rounding
            kth = sorted(entry.values(), reverse=True)[k - 1]
            assert kth >= expected.topk(k).values[-1] - TOLERANCE


def test_chunked_prompts_give_each_token_once(hf_tiny_llama, rng):
    """8 tokens a step: every prompt longer than that is computed over several steps, and
    the batch mixes requests that ask with some that do not."""
    llm = LLM(MODEL, block_size=4, num_kv_blocks=128, max_model_len=96,
              max_num_batched_tokens=8, max_num_seqs=8, async_scheduling=rng.random() < 0.5)
    prompts = [random_prompt(rng) for _ in range(6)]
    ks = [rng.choice([None, 0, 1, 5]) for _ in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 4), prompt_logprobs=k,
                             n=rng.choice([1, 2])) for k in ks]
    for prompt, k, output in zip(prompts, ks, llm.generate(prompts, params)):
        if k is None:
            assert output.prompt_logprobs is None
        else:
            assert_prompt_logprobs(hf_tiny_llama, prompt, output.prompt_logprobs, k)
    assert_all_free(llm.engine)


def test_a_shared_cached_prefix_is_computed_again_only_for_the_request_that_asks(
        hf_tiny_llama, rng):
    llm = LLM(MODEL, block_size=4, num_kv_blocks=128, max_model_len=96)
    prefix = random_prompt(rng, 12, 24)
    first, asking, plain = (prefix + random_prompt(rng, 1, 8) for _ in range(3))
    greedy = SamplingParams(temperature=0.0, max_tokens=2)
    llm.generate([first], greedy)
    k = rng.randint(0, 4)
    (scored,) = llm.generate([asking], SamplingParams(temperature=0.0, max_tokens=2,
                                                      prompt_logprobs=k))
    assert scored.num_cached_tokens == 0
    assert_prompt_logprobs(hf_tiny_llama, asking, scored.prompt_logprobs, k)
    (cached,) = llm.generate([plain], greedy)
    assert cached.num_cached_tokens >= len(prefix) // 4 * 4 > 0
    assert cached.prompt_logprobs is None
    assert_all_free(llm.engine)


def test_preempted_requests_report_each_prompt_token_once(hf_tiny_llama, rng):
    """A cache of 16 blocks of 4 for eight requests of up to 40 prompt tokens: sequences
    are preempted, some while prefilling, and their prompts computed again."""
    llm = LLM(MODEL, block_size=4, num_kv_blocks=16, max_model_len=64,
              max_num_batched_tokens=16, max_num_seqs=8)
    prompts = [random_prompt(rng, 10, 40) for _ in range(8)]
    ks = [rng.randint(0, 3) for _ in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 16), ignore_eos=True,
                             prompt_logprobs=k) for k in ks]
    outputs = llm.generate(prompts, params)
    assert llm.stats.num_preemptions > 0
    for prompt, k, output in zip(prompts, ks, outputs):
        assert_prompt_logprobs(hf_tiny_llama, prompt, output.prompt_logprobs, k)
    assert_all_free(llm.engine)


@pytest.mark.usefixtures("no_process_left_behind")
@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2),
                                    dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_tensor_and_pipeline_parallel_engines(hf_tiny_llama, rng, layout):
    """TP2 gathers the vocabulary's halves on its first rank, PP2 computes the logits on its
    last stage; both send the prompt logprobs back with the step's tokens."""
    prompts = [random_prompt(rng, 2, 40) for _ in range(4)]
    ks = [rng.randint(0, 5) for _ in prompts]
    llm = LLM(MODEL, block_size=4, num_kv_blocks=64, max_model_len=96, device="cpu",
              max_num_batched_tokens=16, max_num_seqs=8, **layout)
    try:
        outputs = llm.generate(prompts, [SamplingParams(max_tokens=2, prompt_logprobs=k)
                                         for k in ks])
    finally:
        llm.shutdown()
    for prompt, k, output in zip(prompts, ks, outputs):
        assert_prompt_logprobs(hf_tiny_llama, prompt, output.prompt_logprobs, k)


def test_prompts_of_one_token_and_of_the_whole_context(hf_tiny_llama, rng):
    """A one-token prompt has nothing to score ([None]); a prompt filling max_model_len
    (one token to generate, a random chunk size) is scored to its last token."""
    max_model_len = rng.randint(24, 64)
    llm = LLM(MODEL, block_size=4, num_kv_blocks=64, max_model_len=max_model_len,
              max_num_batched_tokens=rng.randint(8, 2 * max_model_len), max_num_seqs=8)
    single, whole = random_prompt(rng, 1, 1), random_prompt(rng, max_model_len, max_model_len)
    k = rng.randint(0, 5)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=k)
    one, full = llm.generate([single, whole], params)
    assert one.prompt_logprobs == [None] and len(one.outputs[0].token_ids) == 1
    assert_prompt_logprobs(hf_tiny_llama, whole, full.prompt_logprobs, k)
    assert_all_free(llm.engine)

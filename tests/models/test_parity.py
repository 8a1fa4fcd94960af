"""Parity with Hugging Face transformers on the same checkpoints (fp32; on a GPU machine
the worker runs on the GPU, with the Triton kernels)."""

import pytest
import torch

from near_ties import (MOE_TOP, assert_greedy_match, assert_logits_close, driver_run,
                       hf_greedy, hf_prompt_logits, is_moe)
from shardline.sampling_params import SamplingParams
from worker_driver import WorkerDriver, make_worker


ARCHITECTURES = ["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-mistral", "tiny-mixtral",
                 "tiny-qwen2-moe"]


def _prompts(count: int, lengths: tuple[int, int]) -> list[list[int]]:
    return [torch.randint(3, 259, (int(torch.randint(*lengths, (1,))),)).tolist()
            for _ in range(count)]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_prompt_logits_match_transformers(name, hf_model, fresh_seed):
    hf = hf_model(name)
    driver = WorkerDriver(make_worker(name, block_size=4))
    prompts = _prompts(4, (5, 60))
    ours = driver.prompt_logits(prompts)
    for i, (prompt, logits) in enumerate(zip(prompts, ours)):
        assert_logits_close(logits, hf_prompt_logits(hf, prompt), f"{name}, prompt {i}")


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_decode_step_logits_match_transformers(name, hf_model, fresh_seed):
    """Prompts prefilled up to 17 tokens, the rest fed one per decode step: the decode
    path's logits (decode attention, split-K GEMMs) against transformers'."""
    hf = hf_model(name)
    driver = WorkerDriver(make_worker(name, block_size=4))
    prompts = _prompts(4, (20, 50))
    for i, (prompt, logits) in enumerate(zip(prompts, driver.forced_logits(prompts, 17))):
        assert_logits_close(logits, hf_prompt_logits(hf, prompt), f"{name}, prompt {i}")


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_greedy_tokens_match_transformers(name, hf_model, fresh_seed):
    hf = hf_model(name)
    driver = WorkerDriver(make_worker(name, block_size=4))
    prompts = _prompts(5, (3, 40))
    ours = driver.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32,
                                                   logprobs=MOE_TOP), token_budget=48)
    assert_greedy_match([hf_greedy(hf, prompt, 32) for prompt in prompts], driver_run(*ours),
                        moe=is_moe(hf))

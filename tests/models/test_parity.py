"""Parity with Hugging Face transformers on the same checkpoints (fp32, CPU)."""

import pytest
import torch

from shardline.sampling_params import SamplingParams
from worker_driver import WorkerDriver, make_worker


ARCHITECTURES = ["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-mistral", "tiny-mixtral",
                 "tiny-qwen2-moe"]


def _prompts(count: int, lengths: tuple[int, int]) -> list[list[int]]:
    return [torch.randint(3, 259, (int(torch.randint(*lengths, (1,))),)).tolist()
            for _ in range(count)]


def _hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    """Exactly max_new greedy tokens (EOS stopping is off, as in the worker)."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                         max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_prompt_logits_match_transformers(name, hf_model):
    hf = hf_model(name)
    driver = WorkerDriver(make_worker(name, block_size=4))
    prompts = _prompts(4, (5, 60))
    ours = driver.prompt_logits(prompts)
    for prompt, logits in zip(prompts, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        rel = (logits - ref).abs().max() / ref.abs().max()
        assert rel < 1e-4, f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_greedy_tokens_match_transformers(name, hf_model):
    hf = hf_model(name)
    driver = WorkerDriver(make_worker(name, block_size=4))
    prompts = _prompts(5, (3, 40))
    ours, _ = driver.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32),
                              token_budget=48)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == _hf_greedy(hf, prompt, 32)

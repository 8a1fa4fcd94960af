"""Sequence parallelism (Ulysses) against one rank and against transformers, through the
multi-process executor (gloo, fp32, CPU): greedy tokens identical to the one-rank run,
prompt logits within 1e-4 relative of the reference."""

from __future__ import annotations

import pytest
import torch

from shardline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardline.executor.multiproc import MultiProcExecutor
from shardline.presets import resolve_model
from shardline.sampling_params import SamplingParams
from test_parity_parallel import BLOCK_SIZE, NUM_BLOCKS, ExecutorWorker
from worker_driver import WorkerDriver, make_worker

# id: (preset, SP, TP, PP, token budget per step, number of prompts, prompt lengths)
LAYOUTS = {
    "sp2": ("tiny-llama", 2, 1, 1, 48, 4, (3, 40)),
    # 2 KV heads over TP2 leave one per TP rank, which both SP ranks of it keep whole.
    "sp2xtp2": ("tiny-llama", 2, 2, 1, 48, 4, (3, 40)),
    # 2 KV heads over SP4: ranks 0 and 1 keep head 0, ranks 2 and 3 head 1. One prompt, so
    # its decode steps have one token for four ranks: three hold only padding.
    "sp4-shared-kv-heads-one-token-steps": ("tiny-llama", 4, 1, 1, 48, 1, (3, 40)),
    # Prompts longer than the budget: their prefill is chunked over several SP steps.
    "sp2-chunked-long-prompts": ("tiny-qwen2", 2, 1, 1, 16, 3, (40, 60)),
    "sp2xpp2": ("tiny-qwen2", 2, 1, 2, 48, 4, (3, 40)),
    "mixtral-sp2": ("tiny-mixtral", 2, 1, 1, 48, 4, (3, 40)),
}


def _prompts(count: int, lengths: tuple[int, int]) -> list[list[int]]:
    return [torch.randint(3, 259, (int(torch.randint(*lengths, (1,))),)).tolist()
            for _ in range(count)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sp_layout_matches_one_rank_and_transformers(layout, hf_model, fresh_seed):
    preset, sp, tp, pp, budget, count, lengths = LAYOUTS[layout]
    model = resolve_model(preset)
    config = EngineConfig(ModelConfig(model, dtype="float32"),
                          CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS),
                          SchedulerConfig(),
                          ParallelConfig(sequence_parallel_size=sp, tensor_parallel_size=tp,
                                         pipeline_parallel_size=pp, device="cpu"))
    prompts = _prompts(count, lengths)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    expected, _ = WorkerDriver(make_worker(model, block_size=BLOCK_SIZE)).generate(
        prompts, params, token_budget=budget)
    executor = MultiProcExecutor(config)
    try:
        driver = WorkerDriver(ExecutorWorker(executor))
        tokens, _ = driver.generate(prompts, params, token_budget=budget)
        assert tokens == expected
        hf = hf_model(model)
        for prompt, logits in zip(prompts, driver.prompt_logits(prompts)):
            with torch.no_grad():
                ref = hf(torch.tensor([prompt])).logits[0]
            rel = (logits - ref).abs().max() / ref.abs().max()
            assert rel < 1e-4, f"{layout}: relative error {rel:.2e}"
    finally:
        executor.shutdown()

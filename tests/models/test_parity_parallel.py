"""Every TP/PP layout against one rank and against transformers, through the multi-process
executor (gloo, fp32, CPU): greedy tokens identical to the one-rank run, prompt logits
within 1e-4 relative of the reference."""

from __future__ import annotations

import pytest
import torch

from shardline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardline.executor.multiproc import MultiProcExecutor
from shardline.presets import build_variant, resolve_model
from shardline.sampling_params import SamplingParams
from worker_driver import WorkerDriver, make_worker

BLOCK_SIZE, NUM_BLOCKS = 4, 256

# id: (preset, config overrides, TP, PP, layers per stage or None for the balanced split)
LAYOUTS = {
    "tp2": ("tiny-llama", {}, 2, 1, None),
    "tp4-replicated-kv-heads": ("tiny-llama", {}, 4, 1, None),  # 2 KV heads over 4 ranks
    "tp2-odd-vocab": ("tiny-llama", {"vocab_size": 321}, 2, 1, None),
    "pp2-tied-embeddings": ("tiny-llama3", {}, 1, 2, None),
    "pp3-uneven": ("tiny-llama", {"num_hidden_layers": 5}, 1, 3, [1, 3, 1]),
    "tp2xpp2": ("tiny-qwen2", {"num_hidden_layers": 3}, 2, 2, None),
    "mixtral-tp2": ("tiny-mixtral", {}, 2, 1, None),
    "mixtral-tp2xpp2": ("tiny-mixtral", {}, 2, 2, None),
    "qwen2-moe-tp2": ("tiny-qwen2-moe", {}, 2, 1, None),
    "qwen2-moe-tp2xpp2": ("tiny-qwen2-moe", {}, 2, 2, None),
}


class ExecutorWorker:
    """The part of the Worker interface WorkerDriver uses, served by an executor."""

    def __init__(self, executor: MultiProcExecutor) -> None:
        self.executor = executor
        self.config = executor.config
        self.model_runner = self

    def determine_num_kv_blocks(self) -> int:
        return self.executor.num_kv_blocks

    def execute_model(self, scheduler_output):
        return self.executor.execute_model(scheduler_output)

    def score(self, scheduler_output) -> dict[str, torch.Tensor]:
        replies = self.executor.collective_rpc("score", (scheduler_output.to_dict(),))
        return replies[self.config.parallel.output_rank]


def _prompts(count: int, lengths: tuple[int, int]) -> list[list[int]]:
    return [torch.randint(3, 259, (int(torch.randint(*lengths, (1,))),)).tolist()
            for _ in range(count)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_rank_and_transformers(layout, hf_model, fresh_seed):
    preset, overrides, tp, pp, stages = LAYOUTS[layout]
    model = build_variant(preset, **overrides) if overrides else resolve_model(preset)
    config = EngineConfig(ModelConfig(model, dtype="float32"),
                          CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS),
                          SchedulerConfig(),
                          ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                         pipeline_stage_layers=stages, device="cpu"))
    prompts = _prompts(4, (3, 40))
    params = SamplingParams(temperature=0.0, max_tokens=12)
    expected, _ = WorkerDriver(make_worker(model, block_size=BLOCK_SIZE)).generate(
        prompts, params, token_budget=48)
    executor = MultiProcExecutor(config)
    try:
        driver = WorkerDriver(ExecutorWorker(executor))
        tokens, _ = driver.generate(prompts, params, token_budget=48)
        assert tokens == expected
        hf = hf_model(model)
        for prompt, logits in zip(prompts, driver.prompt_logits(prompts)):
            with torch.no_grad():
                ref = hf(torch.tensor([prompt])).logits[0]
            rel = (logits - ref).abs().max() / ref.abs().max()
            assert rel < 1e-4, f"{layout}: relative error {rel:.2e}"
    finally:
        executor.shutdown()

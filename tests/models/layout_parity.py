"""The check every multi-rank layout test makes: greedy tokens identical to one rank's and
prompt logits within 1e-4 relative of transformers, through the multi-process executor."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from near_ties import (MOE_TOP, assert_greedy_match, assert_logits_close, driver_run,
                       hf_prompt_logits, is_moe)
from shardline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardline.executor.multiproc import MultiProcExecutor
from shardline.sampling_params import SamplingParams
from worker_driver import WorkerDriver, make_worker

BLOCK_SIZE, NUM_BLOCKS = 4, 256


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


def random_prompts(count: int, lengths: tuple[int, int]) -> list[list[int]]:
    return [torch.randint(3, 259, (int(torch.randint(*lengths, (1,))),)).tolist()
            for _ in range(count)]


@contextlib.contextmanager
def matching_layout(model: str, parallel: ParallelConfig, prompts: list[list[int]],
                    hf_model: Callable, max_tokens: int = 12, token_budget: int = 48
                    ) -> Iterator[MultiProcExecutor]:
    """Run `prompts` greedily on one rank and on `parallel` (tokens must be equal, but at a
    near tie: tests/near_ties.py), check the layout's prompt logits against transformers,
    then yield its executor for more checks; it is shut down afterwards."""
    config = EngineConfig(ModelConfig(model, dtype="float32"),
                          CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS),
                          SchedulerConfig(), parallel)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=MOE_TOP)
    expected = WorkerDriver(make_worker(model, block_size=BLOCK_SIZE)).generate(
        prompts, params, token_budget=token_budget)
    hf = hf_model(model)
    executor = MultiProcExecutor(config)
    try:
        driver = WorkerDriver(ExecutorWorker(executor))
        got = driver.generate(prompts, params, token_budget=token_budget)
        assert_greedy_match(driver_run(*expected), driver_run(*got), moe=is_moe(hf))
        for i, (prompt, logits) in enumerate(zip(prompts, driver.prompt_logits(prompts))):
            assert_logits_close(logits, hf_prompt_logits(hf, prompt), f"prompt {i}")
        yield executor
    finally:
        executor.shutdown()


def assert_layout_matches(model: str, parallel: ParallelConfig, prompts: list[list[int]],
                          hf_model: Callable, max_tokens: int = 12,
                          token_budget: int = 48) -> None:
    """matching_layout, with no further checks."""
    with matching_layout(model, parallel, prompts, hf_model, max_tokens, token_budget):
        pass

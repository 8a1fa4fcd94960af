"""Workers without a model, for testing the executors' plumbing in spawned processes.

The executor builds them by dotted path (`ParallelConfig.worker_cls`), so they live in a
module of their own that the spawned processes can import.
"""

from __future__ import annotations

import logging
import os
import time

from shardline.step import ModelRunnerOutput, SchedulerOutput

NUM_KV_BLOCKS = 8


class StubWorker:
    """Answers every setup call; `execute_model` samples token 1000 + rank per request."""

    def __init__(self, config, rank: int = 0, distributed_init_method: str | None = None):
        self.config, self.rank = config, rank

    def init_device(self) -> None:
        pass

    def load_model(self) -> None:
        pass

    def determine_num_kv_blocks(self) -> int:
        return NUM_KV_BLOCKS + self.rank

    def initialize_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks

    def warm_up(self) -> None:
        pass

    def identity(self) -> list:
        return [self.rank, os.getpid(), self.num_blocks]

    def echo(self, value, *, scale: int = 1):
        return value * scale

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def crash(self) -> float:
        return 1 / 0

    def unsendable(self) -> object:
        return {self.rank, object()}

    def sleep(self, seconds: float) -> int:
        time.sleep(seconds)
        return self.rank

    def hold(self, directory: str, seconds: float) -> int:
        """`sleep`, after leaving a file named after this rank in `directory`: a sign
        that the rank is inside the call."""
        open(os.path.join(directory, str(self.rank)), "w").close()
        return self.sleep(seconds)

    def environ(self, name: str) -> str | None:
        return os.environ.get(name)

    def log(self, message: str) -> None:
        logging.getLogger("shardline.test").warning(message)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        req_ids = list(scheduler_output.num_scheduled_tokens)
        return ModelRunnerOutput(req_ids=req_ids,
                                 sampled_token_ids=[1000 + self.rank] * len(req_ids),
                                 logprobs=[None] * len(req_ids))


class CrashOnStepWorker(StubWorker):
    """Raises inside execute_model on rank 1, as a worker whose forward pass fails."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self.rank == 1:
            raise RuntimeError("forward failed on purpose")
        return super().execute_model(scheduler_output)


class SlowStepWorker(StubWorker):
    """Takes 3 s over every step, so that steps are still in flight when a test kills a
    worker."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        time.sleep(3.0)
        return super().execute_model(scheduler_output)

"""One worker, in the engine's own process: no IPC, no collectives."""

from __future__ import annotations

from typing import Any

from shardline.executor.base import Executor, StepFuture
from shardline.step import ModelRunnerOutput, SchedulerOutput
from shardline.worker.worker_class import import_worker_class


class UniProcExecutor(Executor):
    """Calls the single Worker's methods directly."""

    def _start_workers(self) -> None:
        self.worker = import_worker_class(self.config.parallel.worker_cls)(self.config, rank=0)

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       timeout: float | None = None) -> list[Any]:
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def execute_model(self, scheduler_output: SchedulerOutput, non_block: bool = False
                      ) -> ModelRunnerOutput | StepFuture:
        """Run the step; with `non_block`, return once its work is queued on the device
        and read the tokens when the future is waited on."""
        if not non_block:
            return self.worker.execute_model(scheduler_output)
        read = self.worker.queue_step(scheduler_output)
        future = StepFuture(lambda deadline: future.set_result(read()))
        return future

    @property
    def hides_host_time(self) -> bool:
        return self.worker.device.type == "cuda"

    def shutdown(self) -> None:
        self.worker = None

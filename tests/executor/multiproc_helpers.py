"""The helpers the executor tests share: an engine config over model-free stub workers,
the worlds of ranks they start (tensor- or data-parallel) and a decode step to send."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from shardline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardline.executor import worker_group
from shardline.executor.data_parallel import create_data_parallel_executors
from shardline.executor.multiproc import MultiProcExecutor
from shardline.presets import resolve_model
from shardline.step import CachedRequestData, CachedRequests, SchedulerOutput

# A Ray node agent signals its ranks after the report is logged: this long after, at most,
# however slowly the call travels on a loaded machine.
AGENT_SIGNAL_S = 1.0


def make_config(worker: str = "StubWorker", **parallel) -> EngineConfig:
    return EngineConfig(ModelConfig(resolve_model("tiny-llama")), CacheConfig(),
                        SchedulerConfig(),
                        ParallelConfig(distributed_executor_backend="mp", device="cpu",
                                       worker_cls=worker if "." in worker
                                       else f"stub_workers.{worker}", **parallel))


WORLDS = {"tp2": dict(tensor_parallel_size=2), "dp2": dict(data_parallel_size=2)}


def start_world(config: EngineConfig) -> list[MultiProcExecutor]:
    """The started executors of `config`'s world of ranks: one per data-parallel core."""
    if config.parallel.data_parallel_size > 1:
        return create_data_parallel_executors(config)
    return [MultiProcExecutor(config)]


def step(*req_ids: str) -> SchedulerOutput:
    """A decode step of `req_ids`, one token each."""
    return SchedulerOutput(
        cached_requests=CachedRequests.of(CachedRequestData(r, [1], [], 0) for r in req_ids),
        num_scheduled_tokens={r: 1 for r in req_ids})


def step_times(directory: Path, ranks: int) -> list[tuple[float, float]]:
    """(begun, ended) of the step each of `ranks` ranks noted in `directory` (the
    step_times_dir fixture). A rank that is not the output rank may note its step just after
    the output rank's reply came back: they are waited for."""
    deadline = time.monotonic() + 30
    while True:
        notes = [path.read_text() for path in directory.iterdir()]
        if len(notes) == ranks and all(note.endswith("\n") for note in notes):
            break
        assert time.monotonic() < deadline, f"{len(notes)} of {ranks} ranks noted a step"
        time.sleep(0.01)
    return [tuple(float(t) for t in line.split()) for note in notes for line in note.splitlines()]


def slow_step_reports(records: list[logging.LogRecord], sent: float,
                      steps: list[tuple[float, float]], signal_after: float = 0.0
                      ) -> tuple[list[str], int]:
    """The slow-step reports among `records`, of SlowStepWorker steps sent at `sent`
    (time.time()), and how many of them signalled every rank inside its step, by the
    ranks' `steps` (step_times). Report k (from 0) signals the ranks once the step has
    waited SLOW_STEP_S * 2**k, and before it is logged, or (`signal_after`) that much
    later at most. A rank may begin its step late on a loaded machine, and a late report
    may find it past the step: the test cannot ask a stack in `execute_model` of either."""
    begun, ended = max(step[0] for step in steps), min(step[1] for step in steps)
    reports = [r for r in records if "a step has waited" in r.getMessage()]
    inside = sum(sent + worker_group.SLOW_STEP_S * 2**k >= begun
                 and report.created + signal_after <= ended
                 for k, report in enumerate(reports))
    print(f"the ranks began their steps {begun - sent:.2f} s after they were sent; "
          f"{inside} of {len(reports)} reports came inside")
    return [r.getMessage() for r in reports], inside


def slow_step_reports_of_core_0(cores: list, caplog, directory: Path,
                                signal_after: float = 0.0) -> tuple[int, int]:
    """Send a step to every data-parallel core and read core 0's first, as the engine
    does, while the others' still run; the slow-step reports logged meanwhile, and how
    many signalled every rank inside its step (`slow_step_reports`, by the step times the
    ranks noted in `directory`). Every step answers."""
    sent = time.time()
    futures = [core.execute_model(step(f"r{i}"), non_block=True)
               for i, core in enumerate(cores)]
    with caplog.at_level(logging.WARNING, logger="shardline"):
        assert futures[0].result().req_ids == ["r0"]
    records = list(caplog.records)
    assert [future.result().req_ids for future in futures] == [[f"r{i}"] for i in
                                                                range(len(cores))]
    steps = step_times(directory, sum(core.num_workers for core in cores))
    reports, inside = slow_step_reports(records, sent, steps, signal_after)
    return len(reports), inside

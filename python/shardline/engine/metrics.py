"""Engine metrics: what an LLMEngine records as it steps, and the plain dict that
`LLM.metrics()`, `AsyncLLM.metrics()` and the server's /metrics report.

Step time is the engine's time per step from sending it to the executor until its outputs
are processed; with several steps in flight (pipeline parallelism) a step counts from
when the one before it was collected, so the times add up to the busy time. Token rates
are over the last RATE_WINDOW_S seconds. Under the multi-process executor every rank also
reports its own `execute_model` times (see Worker.step_time_stats): one collective_rpc,
which first waits for the steps in flight, so a scrape costs one pipeline drain.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any, Callable

from shardline.engine.outputs import RequestOutput
from shardline.step_times import StepTimes, summarize

if TYPE_CHECKING:
    from shardline.engine.data_parallel import DataParallelEngine
    from shardline.engine.llm_engine import LLMEngine

RATE_WINDOW_S = 10.0
RANK_STATS_TIMEOUT_S = 30.0


class EngineMetrics:
    """Step times, token counts and finished completions of one LLMEngine."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.step_times = StepTimes()
        self.generation_tokens = 0
        self.computed_tokens = 0
        # Completions (sequences) finished, by finish reason: stop, length, abort.
        self.finished: collections.Counter[str] = collections.Counter()
        self._sent: collections.deque[float] = collections.deque()
        self._last_collected = float("-inf")
        self._first_step: float | None = None
        # (time, generated tokens, computed tokens) per step in the rate window.
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque()

    def step_sent(self) -> None:
        self._sent.append(self.clock())

    def step_collected(self, computed_tokens: int, outputs: list[RequestOutput],
                       generated_tokens: int) -> None:
        """A step came back: `computed_tokens` went through the model and
        `generated_tokens` were sampled; `outputs` are the requests that gained tokens."""
        now = self.clock()
        sent = self._sent.popleft() if self._sent else now
        self.step_times.record(now - max(sent, self._last_collected))
        self._last_collected = now
        if self._first_step is None:
            self._first_step = sent
        self.generation_tokens += generated_tokens
        self.computed_tokens += computed_tokens
        self._recent.append((now, generated_tokens, computed_tokens))
        self._drop_old(now)
        for output in outputs:
            if output.finished:
                self.request_finished(output)

    def request_finished(self, output: RequestOutput) -> None:
        self.finished.update(c.finish_reason for c in output.outputs if c.finish_reason)

    def rates(self) -> tuple[float, float]:
        """(generated, computed) tokens per second over the last RATE_WINDOW_S seconds, or
        since the first step if that is more recent."""
        now = self.clock()
        self._drop_old(now)
        if self._first_step is None:
            return 0.0, 0.0
        span = min(RATE_WINDOW_S, now - self._first_step)
        if span <= 0:
            return 0.0, 0.0
        return (sum(r[1] for r in self._recent) / span, sum(r[2] for r in self._recent) / span)

    def _drop_old(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()


def engine_metrics(engine: LLMEngine | DataParallelEngine, per_rank: bool = True
                   ) -> dict[str, Any]:
    """The metrics of an engine (a data-parallel one: of all its cores together) as a plain
    dict; see the module docstring. Call it where stepping the engine is safe (the thread
    that owns it), since it reads the scheduler and, with `per_rank`, calls the workers.

    Keys: num_requests_running / num_requests_waiting (a request with n > 1 runs while any
    of its sequences does), kv_blocks_used / kv_blocks_total / kv_usage, prefix_cache_hit_rate
    (prompt tokens found in the cache over prompt tokens looked up; None before any lookup),
    num_preemptions, num_steps, generation_tokens_total, computed_tokens_total,
    generation_tokens_per_s, computed_tokens_per_s, finished_completions (by finish reason),
    step_time_s (count and sum over all steps; mean, p50, p90, p99, max over the last
    1024, in seconds), and under the multi-process executor step_time_per_rank_s (the
    same per global rank, with "rank").
    """
    from shardline.executor.multiproc import MultiProcExecutor

    cores = getattr(engine, "cores", [engine])
    running_ids = {seq.request_id for core in cores for seq in core.scheduler.running}
    num_requests = sum(len(core.outputs.requests) for core in cores)
    used = sum(core.kv.num_blocks - core.kv.num_free_blocks for core in cores)
    total = sum(core.kv.num_blocks for core in cores)
    looked_up = sum(core.stats.num_lookup_tokens for core in cores)
    hits = sum(core.stats.num_cached_tokens for core in cores)
    finished: collections.Counter[str] = collections.Counter()
    for core in cores:
        finished.update(core.step_metrics.finished)
    rates = [core.step_metrics.rates() for core in cores]
    metrics = {
        "num_requests_running": len(running_ids),
        "num_requests_waiting": num_requests - len(running_ids),
        "kv_blocks_used": used,
        "kv_blocks_total": total,
        "kv_usage": used / total,
        "prefix_cache_hit_rate": hits / looked_up if looked_up else None,
        "num_preemptions": sum(core.stats.num_preemptions for core in cores),
        "num_steps": sum(core.stats.num_steps for core in cores),
        "generation_tokens_total": sum(core.step_metrics.generation_tokens for core in cores),
        "computed_tokens_total": sum(core.step_metrics.computed_tokens for core in cores),
        "generation_tokens_per_s": sum(r[0] for r in rates),
        "computed_tokens_per_s": sum(r[1] for r in rates),
        "finished_completions": {reason: finished[reason]
                                 for reason in ("stop", "length", "abort")},
        "step_time_s": summarize(
            [t for core in cores for t in core.step_metrics.step_times.samples()],
            sum(core.step_metrics.step_times.count for core in cores),
            sum(core.step_metrics.step_times.total for core in cores)),
    }
    if per_rank and any(isinstance(core.executor, MultiProcExecutor) for core in cores):
        ranks = []
        for core in cores:
            replies = core.collective_rpc("step_time_stats", timeout=RANK_STATS_TIMEOUT_S)
            first = core.executor.first_rank
            ranks += [dict(rank=first + i, **reply) for i, reply in enumerate(replies)]
        metrics["step_time_per_rank_s"] = ranks
    return metrics


def stopped_engine_metrics(engine: LLMEngine | DataParallelEngine) -> dict[str, Any]:
    """The metrics of an engine that failed or was shut down: its counters, without the
    per-rank step times (its workers are dead or gone), and no request running or waiting
    nor KV block in use, since each request ended with the engine and the KV cache went
    with it (the scheduler, which stepped no more, still counts them)."""
    metrics = engine_metrics(engine, per_rank=False)
    metrics["num_requests_running"] = metrics["num_requests_waiting"] = 0
    metrics["kv_blocks_used"], metrics["kv_usage"] = 0, 0.0
    return metrics

"""The offline run: every request submitted at once, the engine stepped until all finish."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from shardline.benchmark.progress import ProgressBar
from shardline.benchmark.results import RequestRecord, summarize
from shardline.benchmark.workload import Workload
from shardline.engine.llm import LLM
from shardline.executor.base import EngineDeadError
from shardline.sampling_params import SamplingParams


@dataclass
class RunResult:
    """What a run measured: its requests, wall time, peak KV-cache use (a share of the
    blocks, read after every step, or in an online run whenever a request's output grows;
    None when the target does not expose it), preemptions, and whether Ctrl-C cut it
    short."""

    records: list[RequestRecord]
    elapsed_s: float
    peak_kv_usage: float | None = None
    preemptions: int | None = None
    interrupted: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def all_failed(self) -> bool:
        """Every request failed: the run measured nothing."""
        return all(record.error is not None for record in self.records)

    def summary(self) -> dict:
        return {**summarize(self.records, self.elapsed_s), "peak_kv_usage": self.peak_kv_usage,
                "preemptions": self.preemptions, "interrupted": self.interrupted, **self.extra}


def run_offline(llm: LLM, workload: Workload, progress: bool = False) -> RunResult:
    """Submit every request, step until all finish, and time each one. Greedy with
    ignore_eos, so each request produces exactly its max_tokens. Ctrl-C stops the run
    and keeps what was measured (the unfinished requests are aborted)."""
    engine = llm.engine
    preempted_before = engine.stats.num_preemptions
    start = time.perf_counter()
    records: dict[str, RequestRecord] = {}
    for i, (prompt, max_tokens) in enumerate(zip(workload.prompts, workload.max_tokens)):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        _, ids = engine.encode_prompt(prompt, params)
        llm.add_request(f"bench-{i}", ids, params)
        records[f"bench-{i}"] = RequestRecord(arrival=0.0, prompt_tokens=len(ids))
    # Tokens, not requests: requests of like lengths all finish near the end, and a bar of
    # them sat at 0 for most of the run.
    bar = ProgressBar(workload.total_output_tokens, "output tokens", enabled=progress)
    peak = 0.0
    interrupted = False
    try:
        while llm.has_unfinished_requests():
            outputs = llm.step()
            now = time.perf_counter() - start
            peak = max(peak, kv_share_in_use(engine))
            for out in outputs:
                record = records[out.request_id]
                made = len(out.outputs[0].token_ids)
                bar.update(made - record.output_tokens)
                record.output_tokens = made
                if record.first_token is None and record.output_tokens:
                    record.first_token = now
                if out.finished:
                    record.done = now
    except KeyboardInterrupt:
        interrupted = True
        # Ctrl-C inside a step leaves the LLM dead, its requests with it: nothing to abort.
        with contextlib.suppress(EngineDeadError):
            for request_id, record in records.items():
                if record.done is None:
                    llm.abort_request(request_id)
    elapsed = time.perf_counter() - start
    bar.close()
    return RunResult(list(records.values()), elapsed, peak_kv_usage=peak,
                     preemptions=engine.stats.num_preemptions - preempted_before,
                     interrupted=interrupted)


def kv_share_in_use(engine) -> float:
    """The share of the engine's KV blocks in use (of all its cores, if data-parallel):
    a few integer reads, cheap enough for every step, and safe from another thread
    under the GIL."""
    cores = getattr(engine, "cores", [engine])
    total = sum(core.kv.num_blocks for core in cores)
    return sum(core.kv.num_blocks - core.kv.num_free_blocks for core in cores) / total

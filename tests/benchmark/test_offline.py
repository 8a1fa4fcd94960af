"""The offline run on tiny-llama: its peak KV-cache use is the largest of every step's."""

import itertools
from types import SimpleNamespace

from shardline.benchmark import offline
from shardline.benchmark.workload import Workload
from shardline.engine.llm import LLM


def test_peak_kv_use_is_read_after_every_step(rng, monkeypatch):
    """It was read at most every 50 ms, and missed the peak of a run whose use grows at
    every step to its last but one (blocks of one token; every request decodes the same
    length, so all end together). The run's clock ticks a microsecond a reading, as the
    steps of a fast device would."""
    monkeypatch.setenv("SHARDLINE_DISABLE_TRITON", "1")
    ticks = itertools.count()
    clock = SimpleNamespace(perf_counter=lambda: next(ticks) * 1e-6)
    monkeypatch.setattr(offline, "time", clock)
    count = rng.randint(3, 8)
    output_len = rng.randint(24, 40)
    workload = Workload([[rng.randrange(8, 300) for _ in range(rng.randint(1, 12))]
                         for _ in range(count)], [output_len] * count)
    with LLM("tiny-llama", device="cpu", block_size=1, num_kv_blocks=1024) as llm:
        step = llm.step
        after_each_step = []

        def step_and_read():
            outputs = step()
            kv = llm.engine.kv
            after_each_step.append((kv.num_blocks - kv.num_free_blocks) / kv.num_blocks)
            return outputs
        monkeypatch.setattr(llm, "step", step_and_read)
        result = offline.run_offline(llm, workload)
    assert result.summary()["finished_requests"] == count
    assert len(after_each_step) >= output_len
    assert result.peak_kv_usage == max(after_each_step) > 0

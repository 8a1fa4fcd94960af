"""The executor's own time per step: MultiProcExecutor against UniProcExecutor, no model.

Every rank runs `NoOpWorker`, whose execute_model only builds the reply, so what is timed
is the executor: encoding the step, the broadcast ring to every worker, decoding it there,
the output rank's reply on its response ring, and decoding that. The step is a decode
batch of `--batch` requests (one new token each, as the engine sends in steady state).

    python bench/executor.py             # 1, 2 and 4 workers; 5 runs of 2000 steps
    python bench/executor.py --quick     # 1 and 2 workers; 3 runs of 300 steps

Results: bench/results/executor.json and .png (`--out-dir` elsewhere). The numbers are
medians over runs of the mean time per step; "added" is MultiProc minus UniProc, measured
in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _machine import machine_info

from shardline.step import CachedRequests, ModelRunnerOutput, SchedulerOutput

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_ADDED_US_AT_2 = 50.0


class NoOpWorker:
    """A rank without a model: answers setup calls, samples token 7 for every request."""

    def __init__(self, config, rank: int = 0, distributed_init_method: str | None = None):
        self.rank = rank

    def init_device(self) -> None:
        pass

    def load_model(self) -> None:
        pass

    def determine_num_kv_blocks(self) -> int:
        return 1024

    def initialize_cache(self, num_blocks: int) -> None:
        pass

    def warm_up(self) -> None:
        pass

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        ids = scheduler_output.req_ids
        return ModelRunnerOutput(req_ids=ids, sampled_token_ids=[7] * len(ids),
                                 logprobs=[None] * len(ids))


def decode_step(batch: int, step: int) -> SchedulerOutput:
    """Step `step` of steady decode: every request brings its last sampled token, and the
    one in 16 whose sequence crosses a 16-token block boundary brings a new block."""
    reqs = CachedRequests()
    for i in range(batch):
        reqs.append(f"req-{i}", [100 + step], [] if (step + i) % 16 else [i * 64 + step],
                    200 + step)
    return SchedulerOutput(cached_requests=reqs,
                           num_scheduled_tokens={r: 1 for r in reqs.req_ids})


def make_executor(workers: int | None, backend: str = "mp"):
    """UniProc when `workers` is None, else `backend` ("mp" or "ray") with that many TP
    ranks."""
    from shardline.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig,
                                  SchedulerConfig)
    from shardline.executor import create_executor
    from shardline.presets import resolve_model

    parallel = ParallelConfig(worker_cls="executor.NoOpWorker", device="cpu",
                              tensor_parallel_size=workers or 1,
                              distributed_executor_backend="uni" if workers is None else backend)
    # A real checkpoint only for the layout check: tiny-llama's 4 heads take TP 1, 2 and 4.
    return create_executor(EngineConfig(ModelConfig(resolve_model("tiny-llama")),
                                        CacheConfig(), SchedulerConfig(), parallel))


def time_steps(executor, batch: int, steps: int, runs: int) -> list[float]:
    """Mean microseconds per step, one value per run (after a warm-up run)."""
    plans = [decode_step(batch, s) for s in range(steps)]
    per_run = []
    for run in range(runs + 1):
        start = time.perf_counter()
        for so in plans:
            out = executor.execute_model(so)
        elapsed = time.perf_counter() - start
        assert len(out.req_ids) == batch
        if run:
            per_run.append(elapsed / steps * 1e6)
    return per_run


def time_executor(workers: int | None, batch: int, steps: int, runs: int,
                  backend: str = "mp") -> list[float]:
    """`time_steps` on a new executor from `make_executor`, shut down afterwards."""
    executor = make_executor(workers, backend)
    try:
        return time_steps(executor, batch, steps, runs)
    finally:
        executor.shutdown()


def codec_us(batch: int, repeats: int = 2000) -> dict:
    """Microseconds per step spent encoding and decoding it, in this process: the engine's
    encode of the step, a worker's decode, and the reply's encode and decode. Steady, unlike
    the end-to-end time, which on a machine with fewer cores than processes also measures
    the scheduler."""
    from shardline.ipc.serializer import Decoder, Encoder

    encoder, decoder = Encoder(), Decoder()
    so, worker = decode_step(batch, 16), NoOpWorker(None)

    def frame(obj: object) -> bytearray:
        return bytearray(b"".join(bytes(part) for part in encoder.encode(obj)))

    step_frame = frame([0, "execute_model", [so.to_dict()], {}, 0])
    reply_frame = frame([0, True, worker.execute_model(so).to_dict()])
    stages = {
        "engine_encode": lambda: encoder.encode([0, "execute_model", [so.to_dict()], {}, 0]),
        "worker_decode": lambda: SchedulerOutput.from_dict(decoder.decode(step_frame)[2][0]),
        "reply_encode": lambda: encoder.encode([0, True, worker.execute_model(so).to_dict()]),
        "reply_decode": lambda: ModelRunnerOutput.from_dict(decoder.decode(reply_frame)[2]),
    }
    result = {}
    for name, stage in stages.items():
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                stage()
            runs.append((time.perf_counter() - start) / repeats * 1e6)
        result[name] = statistics.median(runs)
    result["total"] = sum(result.values())
    return result


def measure(worker_counts: list[int], batch: int, steps: int, runs: int) -> dict:
    uni = time_executor(None, batch, steps, runs)
    rows = [{"executor": "uniproc", "workers": 1, "us_per_step": statistics.median(uni),
             "runs_us": uni}]
    for n in worker_counts:
        times = time_executor(n, batch, steps, runs)
        median = statistics.median(times)
        rows.append({"executor": "multiproc", "workers": n, "us_per_step": median,
                     "added_us": median - rows[0]["us_per_step"], "runs_us": times})
        print(f"multiproc {n} workers: {median:7.1f} us/step "
              f"(+{median - rows[0]['us_per_step']:.1f} us over uniproc)", flush=True)
    codec = codec_us(batch)
    print("wire codec per step: " + ", ".join(f"{k} {v:.1f} us" for k, v in codec.items()),
          flush=True)
    return {"bench": "executor", "batch": batch, "steps_per_run": steps, "runs": runs,
            "target_added_us_at_2_workers": TARGET_ADDED_US_AT_2, "codec_us": codec,
            "machine": {**machine_info("the engine and every worker share these cores with "
                                       "any other work on the machine", {}),
                        "load_average_at_end": os.getloadavg()},
            "rows": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['executor']}\n{r['workers']} worker(s)" for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(labels, [r["us_per_step"] for r in rows], color=["grey"] + ["C0"] * (len(rows) - 1))
    ax.axhline(rows[0]["us_per_step"] + TARGET_ADDED_US_AT_2, color="C3", linestyle="--",
               label=f"uniproc + {TARGET_ADDED_US_AT_2:.0f} us (target at 2 workers)")
    ax.set_ylabel("executor time per step (us)")
    ax.set_title(f"no-op model, decode batch of {result['batch']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(doc: str, quick: str) -> argparse.Namespace:
    """The options of the executor benches: --quick (`quick` says what it cuts), --batch
    and --out-dir; the description is the first paragraph of `doc`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--batch", type=int, default=32, help="requests per decode step")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser.parse_args()


def main() -> int:
    args = parse_args(__doc__, "fewer workers, runs and steps")
    workers, steps, runs = ([1, 2], 300, 3) if args.quick else ([1, 2, 4], 2000, 5)
    print("uniproc baseline ...", file=sys.stderr, flush=True)
    result = measure(workers, args.batch, steps, runs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "executor.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out_dir / "executor.png")
    print(f"uniproc: {result['rows'][0]['us_per_step']:.1f} us/step; results in "
          f"{args.out_dir / 'executor.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

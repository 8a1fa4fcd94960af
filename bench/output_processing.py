"""Host time per step of turning sampled tokens into outputs, early and 2k tokens in.

Each step the engine appends every sampled token to its sequence, detokenizes it, checks
the stop conditions and builds the request's cumulative RequestOutput. None of that should
grow with the number of tokens already generated, or a long generation slows down step by
step on the host while the device waits. Here the engine runs over a model-free executor
(it samples random printable bytes: the model's time is not part of this) with the
`tiny-llama` byte-level tokenizer, decodes 2048 tokens per request, and times the
output processing (`OutputProcessor.process`) and the scheduler's update of every step.
Reported: the median per-step time over the first 64 decode steps and over the last 64
(output tokens 1985-2048), for batch 1 and 16, with and without logprobs (top 5).

    python bench/output_processing.py            # 5 runs per row
    python bench/output_processing.py --quick    # 1 run, 512 tokens
    python bench/output_processing.py --runs 3 --batches 1,16,64

Results: bench/results/output_processing.json and .png (`--out-dir` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from shardline.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig,
                              SchedulerConfig)
from shardline.engine.llm_engine import LLMEngine
from shardline.engine.tokenizer import Tokenizer
from shardline.presets import resolve_model
from shardline.sampling_params import SamplingParams
from shardline.step import ModelRunnerOutput, SchedulerOutput, TokenLogprobs

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_LEN = 16
WINDOW = 64          # decode steps per reported window
BLOCK_SIZE = 16
PRINTABLE = range(3 + 32, 3 + 127)   # byte tokens of printable ASCII in the preset vocabulary


class ModelFreeExecutor:
    """Stands in for the workers: a random printable token (and made-up logprobs when the
    request asks) for every sequence that reaches a sampling point."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.num_kv_blocks = num_blocks
        self.rng = random.Random(seed)
        self.lengths: dict[str, int] = {}
        self.top: dict[str, int | None] = {}

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in so.finished_req_ids:
            self.lengths.pop(req_id, None)
        for new in so.new_requests:
            self.lengths[new.req_id] = len(new.prompt_token_ids) + len(new.output_token_ids)
            self.top[new.req_id] = new.sampling_params["logprobs"]
        for cached in so.cached_requests:
            self.lengths[cached.req_id] += len(cached.new_token_ids)
        out = ModelRunnerOutput()
        for req in [*so.new_requests, *so.cached_requests]:
            done = req.num_computed_tokens + so.num_scheduled_tokens[req.req_id]
            if done != self.lengths[req.req_id]:
                continue
            token = self.rng.choice(PRINTABLE)
            top = self.top[req.req_id]
            out.req_ids.append(req.req_id)
            out.sampled_token_ids.append(token)
            out.logprobs.append(None if top is None else TokenLogprobs(
                -0.5, [self.rng.choice(PRINTABLE) for _ in range(top)], [-1.0] * top))
        return out

    def shutdown(self) -> None:
        self.lengths.clear()


def make_engine(batch: int, max_len: int, seed: int) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(model="model-free", max_model_len=max_len),
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=batch * -(-max_len // BLOCK_SIZE)),
        scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=2048),
        parallel=ParallelConfig())
    info = SimpleNamespace(vocab_size=320, max_position_embeddings=max_len, eos_token_ids=[2])
    executor = ModelFreeExecutor(config.cache.num_blocks, seed)
    return LLMEngine(config, executor, info, Tokenizer.from_model_dir(resolve_model("tiny-llama")))


def timed(fn, into: list[float]):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)
    return wrapper


def measure(batch: int, logprobs: int | None, tokens: int, seed: int) -> dict:
    """One run: `batch` requests decode `tokens` tokens each; per-step times in us."""
    engine = make_engine(batch, PROMPT_LEN + tokens + 1, seed)
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, logprobs=logprobs)
    for i in range(batch):
        engine.add_request(f"r{i}", [rng.choice(PRINTABLE) for _ in range(PROMPT_LEN)], params)
    process_s: list[float] = []
    update_s: list[float] = []
    engine.outputs.process = timed(engine.outputs.process, process_s)
    engine.scheduler.update = timed(engine.scheduler.update, update_s)
    steps = 0
    while engine.has_unfinished_requests():
        if len(engine.step()) != batch:
            raise RuntimeError(f"a step did not advance all {batch} requests")
        steps += 1
    if steps != tokens:
        raise RuntimeError(f"{steps} steps for {tokens} tokens per request")
    engine.shutdown()

    def window(times: list[float], start: int) -> float:
        return statistics.median(times[start:start + WINDOW]) * 1e6

    # Step 0 is the prefill (and the first token); decode steps follow.
    return {"outputs_us": [window(process_s, 1), window(process_s, tokens - WINDOW)],
            "update_us": [window(update_s, 1), window(update_s, tokens - WINDOW)],
            "outputs_us_by_step": [t * 1e6 for t in process_s]}


def bench(batches: tuple[int, ...], tokens: int, runs: int) -> list[dict]:
    rows = []
    for logprobs in (None, 5):
        for batch in batches:
            results = [measure(batch, logprobs, tokens, seed) for seed in range(runs)]
            early = statistics.median(r["outputs_us"][0] for r in results)
            late = statistics.median(r["outputs_us"][1] for r in results)
            rows.append({
                "batch": batch, "logprobs": logprobs,
                "outputs_us_early": early, "outputs_us_late": late,
                "outputs_us_runs": [[round(v, 1) for v in r["outputs_us"]] for r in results],
                "update_us_early": statistics.median(r["update_us"][0] for r in results),
                "update_us_late": statistics.median(r["update_us"][1] for r in results),
                "outputs_us_by_step": results[0]["outputs_us_by_step"]})
            print(f"batch {batch:3d} logprobs {logprobs!s:4s}: outputs {early:8.1f} us/step at "
                  f"the start, {late:8.1f} us/step at {tokens} tokens", file=sys.stderr,
                  flush=True)
    return rows


def plot(rows: list[dict], tokens: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        by_step = r["outputs_us_by_step"][1:]
        bins = [statistics.median(by_step[i:i + WINDOW]) for i in range(0, len(by_step), WINDOW)]
        ax.plot([i * WINDOW + WINDOW // 2 for i in range(len(bins))], bins,
                label=f"batch {r['batch']}, logprobs {r['logprobs']}")
    ax.set_xlabel("output tokens so far")
    ax.set_ylabel("output processing per step (us, median of 64 steps)")
    ax.set_title(f"shardline output processing per step, up to {tokens} tokens (CPU)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run, 512 tokens")
    parser.add_argument("--runs", type=int, default=None, help="runs per row (default 5)")
    parser.add_argument("--batches", default="1,16", help="comma-separated (default 1,16)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    tokens, runs = (512, 1) if args.quick else (2048, 5)
    runs = args.runs or runs
    if runs < 1:
        sys.exit(f"--runs={runs} is invalid: must be >= 1")
    rows = bench(tuple(int(b) for b in args.batches.split(",")), tokens, runs)
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "prompt_len": PROMPT_LEN, "tokens": tokens,
              "window_steps": WINDOW, "runs": runs,
              "results": [{k: v for k, v in r.items() if k != "outputs_us_by_step"}
                          for r in rows]}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "output_processing.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, tokens, args.out_dir / "output_processing.png")
    print(f"{'batch':>5} {'logprobs':>8} {'us/step early':>14} {f'us/step at {tokens}':>15} "
          f"{'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:5d} {r['logprobs']!s:>8} {r['outputs_us_early']:14.1f} "
              f"{r['outputs_us_late']:15.1f} {r['outputs_us_late'] / r['outputs_us_early']:6.2f}")
    print(f"wrote {args.out_dir / 'output_processing.json'} and .png")


if __name__ == "__main__":
    main()

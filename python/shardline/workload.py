"""Synthetic offline workloads and the loop that measures the engine on them.

`shardline demo`, `shardline bench` and bench/throughput.py share these so that the
numbers they print mean the same thing: output tokens/s over the whole run, time to first
token (TTFT) and time per output token after the first (TPOT), per request.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

from shardline.engine.llm import LLM
from shardline.sampling_params import SamplingParams

_WORDS = ("the model splits each layer across ranks while the scheduler keeps every "
          "request moving through prefill and decode with paged blocks of cache").split()


@dataclass
class Workload:
    """Prompts (token ids) with a greedy output length each, fixed by a seed."""

    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def total_output_tokens(self) -> int:
        return sum(self.max_tokens)


def make_workload(num_prompts: int, vocab_size: int, seed: int = 0,
                  prompt_len: tuple[int, int] = (16, 256),
                  output_len: tuple[int, int] = (16, 128)) -> Workload:
    """Mixed prompt and output lengths, uniform in the given inclusive ranges."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts} is invalid: must be >= 1")
    for name, (low, high) in (("prompt_len", prompt_len), ("output_len", output_len)):
        if not 1 <= low <= high:
            raise ValueError(f"{name}=({low}, {high}) is invalid: need 1 <= low <= high")
    rng = random.Random(seed)
    # Avoid the lowest ids, where tokenizers keep their special tokens.
    low_id = min(8, vocab_size - 1)
    prompts = [[rng.randrange(low_id, vocab_size) for _ in range(rng.randint(*prompt_len))]
               for _ in range(num_prompts)]
    max_tokens = [rng.randint(*output_len) for _ in range(num_prompts)]
    return Workload(prompts, max_tokens)


def demo_prompts(count: int) -> list[str]:
    """Short readable prompts for the demo."""
    rng = random.Random(count)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
            for _ in range(count)]


@dataclass
class RunStats:
    """What one offline run measured; times in seconds."""

    elapsed_s: float
    output_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    def summary(self) -> dict:
        return {
            "elapsed_s": self.elapsed_s,
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": self.output_tokens_per_s,
            "ttft_s": percentiles(self.ttft_s),
            "tpot_s": percentiles(self.tpot_s),
        }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": statistics.median(ordered), "p90": pick(0.9), "p99": pick(0.99),
            "mean": statistics.fmean(ordered)}


def run_offline(llm: LLM, workload: Workload, progress: bool = False) -> RunStats:
    """Submit every request at once, step until all finish, and time each request.

    Greedy with ignore_eos, so every request produces exactly its max_tokens.
    """
    start = time.perf_counter()
    first_token: dict[str, float] = {}
    done: dict[str, float] = {}
    produced: dict[str, int] = {}
    for i, (prompt, max_tokens) in enumerate(zip(workload.prompts, workload.max_tokens)):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.add_request(f"bench-{i}", prompt, params)
    while llm.has_unfinished_requests():
        for out in llm.step():
            now = time.perf_counter()
            produced[out.request_id] = len(out.outputs[0].token_ids)
            if produced[out.request_id] and out.request_id not in first_token:
                first_token[out.request_id] = now
            if out.finished:
                done[out.request_id] = now
                if progress:
                    print(f"\r  finished {len(done)}/{len(workload.prompts)} requests",
                          end="", flush=True)
    elapsed = time.perf_counter() - start
    if progress:
        print()
    tpot = [(done[r] - first_token[r]) / (produced[r] - 1) for r in done if produced[r] > 1]
    return RunStats(elapsed_s=elapsed, output_tokens=sum(produced.values()),
                    ttft_s=[t - start for t in first_token.values()], tpot_s=tpot)

"""The sampler's time per step for batches that mask, bias or penalize, against the sampler
of an earlier commit, both in this process.

The sampler wrote each mask (min_tokens' stop ids, allowed_token_ids), bias and penalty
into a new [N, V] fp32 tensor: at 256 rows over a 151,936-token vocabulary, 155 MB copied
for one stop id a row. Now it writes them into the logits the model runner hands over
(`overwrite=True`). Here both samplers get the same fresh logits each run (made outside the
timed call), the runs alternate between them round after round, and the tokens and
logprobs of both are checked equal. The earlier sampler is sampler.py and token_sets.py
as `--against` (a git revision of this repository) has them. Cases, greedy unless said:
256 rows plain and with one stop id each (min_tokens), 64 sampled rows (temperature 0.8,
logprobs 2) with one stop id each, 8 rows x 151,000 stop ids, 8 x 32,000 biases, 8 x
100,000 allowed ids, 64 rows with repetition and frequency penalties.

    python bench/sampler_masks.py                       # against ba49036, 9 runs a case
    python bench/sampler_masks.py --against 4f32615 --runs 7 --threads 1 --cases stop1_256

Results: bench/results/sampler_masks.json (`--out` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

import shardline.layers.sampler as current  # noqa: E402
import shardline.layers.token_sets as current_sets  # noqa: E402
from shardline.sampling_params import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 151_936
LAYER = "shardline.layers"
BEFORE = "ba49036"   # the sampler's last commit before it wrote into the logits it is given


def load_revision(rev: str) -> tuple[types.ModuleType, types.ModuleType]:
    """The sampler and token_sets modules as `rev` has them (a revision since token_sets.py
    was split out of sampler.py), under names of their own: the package's stay as they
    are."""
    loaded = []
    for name in ("token_sets", "sampler"):
        path = f"python/shardline/layers/{name}.py"
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
                                check=True, capture_output=True, text=True).stdout
        module = types.ModuleType(f"_at_{rev}_{name}")
        sys.modules[module.__name__] = module
        saved = sys.modules[f"{LAYER}.token_sets"]
        if loaded:   # the old sampler imports the old token_sets
            sys.modules[f"{LAYER}.token_sets"] = loaded[0]
        try:
            exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
        finally:
            sys.modules[f"{LAYER}.token_sets"] = saved
        loaded.append(module)
    return loaded[1], loaded[0]


def cases(rng: np.random.Generator) -> dict[str, tuple[int, Callable[[types.ModuleType],
                                                                      dict]]]:
    """name -> (rows, the SamplingBatch arguments given a version's token_sets module: made
    once per case, as a worker makes a request's sets once)."""
    stop1 = lambda rows: [[int(t)] for t in rng.integers(VOCAB, size=rows)]  # noqa: E731
    greedy = SamplingParams(temperature=0.0)
    sampled = SamplingParams(temperature=0.8, logprobs=2)

    def blocked(rows: int, count: int) -> Callable[[types.ModuleType], dict]:
        ids = [rng.choice(VOCAB, count, replace=False) for _ in range(rows)]
        return lambda m: {"params": [greedy] * rows,
                          "blocked_token_ids": [m.BlockedTokens(i) for i in ids]}

    def biased(rows: int, bias: int, allowed: int) -> Callable[[types.ModuleType], dict]:
        params = [SamplingParams(
            temperature=0.0,
            logit_bias={int(t): 1.5 for t in rng.choice(VOCAB, bias, replace=False)} or None,
            allowed_token_ids=rng.choice(VOCAB, allowed, replace=False).tolist() or None)
            for _ in range(rows)]
        return lambda m: {"params": params, "token_bias": [m.TokenBias.of(p) for p in params]}

    stops = {n: stop1(n) for n in (64, 256)}
    penalized = SamplingParams(temperature=0.0, repetition_penalty=1.2,
                               frequency_penalty=0.3)
    return {
        "plain_256": (256, lambda m: {"params": [greedy] * 256}),
        "stop1_256": (256, lambda m: {"params": [greedy] * 256,
                                      "blocked_token_ids": stops[256]}),
        "stop1_sampled_64": (64, lambda m: {"params": [sampled] * 64,
                                            "blocked_token_ids": stops[64]}),
        "stops151k_8": (8, blocked(8, 151_000)),
        "bias32k_8": (8, biased(8, 32_000, 0)),
        "allowed100k_8": (8, biased(8, 0, 100_000)),
        "penalties_64": (64, lambda m: {"params": [penalized] * 64,
                                        "output_token_ids": [list(range(32))] * 64}),
    }


def run_case(versions: dict[str, tuple[types.ModuleType, types.ModuleType]], rows: int,
             make: Callable, runs: int, warmup: int) -> dict:
    """Median ms of each version's sampler call over `runs` alternating rounds; the tokens
    and logprobs of every version checked equal to the first's."""
    base = torch.randn(rows, VOCAB) * 4
    times: dict[str, list[float]] = {name: [] for name in versions}
    results: dict[str, object] = {}
    made = {name: make(token_sets) for name, (_, token_sets) in versions.items()}
    for rep in range(warmup + runs):
        for name, (sampler, _) in versions.items():
            args = dict(made[name])
            params = args.pop("params")
            n = len(params)
            batch = sampler.SamplingBatch(params, [[1, 2]] * n,
                                          args.pop("output_token_ids", [[]] * n),
                                          [torch.Generator().manual_seed(7 + i)
                                           for i in range(n)], **args)
            logits = base.clone()
            kwargs = {"overwrite": True} if sampler is current else {}
            start = time.perf_counter()
            result = sampler.Sampler()(logits, batch, **kwargs).to_host()
            elapsed = (time.perf_counter() - start) * 1e3
            if rep >= warmup:
                times[name].append(elapsed)
            results.setdefault(name, result)
    first = next(iter(results.values()))
    return {"rows": rows, "same_results": all(r == first for r in results.values()),
            **{f"{name}_ms": statistics.median(t) for name, t in times.items()},
            **{f"{name}_ms_runs": [round(x, 2) for x in t] for name, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default=BEFORE,
                        help="git revision of the old sampler (default: the last before it "
                             "wrote in place)")
    parser.add_argument("--runs", type=int, default=9, help="timed rounds per case (>= 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--cases", nargs="*", help="names of cases to run (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/sampler_masks.json")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs={args.runs} is invalid: must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.against],
                         check=True, capture_output=True, text=True).stdout.strip()
    versions = {"old": load_revision(rev), "new": (current, current_sets)}
    table = cases(np.random.default_rng(0))
    unknown = set(args.cases or ()) - set(table)
    if unknown:
        parser.error(f"--cases {sorted(unknown)} unknown: choose from {sorted(table)}")
    machine = machine_info("shared with other work; see the load average",
                           {"torch": torch.__version__, "torch_threads": torch.get_num_threads()})
    rows = []
    print(f"{'case':<18} {'rows':>5} {'old ms':>9} {'new ms':>9} {'same':>5}")
    for name in args.cases or table:
        row = {"case": name, **run_case(versions, *table[name], args.runs, args.warmup)}
        rows.append(row)
        print(f"{name:<18} {row['rows']:>5} {row['old_ms']:>9.2f} {row['new_ms']:>9.2f} "
              f"{str(row['same_results']):>5}", flush=True)
    result = {"command": " ".join(["sampler_masks.py", *sys.argv[1:]]), "against": rev,
              "vocab": VOCAB, "runs": args.runs,
              "machine": {**machine, "load_average_at_end": os.getloadavg()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if not all(r["same_results"] for r in rows):
        sys.exit("the samplers disagree on some case's tokens or logprobs (see same_results)")


if __name__ == "__main__":
    main()

"""Prefill of one long prompt: sequence parallelism (Ulysses) against TP at the same world
size, and one rank.

Each layout serves one prompt of `--prompt-len` tokens that generates one token, so the
run is the prompt's prefill (chunked by `max_num_batched_tokens`) plus a sample. The
layouts start first, then run in turns (a warm-up run each, then R timed rounds), so load
drift hits them alike. Reported per layout, medians over rounds: the prefill time, and the
bytes each rank sent per prompt token (counted by the ranks' communicators); the generated
token is compared with one rank's.

    python bench/sequence_parallel.py            # small-llama fp32, 1024-token prompt, 3 rounds
    python bench/sequence_parallel.py --quick    # tiny-llama, 96 tokens, 1 round

Results: bench/results/sequence_parallel.json (`--out-dir` elsewhere). Every rank runs on
the CPU: with more ranks than cores the processes share them, so these numbers show the
layouts' communication and overhead, not a speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = {"uni": (1, 1), "tp2": (2, 1), "sp2": (1, 2), "tp4": (4, 1), "sp4": (1, 4),
           "tp2xsp2": (2, 2)}   # name: (TP, SP)
BLOCK_SIZE = 16


def start(model: str, tp: int, sp: int, prompt_len: int, budget: int):
    from shardline import LLM

    return LLM(model, dtype="float32", device="cpu", tensor_parallel_size=tp,
               sequence_parallel_size=sp, block_size=BLOCK_SIZE,
               num_kv_blocks=-(-(prompt_len + 1) // BLOCK_SIZE), max_num_batched_tokens=budget,
               max_num_seqs=4, enable_prefix_caching=False)


def run_once(llm, prompt: list[int], tag: str) -> dict:
    from shardline import SamplingParams

    engine = llm.engine
    engine.collective_rpc("comm_stats", kwargs={"reset": True})
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    started = time.perf_counter()
    output = llm.generate([prompt], params)[0]
    elapsed = time.perf_counter() - started
    sent = [sum(sum(c["bytes_sent"].values()) for c in stats.values())
            for stats in engine.collective_rpc("comm_stats")]
    return {"prefill_s": elapsed, "token": output.outputs[0].token_ids[0],
            "bytes_per_prompt_token_per_rank": [b / len(prompt) for b in sent]}


def measure(model: str, names: list[str], prompt_len: int, budget: int, rounds: int) -> dict:
    import torch

    prompt = torch.randint(3, 250, (prompt_len,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    llms = {}
    try:
        for name in names:
            tp, sp = LAYOUTS[name]
            began = time.perf_counter()
            llms[name] = start(model, tp, sp, prompt_len, budget)
            print(f"{name}: started in {time.perf_counter() - began:.1f} s", flush=True)
        runs = {name: [] for name in names}
        for round_index in range(rounds + 1):
            for name in names:
                run = run_once(llms[name], prompt, f"{name}-{round_index}")
                if round_index:
                    runs[name].append(run)
            print(f"round {round_index}/{rounds} done", flush=True)
    finally:
        for llm in llms.values():
            llm.engine.shutdown()
    reference = runs[names[0]][0]["token"]
    rows = []
    for name in names:
        tp, sp = LAYOUTS[name]
        times = [r["prefill_s"] for r in runs[name]]
        rows.append({"layout": name, "tp": tp, "sp": sp, "ranks": tp * sp,
                     "prefill_s": statistics.median(times), "prefill_s_runs": times,
                     "bytes_per_prompt_token_per_rank":
                         runs[name][-1]["bytes_per_prompt_token_per_rank"],
                     "token_matches_first_layout": all(r["token"] == reference
                                                       for r in runs[name])})
    return {"bench": "sequence_parallel", "model": model, "prompt_len": prompt_len,
            "max_num_batched_tokens": budget, "rounds": rounds,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_average": os.getloadavg()},
            "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-llama, 96 tokens, 1 round")
    parser.add_argument("--layouts", default=None,
                        help=f"comma-separated subset of {','.join(LAYOUTS)}")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    names = args.layouts.split(",") if args.layouts else list(LAYOUTS)
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        parser.error(f"--layouts: unknown {unknown}; known: {', '.join(LAYOUTS)}")
    if args.quick:
        result = measure("tiny-llama", [n for n in names if LAYOUTS[n][0] * LAYOUTS[n][1] <= 2],
                         96, 32, 1)
    else:
        result = measure("small-llama", names, 1024, 512, 3)
    result["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "sequence_parallel.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'layout':<10} {'ranks':>5} {'prefill s':>10} {'max bytes/token/rank':>21}")
    for row in result["rows"]:
        print(f"{row['layout']:<10} {row['ranks']:>5} {row['prefill_s']:>10.3f} "
              f"{max(row['bytes_per_prompt_token_per_rank']):>21.0f}")
    print(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

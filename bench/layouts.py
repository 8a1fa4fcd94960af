"""Throughput, step time and communication of each CPU layout of one model.

Every layout (one rank, TP2, PP2, TP2xPP2, TP4, and DP2 and DP2xTP2: two engine cores
of one and of two TP ranks) serves the same offline workload: N
prompts of one fixed length, all submitted at once, each generating exactly M tokens
greedily (ignore_eos). All layouts are started first and then run in turns (a warm-up
run each, then R timed rounds, one run of every layout per round), so that a change in
the machine's load hits every layout alike. Reported per layout, as medians over the
rounds: output tokens/s, the engine's time per step (median step of a run; the mean is
kept too; under DP a step is one step of every core, run at once) and the bytes each rank
sent through its communicators per generated token (of the whole engine),
counted by the ranks themselves (Worker.comm_stats through collective_rpc). The greedy
tokens of every run are compared with the first layout's.

    python bench/layouts.py            # small-llama fp32, 16 prompts x (64 in, 32 out), 3 rounds
    python bench/layouts.py --quick    # tiny-llama, 4 prompts x (16 in, 8 out), 1 round
    python bench/layouts.py --moe      # small-moe (Mixtral, 8 experts top-2): TP against
                                       # EP with each dispatch path, at 2 and 4 ranks

With --moe the results go to layouts_moe.json and .png; an "ep" layout is TP with
enable_expert_parallel (DP = SP = 1, so the EP group is the TP group): attention
TP-split, each rank owning whole experts, tokens moved by `expert_dispatch`.

Results: bench/results/layouts.json and .png (`--out-dir` elsewhere). Every rank runs on
the CPU (SHARDLINE_DEVICE=cpu); with more ranks than cores the processes share cores, so
on a small machine the numbers show the layouts' overhead, not their speedup.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# name: (TP, PP, expert dispatch path or None without expert parallelism[, DP])
LAYOUTS = {"uni": (1, 1, None), "tp2": (2, 1, None), "pp2": (1, 2, None),
           "tp2xpp2": (2, 2, None), "tp4": (4, 1, None), "dp2": (1, 1, None, 2),
           "dp2xtp2": (2, 1, None, 2)}
MOE_LAYOUTS = {"uni": (1, 1, None), "tp2": (2, 1, None), "ep2-all_to_all": (2, 1, "all_to_all"),
               "ep2-all_gather": (2, 1, "all_gather"), "tp4": (4, 1, None),
               "ep4-all_to_all": (4, 1, "all_to_all"), "ep4-all_gather": (4, 1, "all_gather")}
BLOCK_SIZE = 16
# A Mixtral with Mixtral's routing (8 experts, top 2) at small-llama's width and depth/2.
SMALL_MOE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_local_experts=8)


def start_layout(model: str, tp: int, pp: int, dispatch: str | None, dp: int,
                 num_prompts: int, seq_len: int):
    """An LLM for the layout, with a KV cache fixed to what the workload needs (the same
    for every layout, so none preempts; under DP, per core) and prefix caching off (every
    run prefills)."""
    from dataclasses import replace

    from shardline import LLM
    from shardline.engine.data_parallel import create_engine
    from shardline.engine.engine_args import EngineArgs

    blocks = num_prompts * -(-seq_len // BLOCK_SIZE)
    config = EngineArgs(model, dtype="float32", tensor_parallel_size=tp,
                        pipeline_parallel_size=pp, data_parallel_size=dp,
                        max_num_seqs=num_prompts,
                        block_size=BLOCK_SIZE, num_kv_blocks=blocks,
                        enable_prefix_caching=False).to_config()
    if dispatch is not None:
        config.parallel = replace(config.parallel, enable_expert_parallel=True,
                                  expert_dispatch=dispatch)
    return LLM.from_engine(create_engine(config))


def run_once(llm, workload, tag: str) -> dict:
    """Submit the workload, step until it is done; time, steps, tokens and the bytes each
    rank sent during the run."""
    from shardline import SamplingParams

    engine = llm.engine
    engine.collective_rpc("comm_stats", kwargs={"reset": True})
    ids = [f"{tag}-{i}" for i in range(len(workload.prompts))]
    for req_id, prompt, max_tokens in zip(ids, workload.prompts, workload.max_tokens):
        llm.add_request(req_id, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                       ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    step_s = []
    start = time.perf_counter()
    while llm.has_unfinished_requests():
        began = time.perf_counter()
        outputs = llm.step()
        step_s.append(time.perf_counter() - began)
        for out in outputs:
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    stats = engine.collective_rpc("comm_stats")
    output_tokens = sum(len(t) for t in tokens.values())
    steps = len(step_s)  # under DP, one step of every core at once
    return {"elapsed_s": elapsed, "output_tokens": output_tokens,
            "tokens_per_s": output_tokens / elapsed, "steps": steps,
            "step_ms": statistics.median(step_s) * 1e3, "mean_step_ms": elapsed / steps * 1e3,
            "rank_bytes": [rank_bytes(s) for s in stats],
            "tokens": [tokens[i] for i in ids]}


def rank_bytes(stats: dict) -> dict[str, int]:
    """One rank's bytes sent, per "group/operation" (e.g. "tp/all_reduce")."""
    return {f"{group}/{op}": nbytes for group, counters in sorted(stats.items())
            for op, nbytes in sorted(counters["bytes_sent"].items())}


def summarize(name: str, tp: int, pp: int, dispatch: str | None, dp: int, startup_s: float,
              runs: list[dict], reference: list[list[int]], forwarded: int) -> dict:
    """Medians over the timed runs; communication per generated token per rank (and per
    token through the model, `forwarded`: prompt tokens plus fed-back outputs)."""
    last = runs[-1]
    tokens = last["output_tokens"]
    per_rank = []
    for rank, by_op in enumerate(last["rank_bytes"]):
        total = sum(by_op.values())
        per_rank.append({"rank": rank, "bytes_per_token": total / tokens,
                         "bytes_per_forwarded_token": total / forwarded,
                         "by_op_per_token": {op: b / tokens for op, b in by_op.items()}})
    return {
        "layout": name, "tp": tp, "pp": pp, "dp": dp, "ranks": tp * pp * dp,
        "expert_dispatch": dispatch,
        "startup_s": startup_s,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "step_ms": statistics.median(r["step_ms"] for r in runs),
        "mean_step_ms": statistics.median(r["mean_step_ms"] for r in runs),
        "steps": last["steps"], "output_tokens": tokens,
        "tokens_per_s_runs": [r["tokens_per_s"] for r in runs],
        "step_ms_runs": [r["step_ms"] for r in runs],
        "comm_bytes_identical_across_runs": all(r["rank_bytes"] == last["rank_bytes"]
                                                for r in runs),
        "bytes_per_token_per_rank": per_rank,
        "max_rank_bytes_per_token": max((r["bytes_per_token"] for r in per_rank), default=0.0),
        "tokens_match_reference": all(r["tokens"] == reference for r in runs),
        "tokens_sha256": hashlib.sha256(json.dumps(last["tokens"]).encode()).hexdigest(),
    }


def with_dp(layout: tuple) -> tuple:
    """A layout as (TP, PP, dispatch, DP), DP 1 where the layout leaves it out."""
    return layout if len(layout) == 4 else (*layout, 1)


def measure(model: str, layouts: dict[str, tuple], num_prompts: int, prompt_len: int,
            max_tokens: int, rounds: int) -> dict:
    """Every layout of `layouts` (name: (TP, PP, dispatch)) on the same workload; the
    first is the reference whose tokens the others must match."""
    from shardline.models.loader import read_model_info
    from shardline.presets import resolve_model
    from shardline.benchmark.workload import make_workload

    model_dir = resolve_model(model)
    info = read_model_info(model_dir)
    workload = make_workload(num_prompts, info.vocab_size, seed=0,
                             prompt_len=(prompt_len, prompt_len),
                             output_len=(max_tokens, max_tokens))
    load_before = os.getloadavg()
    llms, startup, runs = {}, {}, {name: [] for name in layouts}
    try:
        for name in layouts:
            began = time.perf_counter()
            llms[name] = start_layout(model_dir, *with_dp(layouts[name]), num_prompts,
                                      prompt_len + max_tokens)
            startup[name] = time.perf_counter() - began
            run_once(llms[name], workload, f"{name}-warmup")
            print(f"{name}: started in {startup[name]:.1f} s", file=sys.stderr, flush=True)
        for r in range(rounds):
            for name in layouts:
                runs[name].append(run_once(llms[name], workload, f"{name}-{r}"))
                print(f"round {r + 1}/{rounds} {name}: "
                      f"{runs[name][-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        for llm in llms.values():
            llm.shutdown()
    reference = runs[next(iter(layouts))][0]["tokens"]
    forwarded = num_prompts * (prompt_len + max_tokens - 1)
    rows = [summarize(name, *with_dp(layouts[name]), startup[name], runs[name], reference,
                      forwarded)
            for name in layouts]
    return {"bench": "layouts", "model": model, "dtype": "float32", "device": "cpu",
            "num_prompts": num_prompts, "prompt_len": prompt_len, "max_tokens": max_tokens,
            "forwarded_tokens": forwarded,
            "rounds": rounds, "reference_layout": next(iter(layouts)),
            "model_shape": {"layers": info.num_hidden_layers, "hidden": info.hidden_size,
                            "heads": info.num_attention_heads,
                            "kv_heads": info.num_key_value_heads, "vocab": info.vocab_size,
                            "experts": info.num_experts},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "results": rows}


def print_table(result: dict) -> None:
    print(f"{'layout':>8} {'ranks':>5} {'tok/s':>8} {'step ms':>8} {'max B/tok/rank':>15} "
          f"{'tokens':>7}")
    for r in result["results"]:
        print(f"{r['layout']:>8} {r['ranks']:>5} {r['tokens_per_s']:8.1f} {r['step_ms']:8.2f} "
              f"{r['max_rank_bytes_per_token']:15.0f} "
              f"{'same' if r['tokens_match_reference'] else 'DIFFER':>7}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    labels = [r["layout"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = [("tokens_per_s", "output tokens/s"), ("step_ms", "median step (ms)"),
              ("max_rank_bytes_per_token", "bytes sent per token\n(busiest rank)")]
    for ax, (key, title) in zip(axes, panels):
        ax.bar(labels, [r[key] for r in rows], color=["grey"] + ["C0"] * (len(rows) - 1))
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
    fig.suptitle(f"{result['model']} fp32 on {result['machine']['cpus']} CPU cores: "
                 f"{result['num_prompts']} prompts x ({result['prompt_len']} in, "
                 f"{result['max_tokens']} out), median of {result['rounds']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_layouts(text: str) -> list[str]:
    known = {**LAYOUTS, **MOE_LAYOUTS}
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"layouts {unknown or text!r}: choose from "
                                         f"{', '.join(known)}")
    return names


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: must be >= 1")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny-llama, 4 prompts x (16 in, 8 out), 1 round")
    parser.add_argument("--moe", action="store_true",
                        help="an MoE model (small-moe; tiny-mixtral with --quick) and the "
                        f"layouts {','.join(MOE_LAYOUTS)}")
    parser.add_argument("--model", help="preset or model directory (default: small-llama, "
                        "tiny-llama with --quick)")
    parser.add_argument("--layouts", type=parse_layouts,
                        help=f"comma-separated, the first is the reference (default: "
                        f"{','.join(LAYOUTS)}; with --moe {','.join(MOE_LAYOUTS)})")
    parser.add_argument("--rounds", type=positive_int,
                        help="timed runs per layout (default 3, 1 with --quick)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ["SHARDLINE_DEVICE"] = "cpu"
    if args.quick:
        model, prompts, prompt_len, max_tokens, rounds = "tiny-llama", 4, 16, 8, 1
    else:
        model, prompts, prompt_len, max_tokens, rounds = "small-llama", 16, 64, 32, 3
    label, stem = model, "layouts"
    if args.moe:
        from shardline.presets import build_variant

        model = "tiny-mixtral" if args.quick else build_variant("tiny-mixtral", **SMALL_MOE)
        label = "tiny-mixtral" if args.quick else "small-moe"
        stem = "layouts_moe"
    if args.model:
        model = label = args.model
    rounds = args.rounds or rounds
    table = {**LAYOUTS, **MOE_LAYOUTS}
    names = args.layouts or list(MOE_LAYOUTS if args.moe else LAYOUTS)
    result = measure(model, {name: table[name] for name in names}, prompts, prompt_len,
                     max_tokens, rounds)
    result["model"] = label
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out_dir / f"{stem}.png")
    print_table(result)
    print(f"results in {args.out_dir / f'{stem}.json'}")
    return 0 if all(r["tokens_match_reference"] for r in result["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Paged decode attention on the CPU: the C++ kernel (shardline._cpu_kernels) against the
torch reference it replaced, per call and end to end.

Per call: one decode step's attention (fp32) for a batch of sequences whose lengths are
all the context ("equal") or drawn from [context/8, context] ("mixed", where the
reference's copy padded to the longest costs most), in blocks of 16 scattered over the
cache as a running engine leaves them; the median of many calls, the bytes of K and V
the kernel must read, and the machine's copy bandwidth for scale. End to end: offline
throughput of small-llama on the 64-prompt workload of bench/throughput.py, a fresh LLM
per run, the two paths alternating within each round.

    python bench/cpu_attention.py            # every case, 3 end-to-end rounds (about 3 min)
    python bench/cpu_attention.py --quick    # two small cases, 1 round on tiny-llama

Results: bench/results/cpu_attention.json (`--out` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402
from _timing import Timer, copy_bandwidth  # noqa: E402

from shardline import LLM  # noqa: E402
from shardline.benchmark.offline import run_offline  # noqa: E402
from shardline.benchmark.workload import make_workload  # noqa: E402
from shardline.kernels import cpu_attention, reference  # noqa: E402
from shardline.presets import resolve_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 16
# (name, query heads, KV heads, head size): small-llama's, and Llama-3.2-1B's
MODELS = [("small-llama", 8, 4, 64), ("llama-1b", 32, 8, 64)]


def decode_case(batch: int, context: int, lengths: str, heads: tuple[int, int, int],
                rng: random.Random) -> tuple[tuple, int]:
    """The call's arguments, and the bytes of K and V its sequences hold."""
    num_heads, num_kv_heads, head_dim = heads
    seq_lens = [context if lengths == "equal" else rng.randint(context // 8, context)
                for _ in range(batch)]
    max_blocks = -(-context // BLOCK)
    num_blocks = batch * max_blocks + 1
    k_cache = torch.randn(num_blocks, BLOCK, num_kv_heads, head_dim)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks)[:batch * max_blocks].view(batch, max_blocks).int()
    q = torch.randn(batch, num_heads, head_dim)
    args = (q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32),
            head_dim ** -0.5)
    return args, 2 * sum(seq_lens) * num_kv_heads * head_dim * 4


def per_call(cases: list[tuple], timer: Timer, rng: random.Random) -> list[dict]:
    rows = []
    for model, num_heads, num_kv_heads, head_dim in MODELS:
        for batch, context, lengths in cases:
            args, kv_bytes = decode_case(batch, context, lengths,
                                         (num_heads, num_kv_heads, head_dim), rng)
            ours = timer(lambda i: cpu_attention.paged_decode_attention(*args))
            theirs = timer(lambda i: reference.paged_decode_attention(*args))
            rows.append({"model": model, "batch": batch, "context": context,
                         "lengths": lengths, "kv_bytes": kv_bytes, "cpp_ms": ours,
                         "reference_ms": theirs, "speedup": theirs / ours,
                         "cpp_gb_per_s": kv_bytes / ours / 1e6})
            print(f"{model} batch {batch} context {context} ({lengths}): C++ {ours:.3f} ms "
                  f"({rows[-1]['cpp_gb_per_s']:.1f} GB/s), reference {theirs:.3f} ms, "
                  f"{rows[-1]['speedup']:.2f}x", flush=True)
    return rows


def end_to_end(model: str, num_prompts: int, rounds: int) -> dict:
    """Output tokens/s of fresh-LLM offline runs, the C++ path and the reference
    alternating (the reference by refusing every call the C++ kernel would take)."""
    model_dir = resolve_model(model)
    with open(Path(model_dir) / "config.json") as f:
        vocab_size = json.load(f)["vocab_size"]
    workload = make_workload(num_prompts, vocab_size, seed=0, prompt_len=(16, 256),
                             output_len=(16, 128))
    supports = cpu_attention.supports
    runs: dict[str, list[float]] = {"cpp": [], "reference": []}
    try:
        for r in range(rounds):
            for path in runs:
                cpu_attention.supports = supports if path == "cpp" else (lambda *a: False)
                llm = LLM(model_dir, max_num_seqs=64, max_num_batched_tokens=2048)
                runs[path].append(run_offline(llm, workload).summary()["output_tokens_per_s"])
                llm.shutdown()
                print(f"round {r + 1}/{rounds} {path}: {runs[path][-1]:.1f} tok/s", flush=True)
    finally:
        cpu_attention.supports = supports
    medians = {path: statistics.median(rates) for path, rates in runs.items()}
    return {"model": model, "num_prompts": num_prompts, "rounds": rounds, "runs": runs,
            "median_tokens_per_s": medians, "speedup": medians["cpp"] / medians["reference"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="two small cases and one end-to-end round on tiny-llama")
    parser.add_argument("--out", default=str(RESULTS / "cpu_attention.json"))
    args = parser.parse_args()
    rng = random.Random(0)
    torch.manual_seed(0)
    if args.quick:
        cases = [(4, 64, "mixed"), (1, 128, "equal")]
        timer, e2e = Timer(torch.device("cpu"), 1, 3), ("tiny-llama", 8, 1)
    else:
        cases = [(batch, context, lengths) for batch in (1, 16, 64) for context in (256, 2048)
                 for lengths in ("equal", "mixed")]
        timer, e2e = Timer(torch.device("cpu"), 3, 15), ("small-llama", 64, 3)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info("the kernel and torch each use torch's intra-op threads",
                                {"torch": torch.__version__,
                                 "threads": str(torch.get_num_threads())}),
        "copy_gb_per_s": copy_bandwidth(timer, 256 << 20) / 1e9,
        "per_call": per_call(cases, timer, rng),
        "end_to_end": end_to_end(*e2e),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    e2e_result = result["end_to_end"]
    print(f"copy bandwidth {result['copy_gb_per_s']:.1f} GB/s; end to end "
          f"{e2e_result['median_tokens_per_s']['cpp']:.1f} vs "
          f"{e2e_result['median_tokens_per_s']['reference']:.1f} tok/s "
          f"({e2e_result['speedup']:.2f}x); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

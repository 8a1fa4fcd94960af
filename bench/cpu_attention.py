"""Paged decode attention on the CPU: the C++ kernel (shardline._cpu_kernels) against the
torch reference it replaced, per call and end to end.

Per call: one decode step's attention (fp32) for a batch of sequences whose lengths are
all the context ("equal") or drawn from [context/8, context] ("mixed", where the
reference's copy padded to the longest costs most), in blocks of 16 scattered over the
cache as a running engine leaves them; the median of many calls, the bytes of K and V
the kernel must read, and the machine's copy bandwidth for scale. The caches are
allocated as the engine allocates them (on 2 MiB pages where Linux allows); the kernel is
also timed on copies of the caches held on 4 KiB pages. With `--baseline`, another
build of the module (an earlier commit's, say) runs the same calls, alternating with this
one in the same process. End to end: offline throughput of small-llama on the 64-prompt
workload of bench/throughput.py, a fresh LLM per run, the paths alternating within each
round.

    python bench/cpu_attention.py            # every case, 3 end-to-end rounds (about 3 min)
    python bench/cpu_attention.py --quick    # two small cases, 1 round on tiny-llama
    python bench/cpu_attention.py --baseline OLD/shardline/_cpu_kernels.cpython-311-x86_64-linux-gnu.so

An earlier commit's build, for --baseline: `git worktree add /tmp/old COMMIT && pip install
--no-build-isolation --no-deps --target OLD /tmp/old`.

Results: bench/results/cpu_attention.json (`--out` elsewhere).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402
from _timing import Timer, alternating_medians, copy_bandwidth  # noqa: E402

from shardline import LLM  # noqa: E402
from shardline.benchmark.offline import run_offline  # noqa: E402
from shardline.benchmark.workload import make_workload  # noqa: E402
from shardline.kernels import cpu_attention, reference  # noqa: E402
from shardline.presets import resolve_model  # noqa: E402
from shardline.worker.kv_memory import allocate_kv_cache, anonymous_tensor  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 16
# (name, query heads, KV heads, head size): small-llama's, and Llama-3.2-1B's
MODELS = [("small-llama", 8, 4, 64), ("llama-1b", 32, 8, 64)]


def decode_case(batch: int, context: int, lengths: str, heads: tuple[int, int, int],
                rng: random.Random) -> tuple[tuple, int]:
    """The call's arguments, the caches where the engine would put them, and the bytes of
    K and V its sequences hold."""
    num_heads, num_kv_heads, head_dim = heads
    seq_lens = [context if lengths == "equal" else rng.randint(context // 8, context)
                for _ in range(batch)]
    max_blocks = -(-context // BLOCK)
    num_blocks = batch * max_blocks + 1
    shape = (num_blocks, BLOCK, num_kv_heads, head_dim)
    k_cache, v_cache = (allocate_kv_cache(shape, torch.float32, torch.device("cpu"))
                        for _ in range(2))
    k_cache.copy_(torch.randn(shape))
    v_cache.copy_(torch.randn(shape))
    tables = torch.randperm(num_blocks)[:batch * max_blocks].view(batch, max_blocks).int()
    q = torch.randn(batch, num_heads, head_dim)
    args = (q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32),
            head_dim ** -0.5)
    return args, 2 * sum(seq_lens) * num_kv_heads * head_dim * 4


def on_small_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in memory Linux may not back with huge pages (MADV_NOHUGEPAGE), as
    even torch's own allocation gets them where transparent huge pages are 'always'."""
    return anonymous_tensor(tuple(t.shape), t.dtype, huge_pages=False).copy_(t)


def load_build(path: str):
    """Another build of shardline._cpu_kernels, loaded beside the installed one. It gets a
    module name of its own: CPython keeps one single-phase extension module per name, and
    under the same name would hand back the installed build."""
    name = "baseline_build._cpu_kernels"
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def on_build(build, fn):
    """fn run with cpu_attention calling `build` instead of the installed module."""
    def run():
        installed = cpu_attention._cpu_kernels
        cpu_attention._cpu_kernels = build
        try:
            return fn()
        finally:
            cpu_attention._cpu_kernels = installed
    return run


def per_call(cases: list[tuple], reps: tuple[int, int], rng: random.Random,
             baseline) -> list[dict]:
    rows = []
    for model, num_heads, num_kv_heads, head_dim in MODELS:
        for batch, context, lengths in cases:
            args, kv_bytes = decode_case(batch, context, lengths,
                                         (num_heads, num_kv_heads, head_dim), rng)
            small_pages = (args[0], on_small_pages(args[1]), on_small_pages(args[2]), *args[3:])
            calls = {"cpp": lambda: cpu_attention.paged_decode_attention(*args),
                     "cpp_4k_pages": lambda: cpu_attention.paged_decode_attention(*small_pages),
                     "reference": lambda: reference.paged_decode_attention(*args)}
            if baseline is not None:
                calls["baseline"] = on_build(
                    baseline, lambda: cpu_attention.paged_decode_attention(*args))
            ms = alternating_medians(calls, *reps)
            row = {"model": model, "batch": batch, "context": context, "lengths": lengths,
                   "kv_bytes": kv_bytes, **{f"{name}_ms": t for name, t in ms.items()},
                   "speedup": ms["reference"] / ms["cpp"],
                   "cpp_gb_per_s": kv_bytes / ms["cpp"] / 1e6,
                   "huge_pages_speedup": ms["cpp_4k_pages"] / ms["cpp"]}
            line = (f"{model} batch {batch} context {context} ({lengths}): C++ {ms['cpp']:.3f} "
                    f"ms ({row['cpp_gb_per_s']:.1f} GB/s; {row['huge_pages_speedup']:.2f}x its "
                    f"time on 4 KiB pages), reference {ms['reference']:.3f} ms, "
                    f"{row['speedup']:.2f}x")
            if baseline is not None:
                row["speedup_over_baseline"] = ms["baseline"] / ms["cpp"]
                line += f"; baseline build {ms['baseline']:.3f} ms, {row['speedup_over_baseline']:.2f}x"
            rows.append(row)
            print(line, flush=True)
    return rows


def end_to_end(model: str, num_prompts: int, rounds: int, baseline) -> dict:
    """Output tokens/s of fresh-LLM offline runs, the C++ path, the reference (by refusing
    every call the C++ kernel would take) and the baseline build if given, alternating."""
    model_dir = resolve_model(model)
    with open(Path(model_dir) / "config.json") as f:
        vocab_size = json.load(f)["vocab_size"]
    workload = make_workload(num_prompts, vocab_size, seed=0, prompt_len=(16, 256),
                             output_len=(16, 128))
    supports = cpu_attention.supports
    paths = ["cpp", "reference"] + (["baseline"] if baseline is not None else [])
    runs: dict[str, list[float]] = {path: [] for path in paths}

    def run_once() -> float:
        llm = LLM(model_dir, max_num_seqs=64, max_num_batched_tokens=2048)
        try:
            return run_offline(llm, workload).summary()["output_tokens_per_s"]
        finally:
            llm.shutdown()

    try:
        for r in range(rounds):
            for path in paths:
                cpu_attention.supports = supports if path != "reference" else (lambda *a: False)
                runs[path].append(on_build(baseline, run_once)() if path == "baseline"
                                  else run_once())
                print(f"round {r + 1}/{rounds} {path}: {runs[path][-1]:.1f} tok/s", flush=True)
    finally:
        cpu_attention.supports = supports
    medians = {path: statistics.median(rates) for path, rates in runs.items()}
    result = {"model": model, "num_prompts": num_prompts, "rounds": rounds, "runs": runs,
              "median_tokens_per_s": medians, "speedup": medians["cpp"] / medians["reference"]}
    if baseline is not None:
        result["speedup_over_baseline"] = medians["cpp"] / medians["baseline"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="two small cases and one end-to-end round on tiny-llama")
    parser.add_argument("--out", default=str(RESULTS / "cpu_attention.json"))
    parser.add_argument("--baseline", metavar="MODULE_FILE",
                        help="another build's _cpu_kernels module file to time beside this one")
    args = parser.parse_args()
    if args.baseline and not Path(args.baseline).is_file():
        parser.error(f"--baseline {args.baseline}: no such file")
    baseline = load_build(args.baseline) if args.baseline else None
    rng = random.Random(0)
    torch.manual_seed(0)
    if args.quick:
        cases = [(4, 64, "mixed"), (1, 128, "equal")]
        reps, e2e = (1, 3), ("tiny-llama", 8, 1)
    else:
        cases = [(batch, context, lengths) for batch in (1, 16, 64) for context in (256, 2048)
                 for lengths in ("equal", "mixed")]
        reps, e2e = (3, 15), ("small-llama", 64, 3)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info("the kernel and torch each use torch's intra-op threads",
                                {"torch": torch.__version__,
                                 "threads": str(torch.get_num_threads())}),
        "copy_gb_per_s": copy_bandwidth(Timer(torch.device("cpu"), *reps), 256 << 20) / 1e9,
        "per_call": per_call(cases, reps, rng, baseline),
        "end_to_end": end_to_end(*e2e, baseline),
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

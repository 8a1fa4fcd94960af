"""Decode attention's context splits, swept: each of kernels.py's decode attention cases
(Llama-3-8B heads at TP 1/2/8, bf16) timed at every split count from one up to one split
per 128 tokens, each with every candidate tile config, against what choose_splits and the
autotuner pick. Issue 10 asks for 0.8 of the copy bandwidth in every case; the TP8 cases
(one KV head per rank) reached 0.40-0.57 at the heuristic's split counts, and this says
which split count and tile would reach it, to derive the rule from.

    python bench/decode_splits.py             # on a CUDA GPU (about a minute)
    python bench/decode_splits.py --dry-run   # CPU, Triton interpreter, tiny shapes

Each case's row (results/decode_splits.json) holds the fraction of the copy bandwidth of
every (split count, config) pair (null for a config that does not fit the GPU), the best
pair, and the heuristic's split count with its best config; the file is rewritten after
each case.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Iterator
from unittest import mock

import torch
from _files import write_json
from _kernel_shapes import FULL, TINY, TP_SIZES
from kernels import add_run_args, decode_case, open_bench, results_dir


def split_counts(max_context: int, heuristic: int) -> list[int]:
    """1, 2, 4, ... as launched (launched_splits), up to one split per split_align()
    tokens, and the `heuristic`'s launched count, which need not be among them (on 132
    SMs, TP2's 64 x 2048 case launches 3 splits), in order without repeats."""
    from shardline.kernels import attention_decode
    counts, requested = {heuristic}, 1
    while requested <= max(1, max_context // attention_decode.split_align()):
        counts.add(attention_decode.launched_splits(requested, max_context))
        requested *= 2
    return sorted(counts)


def sweep_case(b, batch: int, context: int, tp: int, shapes) -> dict:
    """Every (split count, config) of one decode attention case, as fractions of the copy
    bandwidth; each result checked against the torch reference."""
    # Imported once open_bench has chosen the interpreter or not (it must precede triton).
    from _configs import describe
    from shardline.kernels import _config, attention_decode, reference
    case = decode_case(b, shapes, batch, context, tp)
    max_context = case.inputs[0][3].shape[1] * shapes.block_size
    expected = case.run(0, reference.paged_decode_attention).float()
    kernel = attention_decode._decode_split_kernel
    sms = _config.num_sms(b.device, on_cpu=1)
    heuristic = attention_decode.launched_splits(
        attention_decode.choose_splits(batch, case.kv_heads, max_context, sms), max_context)
    fractions: dict[str, dict[str, float]] = {}
    worst_error = 0.0
    for splits in split_counts(max_context, heuristic):
        def run(i: int) -> torch.Tensor:
            return case.run(i, attention_decode.paged_decode_attention, num_splits=splits)

        row = fractions[str(splits)] = {}
        for config in configs_of(kernel, run):
            with pinned(kernel, lambda args, kwargs, c=config: c):
                ms = b.timer(run, case.copies)
                error = ((b.timer.last_output.float() - expected).abs().max()
                         / expected.abs().max().clamp_min(1e-6)).item()
                fits = launched_as_pinned(kernel, config)
            worst_error = max(worst_error, error)
            row[describe(config)] = (case.kv_bytes / ms / 1e6 / b.ceilings["copy_GBps"]
                                     if fits else None)
    best_splits, best_config, best = max(
        ((s, c, f) for s, row in fractions.items() for c, f in row.items() if f is not None),
        key=lambda item: item[2])
    at_heuristic = {c: f for c, f in fractions[str(heuristic)].items() if f is not None}
    return {"case": f"TP{tp} batch {batch} x {context} ctx, Hq={case.q_heads} "
                    f"Hk={case.kv_heads}",
            "tp": tp, "batch": batch, "context": context, "kv_heads": case.kv_heads,
            "kv_bytes": case.kv_bytes, "fractions": fractions,
            "best": {"splits": int(best_splits), "config": best_config, "fraction": best},
            "heuristic": {"splits": heuristic, "config": max(at_heuristic, key=at_heuristic.get),
                          "fraction": max(at_heuristic.values())},
            "max_rel_err": worst_error}


def configs_of(kernel, run: Callable[[int], object]) -> list:
    """The configs the kernel's prune keeps for this case (the split count does not change
    them), found by one run with its choice recorded; the interpreter's one config."""
    from shardline.kernels import _config
    if not isinstance(kernel, _config.TunedKernel):
        return [kernel.config]
    seen: list = []
    choose = kernel._choose

    def record(args: tuple, kwargs: dict) -> object:
        seen.append(kernel.candidates(args, kwargs))
        return choose(args, kwargs)

    with pinned(kernel, record):
        run(0)
    return seen[0]


@contextlib.contextmanager
def pinned(kernel, choose: Callable[[tuple, dict], object]) -> Iterator[None]:
    """Launches of a TunedKernel take their config from `choose(args, kwargs)` (as a table
    hit would, nothing timed) until the block ends."""
    from shardline.kernels import _config
    if not isinstance(kernel, _config.TunedKernel):
        yield
        return

    def choose_and_record(args: tuple, kwargs: dict) -> object:
        config = choose(args, kwargs)
        # As _choose does: a config that does not fit gives way to the next (_launch_next)
        # and is recorded there.
        kernel.reached[kernel.table_key(args, kwargs)] = _config.Reached(
            len(kernel.candidates(args, kwargs)), "pinned", config)
        return config

    kernel._chosen.clear()
    try:
        with mock.patch.object(kernel, "_choose", choose_and_record):
            yield
    finally:
        kernel._chosen.clear()


def launched_as_pinned(kernel, config) -> bool:
    """Whether every launch since the kernel was pinned ran `config`: one that does not fit
    the GPU gives way to the next candidate (TunedKernel._launch_next), whose time must
    not be recorded under its name."""
    from shardline.kernels import _config
    if not isinstance(kernel, _config.TunedKernel):
        return True
    return all(chosen is config for chosen in kernel._chosen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(parser, "decode_splits.json", warmup=10, reps=30)
    args = parser.parse_args()
    b = open_bench("bench/decode_splits.py", args.dry_run, args.warmup, args.reps)
    shapes = TINY if args.dry_run else FULL
    path = results_dir(args.out_dir, args.dry_run) / "decode_splits.json"
    report = {"device": b.device_name, "dtype": str(b.dtype), "dry_run": b.dry_run,
              "copy_GBps": b.ceilings["copy_GBps"], "target_fraction": 0.8, "cases": []}
    print(f"{'case':<44} {'heuristic':>16} {'best':>16}  best config")
    for batch, context in shapes.decode:
        for tp in TP_SIZES:
            row = sweep_case(b, batch, context, tp, shapes)
            report["cases"].append(row)
            write_json(path, report)
            h, best = row["heuristic"], row["best"]
            print(f"{row['case']:<44} {h['splits']:>4} splits {h['fraction']:5.2f} "
                  f"{best['splits']:>4} splits {best['fraction']:5.2f}  {best['config']}",
                  flush=True)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

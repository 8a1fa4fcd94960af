"""Triton launches per decode step, counted on the CPU: how many kernels one decode forward
of a model runs, per kernel and per layer, as an H100 would launch them.

Decode is memory bound and its kernels are small, so each launch costs a sizeable share of
the step (issue 10 asks for fewer, larger kernels per layer). This counts them without a
GPU: the engine's decode forward (the one its CUDA graphs record) runs on CPU tensors with
every Triton launch counted instead of run, on a model built from its config alone, with
an H100's SM count and TMA deciding split-K and attention's context splits. The LM head
and sampling run after the graph, on the sampled rows only, and are not counted: a step
launches one GEMM more than reported, plus sampling's torch ops.

    python bench/launches.py                           # the 1B bench model, batch 1/16/64
    python bench/launches.py --model small-llama --batch 1 --out /tmp/launches.json
"""

from __future__ import annotations

import os

# Launches are counted, never run: under the interpreter triton would run them instead.
os.environ.pop("TRITON_INTERPRET", None)

import argparse
import contextlib
import inspect
import json
from collections import Counter
from pathlib import Path
from typing import Iterator
from unittest import mock

import torch

from _h100 import H100_SMS, recording_launches
from start_shapes import E2E_1B, RunOnce, build_model, import_kernels, model_config

RESULTS = Path(__file__).resolve().parent / "results" / "launches.json"


@contextlib.contextmanager
def counting_launches(counts: Counter) -> Iterator[None]:
    """Within it, Triton launches are counted in `counts` instead of run, as on an H100,
    and so (under `norms_fused`) are the RMSNorms that ride a split-K reduction instead
    of launching."""
    from shardline.kernels import matmul_split_k
    gemm = matmul_split_k.split_k_gemm

    def counted(*args, **kwargs):
        norm = inspect.signature(gemm).bind(*args, **kwargs).arguments.get("norm")
        counts["norms_fused"] += norm is not None
        return gemm(*args, **kwargs)
    with recording_launches(H100_SMS, counts), \
            mock.patch.object(matmul_split_k, "split_k_gemm", counted):
        yield


@torch.inference_mode()
def count_decode(model_name: str, batch: int, context: int, block_size: int) -> dict:
    """Launches of one decode forward at `batch` sequences of `context` tokens each."""
    from shardline.worker.graph_runner import DecodeGraphRunner
    import_kernels()
    config = model_config(model_name, torch.bfloat16)
    model = build_model(config, torch.bfloat16, torch.device("cpu"), random_weights=False)
    blocks = -(-context // block_size)
    for attn in model.attention_layers():
        shape = (batch * blocks, block_size, attn.num_kv_heads, attn.head_dim)
        attn.k_cache = torch.empty(shape, dtype=torch.bfloat16)
        attn.v_cache = torch.empty(shape, dtype=torch.bfloat16)
    counts: Counter = Counter()
    runner = DecodeGraphRunner(model, [batch], max_blocks_per_seq=blocks,
                               block_size=block_size, device=torch.device("cpu"))
    runner.capture(RunOnce(lambda: counting_launches(counts)), tuning_context=context,
                   vocab_size=config["vocab_size"])
    layers = config["num_hidden_layers"]
    fused = counts.pop("norms_fused", 0)
    total = sum(counts.values())
    return {"model": model_name, "batch": batch, "context": context, "layers": layers,
            "launches": total, "per_layer": total / layers, "norms_fused": fused,
            "kernels": dict(sorted(counts.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=E2E_1B, help="a preset name, a model directory or "
                        f"{E2E_1B} (the Llama-3.2-1B shape of e2e_decode.py)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=256, help="tokens cached per sequence")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    for name, value in (("--context", args.context), ("--block-size", args.block_size),
                        *(("--batch", b) for b in args.batch)):
        if value < 1:
            parser.error(f"{name} must be at least 1; got {value}")
    rows = [count_decode(args.model, b, args.context, args.block_size) for b in args.batch]
    for row in rows:
        kernels = ", ".join(f"{k} {n}" for k, n in row["kernels"].items())
        print(f"{row['model']} batch {row['batch']}: {row['launches']} launches, "
              f"{row['per_layer']:.2f} per layer ({kernels}); {row['norms_fused']} RMSNorms "
              "fused into split-K reductions")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "launches.py", "sms": H100_SMS, "rows": rows},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

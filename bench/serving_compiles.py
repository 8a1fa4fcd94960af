"""Kernel compiles that serving meets after the warm-up, counted on the CPU.

A Triton kernel compiles once per specialization of its arguments: each int on being 1
or a multiple of 16, each pointer on its alignment, each constexpr. The engine's warm-up
(shardline.worker.warmup) runs a forward of every shape bucket so that serving compiles
nothing; a specialization it misses is a compile of a second or more on a GPU, landing on
whichever request first brings it (on the H200, a first request after `ready` took 4-5 s
in bench/startup.py before this counted them).

Here the engine starts on the CPU as on an H100 (bench/_h100.py: its SM count and TMA)
with every Triton launch recorded instead of run, runs the warm-up, then serves a few
kinds of requests (one short prompt; prompts of several lengths decoding together;
contexts long enough to split decode attention; a prompt longer than the token budget,
chunked; a prompt sharing a cached prefix; prompt logprobs), and reports per kind the
kernel specializations that the warm-up did not compile. The outputs are garbage (no
kernel runs); only the launches matter.

    python bench/serving_compiles.py                    # small-llama and tiny-mixtral,
                                                        # graphs and eager
    python bench/serving_compiles.py --models tiny-llama --modes eager
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # silences triton 3.9's warning
os.environ["SHARDLINE_DEVICE"] = "cpu"

import torch
from _h100 import recording_launches
from start_shapes import RunOnce, import_kernels, model_config

RESULTS = Path(__file__).resolve().parent / "results"
LIMITS = dict(max_num_seqs=8, max_num_batched_tokens=256, block_size=16)
LONGEST = 2048   # max_model_len, or the model's own maximum where that is less


def phases(vocab: int, longest: int, rng: torch.Generator
           ) -> list[tuple[str, list[list[int]], dict]]:
    """(what, prompts, SamplingParams fields) of each kind of request served in turn, sized
    for a max_model_len of `longest` (2048 gives the lengths in the module's docstring)."""
    def prompt(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=rng).tolist()
    split, many, chunked = longest * 5 // 32, longest * 7 // 16, longest * 11 // 32
    shared = prompt(80)
    return [
        ("one 37-token prompt, one token", [prompt(37)], dict(max_tokens=1)),
        ("prompts of 5, 60 and 200 tokens decoding together", [prompt(n) for n in (5, 60, 200)],
         dict(max_tokens=20)),
        (f"two {split}-token prompts decoding to {2 * split} tokens (decode attention "
         "splits)", [prompt(split), prompt(split)], dict(max_tokens=split)),
        (f"eight {many}-token prompts", [prompt(many) for _ in range(8)], dict(max_tokens=40)),
        (f"a {chunked}-token prompt over a {LIMITS['max_num_batched_tokens']}-token budget "
         "(chunked)", [prompt(chunked)], dict(max_tokens=4)),
        ("prompts sharing an 80-token cached prefix", [shared + prompt(9), shared + prompt(40)],
         dict(max_tokens=4)),
        ("prompt logprobs of a 120-token prompt", [prompt(120)],
         dict(max_tokens=2, prompt_logprobs=1)),
    ]


def new_compiles(seen: dict, before: dict) -> list[dict]:
    return [{"kernel": kernel, "key": key, "signature": repr(signature)}
            for kernel, keys in seen.items() for key, signatures in keys.items()
            for signature in signatures
            if signature not in before.get(kernel, {}).get(key, set())]


def count(model: str, eager: bool) -> dict:
    """Start `model` (warm-up included), then serve each phase; the compiles of each."""
    from shardline import LLM, SamplingParams
    from shardline.worker.warmup import warm_up_prefill
    from shardline.models.hf_config import max_positions
    import_kernels()
    longest = min(LONGEST, max_positions(model_config(model, torch.bfloat16)))
    llm = LLM(model, **LIMITS, max_model_len=longest, num_kv_blocks=1024, enforce_eager=eager,
              dtype="bfloat16")
    runner = llm.engine.executor.worker.model_runner
    rng = torch.Generator().manual_seed(0)
    report = {"model": model, "mode": "eager" if eager else "graphs", "phases": []}
    try:
        with recording_launches() as seen:
            sched = runner.config.scheduler
            # As ModelRunner.warm_up on CUDA (which does nothing on the CPU).
            runner.warm_logits_rows = warm_up_prefill(
                runner.model, sched.max_num_batched_tokens, sched.max_num_seqs,
                runner.block_size, runner.max_model_len, runner.info.vocab_size, runner.device)
            if not eager:
                runner.capture_decode_graphs(RunOnce())
            report["warm_up"] = sum(len(s) for keys in seen.values() for s in keys.values())
            for what, prompts, fields in phases(runner.info.vocab_size, longest, rng):
                before = copy.deepcopy(seen)
                params = SamplingParams(temperature=0, ignore_eos=True, **fields)
                llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                             use_tqdm=False)
                compiles = new_compiles(seen, before)
                report["phases"].append({"requests": what, "new_compiles": len(compiles),
                                         "compiles": compiles})
                print(f"{model} {report['mode']:>6}: {len(compiles)} new compiles: {what}",
                      flush=True)
                for c in compiles:
                    print(f"    {c['kernel']} {c['key']}", flush=True)
    finally:
        llm.shutdown()
    return report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["small-llama", "tiny-mixtral"])
    parser.add_argument("--modes", nargs="+", choices=("graphs", "eager"),
                        default=["graphs", "eager"])
    parser.add_argument("--out", type=Path, default=RESULTS / "serving_compiles.json")
    return parser.parse_args()


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("TRITON_INTERPRET=1 is set: interpreted kernels never compile, so there is "
                 "nothing to count; unset it.")
    args = parse_args()
    reports = [count(model, mode == "eager") for model in args.models for mode in args.modes]
    total = sum(p["new_compiles"] for r in reports for p in r["phases"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"limits": LIMITS, "longest": LONGEST,
                                    "total_new_compiles": total,
                                    "runs": reports}, indent=2))
    print(f"{total} compiles after the warm-up in all; wrote {args.out}")


if __name__ == "__main__":
    main()

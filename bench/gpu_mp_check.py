"""The engine through the multi-process executor at world size 1 on one GPU (NCCL, bf16),
against the in-process executor on the same GPU: same prompts, greedy, tokens compared.

    python bench/gpu_mp_check.py [--out-dir DIR]
    python bench/gpu_mp_check.py --device cpu --model tiny-llama   # CPU smoke run (fp32)

Writes gpu_mp_check.json: both runs' wall time, the share of requests whose tokens are
equal (bf16 may part at near ties, so this is reported rather than required). At world
size 1 the worker forms no process group: what this exercises is the executor, the rings
and a worker process that owns the GPU; NCCL itself needs two GPUs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(args: argparse.Namespace, backend: str, prompts: list[list[int]]
        ) -> tuple[list[list[int]], float]:
    from shardline import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    started = time.perf_counter()
    with LLM(args.model, dtype=args.dtype, device=args.device,
             distributed_executor_backend=backend) as llm:
        outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    return [list(o.outputs[0].token_ids) for o in outputs], elapsed


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", default="small-llama")
    args = parser.parse_args()
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_mp_check needs a CUDA GPU (or --device cpu for a smoke run)")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (int(n),), generator=generator).tolist()
               for n in torch.randint(8, 200, (16,), generator=generator)]
    uni_tokens, uni_s = run(args, "uni", prompts)
    mp_tokens, mp_s = run(args, "mp", prompts)
    equal = sum(a == b for a, b in zip(uni_tokens, mp_tokens)) / len(prompts)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    report = {"device": device, "model": args.model,
              "dtype": args.dtype, "requests": len(prompts), "max_tokens": 32,
              "uni_wall_s": uni_s, "mp_wall_s": mp_s, "share_of_requests_equal": equal}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_mp_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""The engine through the multi-process executor at world size 1 on one GPU (NCCL, bf16),
against the in-process executor on the same GPU: same prompts, greedy, tokens compared.

    python bench/gpu_mp_check.py [--out-dir DIR]
    python bench/gpu_mp_check.py --device cpu --model tiny-llama   # CPU smoke run (fp32)

Writes gpu_mp_check.json: both runs' wall time, the share of requests whose tokens are
equal (bf16 may part at near ties, so this is reported rather than required). At world
size 1 the worker forms no process group, so the engine runs exercise the executor, the
rings and a worker process that owns the GPU, not NCCL. NCCL is then checked on its own:
this process joins a rank grid of one over NCCL (init_distributed, as a worker of a larger
grid would) and runs every torch.distributed collective the Communicator calls, on bf16
and fp32 tensors of the GPU, each checked against its result at world size 1. The
Communicator's own NCCL paths, and send/recv, need two GPUs.
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


def nccl_ops(device: str) -> dict[str, bool | str]:
    """Each collective the Communicator calls, over NCCL (gloo on the CPU) in a grid of
    one rank: True if its result is right, else the error."""
    import socket

    import torch
    import torch.distributed as dist

    from shardline.distributed.communicator import _all_gather_into, _reduce_scatter_into
    from shardline.distributed.grid import RankGrid
    from shardline.distributed.parallel_state import destroy_distributed, init_distributed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init_distributed(RankGrid(), 0, f"tcp://127.0.0.1:{port}", device, timeout=60)
    results: dict[str, bool | str] = {"backend": dist.get_backend()}
    try:
        # Each op writes into `out` (zeros): x itself, as every op gives at world size 1.
        ops = {
            "all_reduce": lambda out, x: dist.all_reduce(out.copy_(x)),
            "broadcast": lambda out, x: dist.broadcast(out.copy_(x), src=0),
            "all_gather_into": lambda out, x: _all_gather_into(out, x),
            "reduce_scatter_into": lambda out, x: _reduce_scatter_into(out, x),
            "all_to_all_single": lambda out, x: dist.all_to_all_single(out, x),
        }
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(4096, dtype=dtype, device=device)
            for name, op in ops.items():
                key = f"{name}_{str(dtype).removeprefix('torch.')}"
                out = torch.zeros_like(x)
                try:
                    op(out, x)
                    results[key] = bool(torch.equal(out, x))
                except Exception as exc:  # recorded: the report says which op failed
                    results[key] = f"{type(exc).__name__}: {exc}"
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        destroy_distributed()
    return results


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
    collectives = nccl_ops(args.device)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    report = {"device": device, "model": args.model,
              "dtype": args.dtype, "requests": len(prompts), "max_tokens": 32,
              "uni_wall_s": uni_s, "mp_wall_s": mp_s, "share_of_requests_equal": equal,
              "collectives_at_world_size_1": collectives}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_mp_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""`shardline plan`: rank the layouts of a model on a cluster for a workload.

    shardline plan -m llama-3-70b --nodes 2 --gpus-per-node 8 --gpu h100
    shardline plan -m small-llama --profile-file ~/.cache/shardline/profile.json --nodes 1
    shardline plan --profile [--profile-file PATH]     measure this machine, write a profile

Every number the cluster takes has a stated default for its GPU kind (cluster.py) and
can be overridden; a profile file replaces the device and link constants with measured
ones. A bad value exits 2 with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from shardline.planner.cluster import (GB, GPU_DEFAULTS, Link, gpu_cluster, profile_cluster,
                                       with_overrides)
from shardline.planner.cost import Workload
from shardline.planner.model_spec import DTYPE_BYTES, load_spec
from shardline.planner.ranking import OBJECTIVES, plan
from shardline.planner.references import REFERENCE_MODELS
from shardline.presets import preset_names
from shardline.planner.report import plan_dict, render


def default_profile_path() -> str:
    from shardline.presets import cache_root

    return os.path.join(cache_root(), "profile.json")


def _number(kind: type, minimum: float, strict: bool):
    """An argparse type: a `kind` number >= minimum (> when strict)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{text} is invalid: must be "
                                             f"{'>' if strict else '>='} {minimum:g}")
        return value
    return parse


def add_plan_command(sub: argparse._SubParsersAction) -> None:
    """Register `plan` on the CLI's subcommands."""
    p = sub.add_parser("plan", help="rank parallel layouts of a model on a cluster",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    positive, fraction = _number(int, 1, False), _number(float, 0, True)
    p.add_argument("-m", "--model", help="a reference model (" + ", ".join(REFERENCE_MODELS)
                   + "), a preset (" + ", ".join(preset_names()) + "), a checkpoint "
                   "directory, a .gguf file or a config.json")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES),
                   help="weight and KV precision (default: the config's torch_dtype)")
    p.add_argument("--gpu", choices=sorted(GPU_DEFAULTS), default="h100",
                   help="device kind whose stated defaults apply (default: %(default)s)")
    p.add_argument("--nodes", type=positive, default=1,
                   help="nodes in the cluster (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=positive, default=None,
                   help="devices per node (default: 8, or the profile's)")
    p.add_argument("--gpu-memory-gb", type=fraction, help="memory per device, GB")
    for link in ("intranode", "internode"):
        p.add_argument(f"--{link}-bandwidth-gbs", type=fraction,
                       help=f"{link} bandwidth per device and direction, GB/s")
        p.add_argument(f"--{link}-latency-us", type=_number(float, 0, False),
                       help=f"{link} latency per message, microseconds")
    p.add_argument("--batch", type=positive, default=64, help="concurrent requests "
                   "(default: %(default)s)")
    p.add_argument("--prompt-len", type=positive, default=1024,
                   help="prompt tokens per request (default: %(default)s)")
    p.add_argument("--output-len", type=positive, default=256,
                   help="output tokens per request (default: %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=positive, default=2048,
                   help="prefill chunk, tokens per step (default: %(default)s)")
    p.add_argument("--gpu-memory-utilization", type=fraction, default=0.9,
                   help="share of device memory for weights, activations and KV "
                        "(default: %(default)s)")
    p.add_argument("--objective", choices=OBJECTIVES, default="throughput",
                   help="rank by output tokens/s or by request latency (default: %(default)s)")
    p.add_argument("--top", type=positive, default=10, help="layouts shown (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.add_argument("--profile", action="store_true",
                   help="measure this machine and write --profile-file instead of planning")
    p.add_argument("--profile-file", help="measured constants to plan with (with --profile: "
                   f"where to write them; default {default_profile_path()})")
    p.set_defaults(func=cmd_plan)


def _cluster(args: argparse.Namespace):
    if args.profile_file:
        cluster = profile_cluster(args.profile_file, args.nodes, args.gpus_per_node)
    else:
        cluster = gpu_cluster(args.gpu, args.nodes, args.gpus_per_node or 8)
    links = {}
    for name in ("intranode", "internode"):
        old = getattr(cluster, name)
        bw, lat = (getattr(args, f"{name}_bandwidth_gbs"), getattr(args, f"{name}_latency_us"))
        if bw is not None or lat is not None:
            links[name] = Link(old.latency_s if lat is None else lat * 1e-6,
                               old.bandwidth if bw is None else bw * GB, old.name)
    memory = args.gpu_memory_gb * GB if args.gpu_memory_gb else None
    return with_overrides(cluster, memory_bytes=memory, **links)


def cmd_plan(args: argparse.Namespace) -> int:
    if args.profile:
        from shardline.planner.profile import write_profile

        path = args.profile_file or default_profile_path()
        data = write_profile(path, progress=lambda stage: print(f"profiling {stage} ...",
                                                                file=sys.stderr, flush=True))
        print(json.dumps(data, indent=2) if args.json else
              f"profile written to {path}; plan with it: shardline plan -m MODEL "
              f"--profile-file {shlex.quote(path)}")
        return 0
    if not args.model:
        raise ValueError("--model is required (a reference model, preset, directory or "
                         "config.json) unless --profile is given")
    if args.gpu_memory_utilization > 1:
        raise ValueError(f"--gpu-memory-utilization {args.gpu_memory_utilization:g} is "
                         "invalid: must be in (0, 1]")
    model = load_spec(args.model, args.dtype)
    workload = Workload(batch=args.batch, prompt_len=args.prompt_len,
                        output_len=args.output_len,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        gpu_memory_utilization=args.gpu_memory_utilization)
    result = plan(model, _cluster(args), workload, args.objective)
    print(json.dumps(plan_dict(result), indent=2) if args.json else render(result, args.top))
    return 0

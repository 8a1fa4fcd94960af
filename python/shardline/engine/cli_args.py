"""The engine's options as command-line flags, shared by every command that runs a model
(the flag names are EngineArgs' field names with dashes)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from typing import Any

from shardline.config import is_dtype_name
from shardline.presets import preset_names


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be an integer >= 1")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be a number of "
                                         "seconds > 0")
    return value


def dtype_arg(text: str) -> str:
    """An argparse type: a dtype name, checked before the model loads."""
    if not is_dtype_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype: use auto, float32, "
                                         "bfloat16 or float16")
    return text


def add_engine_args(parser: argparse.ArgumentParser, default_model: str | None) -> None:
    """Add every engine option a command takes (the model, dtype, batch limits, cache and
    layout), each named as its EngineArgs field, and the list of them for `engine_kwargs`."""
    dests: list[str] = []

    def flag(*names: str, **options: Any) -> None:
        dests.append(parser.add_argument(*names, **options).dest)

    default = "required" if default_model is None else "default: %(default)s"
    flag("-m", "--model", default=default_model, required=default_model is None,
         help="a local Hugging Face checkpoint directory (config.json, "
              "*.safetensors, tokenizer.json), a .gguf file or a preset: "
              f"{', '.join(preset_names())} ({default})")
    flag("--dtype", type=dtype_arg, default="auto",
         help="auto (float32 on CPU, the checkpoint's dtype on GPU), float32, "
              "bfloat16 or float16 (default: %(default)s)")
    flag("--max-num-seqs", type=positive_int, default=64,
         help="most sequences in one step (default: %(default)s)")
    flag("--max-num-batched-tokens", type=positive_int, default=2048,
         help="most tokens in one step; longer prompts are prefilled in "
              "chunks (default: %(default)s)")
    flag("--block-size", type=positive_int, default=16,
         help="tokens per KV-cache block (default: %(default)s)")
    flag("--max-model-len", type=positive_int, default=None,
         help="longest prompt plus output, in tokens (default: the "
              "model's max_position_embeddings)")
    flag("--enforce-eager", action="store_true",
         help="on CUDA, run decode op by op instead of replaying CUDA graphs, "
              "and autotune nothing at startup, even under SHARDLINE_AUTOTUNE=1")
    flag("--max-logprobs", type=int, default=20,
         help="largest top-n of a request's logprobs and prompt_logprobs; -1: "
              "the vocabulary size (default: %(default)s)")
    flag("--async-scheduling", action=argparse.BooleanOptionalAction,
         default=None,
         help="schedule step N+1 while the ranks run step N; needs one "
              "pipeline stage and no sequence parallelism (default: on where it "
              "hides host time: on a GPU, or in worker processes without tensor "
              "parallelism on the CPU)")
    flag("--gpu-memory-utilization", type=float, default=0.9,
         help="share of each GPU's memory the weights, KV cache and "
              "activations may fill; the KV cache takes what the weights leave "
              "(default: %(default)s)")
    flag("--tensor-parallel-size", "-tp", type=positive_int, default=1,
         help="ranks that split each layer's heads and MLP columns "
              "(default: %(default)s)")
    flag("--pipeline-parallel-size", "-pp", type=positive_int, default=1,
         help="pipeline stages that split the layers (default: %(default)s)")
    flag("--data-parallel-size", "-dp", type=positive_int, default=1,
         help="engine cores, each a whole replica (its own scheduler, KV cache "
              "and TP x PP ranks) serving its share of the requests "
              "(default: %(default)s)")
    flag("--enable-expert-parallel", action="store_true",
         help="MoE models: each rank of a stage's DP x SP x TP ranks owns "
              "whole experts, and tokens travel to them by all-to-all")
    flag("--sequence-parallel-size", "-sp", type=positive_int, default=1,
         help="ranks that split a step's tokens around attention, for long "
              "prompts (default: %(default)s)")
    flag("--pipeline-stage-layers", type=int_list, default=None,
         help="layers per pipeline stage, comma-separated, e.g. 3,2 "
              "(default: as even as possible)")
    flag("--distributed-executor-backend", choices=("uni", "mp", "ray"),
         default=None,
         help="uni: one rank in this process; mp: one process per rank on this "
              "machine; ray: one Ray actor per rank, over the nodes of a Ray "
              "cluster (the ray extra) (default: uni for one rank, mp for more)")
    flag("--ray-address", default=None,
         help="with --distributed-executor-backend ray: the cluster to join, "
              "e.g. auto or ray://head:10001 (default: $RAY_ADDRESS, else a "
              "local Ray)")
    flag("--device", choices=("cpu", "cuda"), default=None,
         help="where every rank runs (default: $SHARDLINE_DEVICE, else CUDA "
              "when present)")
    flag("--step-timeout-s", type=positive_seconds, default=None,
         help="with worker processes (mp or ray): a step not answered within this "
              "many seconds stops the workers and fails the engine, for a "
              "supervisor to restart (default: a slow step is only reported)")
    parser.set_defaults(engine_flags=tuple(dests))


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers, e.g. 3,2."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 3,2") from None


def name_by_flags(message: str, dests: Iterable[str]) -> str:
    """An engine error with the options it names as `field=value` (LLM's keyword
    arguments) named as the command's flags instead, `--field-name=value`. Only a name
    that starts a word (after a space, an opening bracket, , ; or :) is renamed: not the tail
    of a longer name or flag (`--kv-cache-dtype=` holds `dtype=`), nor a piece of a value
    such as the model's path (`/models/dtype=bf16`)."""
    for dest in dests:
        message = re.sub(rf"(?<![^\s(\[{{,;:]){re.escape(dest)}=",
                         f"--{dest.replace('_', '-')}=", message)
    return message


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags `add_engine_args` added, as parsed: LLM's keyword arguments."""
    return {dest: getattr(args, dest) for dest in args.engine_flags}

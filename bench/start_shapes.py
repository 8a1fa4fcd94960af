"""The kernel launches an engine start makes, for bench/tune.py and bench/startup.py.

An engine start on CUDA runs the warm-up of shardline.worker.warmup (a prefill of every
token bucket, the logits of every row bucket) and then records a decode graph per batch
size (shardline.worker.graph_runner). `walk_start` runs the same two steps, with the same
functions, on a model built from a config alone: no checkpoint is read. Every kernel shape
bucket a start reaches is reached here.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

E2E_1B = "e2e-1b"   # the Llama-3.2-1B shape of bench/_models.py, which e2e_decode.py runs


@dataclass(frozen=True)
class Limits:
    """The engine limits that decide which shape buckets a start reaches (EngineArgs')."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    max_model_len: int | None = None   # None: the model's own maximum


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    defaults = Limits()
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_model_len"):
        parser.add_argument("--" + name.replace("_", "-"), type=int,
                            default=getattr(defaults, name), help="as LLM(...)'s")


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(args.max_num_seqs, args.max_num_batched_tokens, args.block_size,
                  args.max_model_len)


def model_config(model: str, dtype: torch.dtype) -> dict:
    """The config.json of a preset name, a model directory, or E2E_1B."""
    if model == E2E_1B:
        from _models import LLAMA_3_2_1B
        return LLAMA_3_2_1B.hf_config(dtype)
    from shardline.models.loader import read_config
    from shardline.presets import PRESETS, resolve_model
    if model in PRESETS:
        return dict(PRESETS[model])
    return read_config(resolve_model(model))


def config_dtype(config: dict, requested: str) -> torch.dtype:
    """The dtype a GPU start would use: `requested`, or the checkpoint's for "auto"."""
    from shardline.config import resolve_dtype
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return resolve_dtype(name if requested == "auto" else requested)


def build_model(config: dict, dtype: torch.dtype, device: torch.device,
                random_weights: bool) -> nn.Module:
    """The model of `config` on `device`. With random_weights, weights ~ N(0, 1/fan_in) and
    norms at 1 (timings on zeros flatter a kernel); without, storage is only reserved."""
    from shardline.models.hf_config import max_positions
    from shardline.models.registry import get_model_class, resolve_architecture
    cls = get_model_class(resolve_architecture(config))
    if not random_weights:
        with torch.device("meta"):
            model = cls(config, dtype, max_positions(config), None)
        return model.to_empty(device=device).eval()
    with torch.device(device):
        model = cls(config, dtype, max_positions(config), None)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    return model.eval()


class RunOnce:
    """A GraphRecorder that runs the forward once, within `context()` if given, instead of
    recording a graph."""

    def __init__(self, context: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        self.context = context

    def record(self, forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None],
                                                                   torch.Tensor]:
        with self.context():
            return (lambda: None), forward()


def max_model_len(config: dict, limits: Limits) -> int:
    from shardline.models.hf_config import max_positions
    return limits.max_model_len or max_positions(config)


@torch.inference_mode()
def walk_start(model: nn.Module, config: dict, limits: Limits, device: torch.device,
               num_blocks: int = 1) -> None:
    """Run the launches of an engine start: the prefill warm-up, then one decode forward
    per graph batch size (as ModelRunner.warm_up does, graphs aside). The KV cache gets
    `num_blocks` blocks per layer; the warm-up writes none of them."""
    from shardline.worker.graph_runner import DecodeGraphRunner, graph_batch_sizes
    from shardline.worker.warmup import TUNING_CONTEXT
    from shardline.worker.warmup import warm_up_prefill
    dtype = next(model.parameters()).dtype
    for attn in model.attention_layers():
        shape = (num_blocks, limits.block_size, attn.num_kv_heads, attn.head_dim)
        attn.k_cache = torch.empty(shape, dtype=dtype, device=device)
        attn.v_cache = torch.empty(shape, dtype=dtype, device=device)
    longest = max_model_len(config, limits)
    vocab = config["vocab_size"]
    warm_up_prefill(model, limits.max_num_batched_tokens, limits.max_num_seqs,
                    limits.block_size, longest, vocab, device)
    runner = DecodeGraphRunner(model, graph_batch_sizes(limits.max_num_seqs),
                               max_blocks_per_seq=-(-longest // limits.block_size),
                               block_size=limits.block_size, device=device)
    runner.capture(RunOnce(), tuning_context=min(longest, TUNING_CONTEXT), vocab_size=vocab)


def import_kernels() -> None:
    """Import every module that defines a tuned kernel, so _tuned.KERNELS lists them all."""
    for module in ("attention_decode", "attention_prefill", "kv_cache", "matmul", "moe"):
        importlib.import_module(f"shardline.kernels.{module}")


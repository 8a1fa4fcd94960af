"""Launch configs of the Triton kernels: tuned on GPU, fixed in the interpreter.

On a GPU each kernel launches with the config the shipped tuned table names for its key,
else the one triton.autotune picks (see shardline.kernels._tuned). `triton.autotune`
fails under TRITON_INTERPRET=1, so there each kernel runs with one fixed config instead;
callers launch all of them the same way, `kernel[grid](...)`, with a grid that reads the
config's block sizes from its `meta` dict.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import triton

from shardline.kernels._tuned import TunedKernel

SMALLEST_BUCKET = 16


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter rather than compiled."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def num_sms(device: torch.device, on_cpu: int) -> int:
    """The device's SM count, or `on_cpu` for the CPU (what a kernel's split choice should
    assume there). One function, so bench/ can model a GPU's count by replacing it once."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return on_cpu


def shape_bucket(n: int, cap: int = 4096) -> int:
    """The autotune key of a size: its next power of two, at least SMALLEST_BUCKET and at
    most `cap`, so tuning runs per bucket. Every kernel's row tiles are at least 16 rows
    (tl.dot's smallest), so sizes under 16 choose among the same tiles: one bucket."""
    return min(triton.next_power_of_2(max(n, SMALLEST_BUCKET)), cap)


class _FixedConfig:
    """A kernel launched with one config, standing in for triton.autotune (its `fn`, as
    an autotuner's, is the kernel)."""

    def __init__(self, kernel: triton.JITFunction, config: triton.Config) -> None:
        self.fn = kernel
        self.config = config

    def __getitem__(self, grid: tuple | Callable[[dict], tuple]) -> Callable[..., None]:
        def launch(*args, **kwargs) -> None:
            meta = {**kwargs, **self.config.kwargs}
            self.fn[grid(meta) if callable(grid) else grid](
                *args, **meta, num_warps=self.config.num_warps,
                num_stages=self.config.num_stages)
        return launch


def autotune(configs: list[triton.Config], key: list[str], fixed: triton.Config,
             prune: Callable[..., list[triton.Config]] | None = None
             ) -> Callable[[triton.JITFunction], object]:
    """A TunedKernel over `configs` keyed on `key`; `fixed` alone in the interpreter.

    `configs` are listed best-first: where autotuning is off, a key missing from the tuned
    table runs the first config the prune keeps. Timings of triton.autotune are kept in
    triton's on-disk cache, so a restarted engine reloads the winners instead of timing
    every config again.

    `prune(configs, named_args, **kwargs)` may drop configs that cannot win for a call's
    shape before any of them is timed.
    """
    def decorate(kernel: triton.JITFunction) -> object:
        if interpreting():
            return _FixedConfig(kernel, fixed)
        return TunedKernel(kernel, configs, key, prune)
    return decorate


def up_to_head_size(table: list[tuple[triton.Config, int]]
                    ) -> tuple[list[triton.Config], Callable[..., list[triton.Config]]]:
    """Attention configs, each paired with the largest BLOCK_D it runs at, and the prune
    that keeps, per call, the configs whose limit covers the call's BLOCK_D.

    Past its limit a config spills registers on sm_90 (bench/kernel_resources.py
    measures that), so it is never timed there.
    """
    limits = {id(config): largest for config, largest in table}

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        block_d = kwargs["BLOCK_D"] if "BLOCK_D" in kwargs else named_args["BLOCK_D"]
        return [config for config in configs if limits[id(config)] >= block_d]
    return [config for config, _ in table], prune

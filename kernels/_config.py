"""Launch configs of the Triton kernels: autotuned on GPU, fixed in the interpreter.

`triton.autotune` fails under TRITON_INTERPRET=1, so there each kernel runs with one
fixed config instead; callers launch both the same way, `kernel[grid](...)`, with a grid
that reads the config's block sizes from its `meta` dict.
"""

from __future__ import annotations

import os
from typing import Callable

import triton


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter rather than compiled."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def shape_bucket(n: int, cap: int = 4096) -> int:
    """The autotune key of a size: its next power of two, capped, so tuning runs per bucket."""
    return min(triton.next_power_of_2(max(n, 1)), cap)


class _FixedConfig:
    """A kernel launched with one config, standing in for triton.autotune."""

    def __init__(self, kernel: triton.JITFunction, config: triton.Config) -> None:
        self.kernel = kernel
        self.config = config

    def __getitem__(self, grid: tuple | Callable[[dict], tuple]) -> Callable[..., None]:
        def launch(*args, **kwargs) -> None:
            meta = {**kwargs, **self.config.kwargs}
            self.kernel[grid(meta) if callable(grid) else grid](
                *args, **meta, num_warps=self.config.num_warps,
                num_stages=self.config.num_stages)
        return launch


def autotune(configs: list[triton.Config], key: list[str], fixed: triton.Config,
             prune: Callable[..., list[triton.Config]] | None = None
             ) -> Callable[[triton.JITFunction], object]:
    """triton.autotune over `configs` keyed on `key`; `fixed` alone in the interpreter.

    `prune(configs, named_args, **kwargs)` may drop configs that cannot win for a call's
    shape before any of them is timed.
    """
    def decorate(kernel: triton.JITFunction) -> object:
        if interpreting():
            return _FixedConfig(kernel, fixed)
        prune_by = {"early_config_prune": prune} if prune is not None else None
        return triton.autotune(configs=configs, key=key, prune_configs_by=prune_by)(kernel)
    return decorate

"""Launch configs of the Triton kernels: tuned on GPU, fixed in the interpreter.

On a GPU each kernel is a TunedKernel: it launches with the config the shipped tuned table
names for its key, else the one triton.autotune picks (the table and its settings are
shardline.kernels._tuned, which imports no Triton, so that a model on the CPU never loads
it). `triton.autotune` fails under TRITON_INTERPRET=1, so there each kernel runs with one
fixed config instead; callers launch all of them the same way, `kernel[grid](...)`, with
a grid that reads the config's block sizes from its `meta` dict.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import triton
from triton.runtime.errors import OutOfResources

from shardline.kernels._tuned import (KERNELS, autotuning_allowed, compiling_ahead,
                                      current_table, key_string)

Prune = Callable[..., list[triton.Config]]

logger = logging.getLogger("shardline")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter rather than compiled."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _mend_interpreter() -> None:
    """Give the interpreter's scalars an __index__ that numpy 2.4 and later accept.

    A loop bound read at run time, as in `range(0, tl.cdiv(k, BLOCK_K))`, goes through a
    scalar tensor's __index__. Triton 3.6's interpreter computes it as int() of the
    scalar's one-element array, which numpy 2.4 refuses; later tritons squeeze the array
    first, and so does this, for any triton whose interpreter patches its tensors as 3.6
    through 3.9 do (a call-scoped `_patch_lang_tensor`)."""
    try:
        int(np.ones(1))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return

    def patch_with_index(tensor: type, scope: object) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    interpreter._patch_lang_tensor = patch_with_index


if interpreting():
    _mend_interpreter()


@functools.cache
def num_sms(device: torch.device, on_cpu: int) -> int:
    """The device's SM count, or `on_cpu` for the CPU (what a kernel's split choice should
    assume there). One function, so bench/ can model a GPU's count by replacing it once."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return on_cpu


@functools.cache
def max_shared_memory(device: torch.device) -> float:
    """Bytes of shared memory one program may use on `device` (opted in, as Triton does);
    unbounded off CUDA, where nothing compiles."""
    if device.type != "cuda":
        return math.inf
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def jit_for_serving(ints: tuple[str, ...] = (), pointers: tuple[str, ...] = ()
                    ) -> Callable[[Callable], triton.JITFunction]:
    """triton.jit, except that the named int arguments are not specialized on being 1 or a
    multiple of 16, nor the named pointers on their alignment.

    For what changes from one serving batch to the next (a block table's width, a count
    of sequences or splits, a slice of one metadata buffer at an offset the batch's sizes
    decide), each specialization is one more compile met mid-serving, after the warm-up,
    and buys nothing: such values bound loops or index a few elements."""
    return triton.jit(do_not_specialize=list(ints), do_not_specialize_on_alignment=list(pointers))


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
             prune: Prune | None = None) -> Callable[[triton.JITFunction], object]:
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
                    ) -> tuple[list[triton.Config], Prune]:
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


@dataclass
class Reached:
    """A key a tuned kernel met in this process: how many candidate configs its prune
    kept, where its config came from ("table", "tuned", "default" or "single") and,
    once known, the config."""

    candidates: int
    source: str
    config: triton.Config | None


_AUTOTUNE = object()


class TunedKernel(triton.runtime.Autotuner):
    """triton.autotune over `configs`, except that a key the GPU's tuned table holds
    launches the table's config at once, and a miss where autotuning is off launches the
    first candidate config; launched as `kernel[grid](...)` like any Triton kernel."""

    def __init__(self, kernel: triton.JITFunction, configs: list[triton.Config],
                 key: list[str], prune: Prune | None) -> None:
        if kernel.__name__ in KERNELS:
            raise ValueError(f"a tuned kernel named {kernel.__name__!r} already exists")
        super().__init__(kernel, kernel.arg_names, configs, key, None, None,
                         prune_configs_by={"early_config_prune": prune} if prune else None,
                         cache_results=True)
        self.name = kernel.__name__
        self._positions = {name: kernel.arg_names.index(name) for name in key}
        self._chosen: dict[tuple, object] = {}
        self.reached: dict[str, Reached] = {}
        KERNELS[self.name] = self

    def forget(self) -> None:
        """Drop the configs chosen so far: the next launch of each key chooses again."""
        self._chosen.clear()
        self.reached.clear()

    def candidates(self, args: tuple, kwargs: dict) -> list[triton.Config]:
        """The configs the prune keeps for this launch, best-first as listed."""
        if self.early_config_prune is None:
            return list(self.configs)
        named = dict(zip(self.arg_names, args))
        return self.early_config_prune(self.configs, named, **kwargs)

    def table_key(self, args: tuple, kwargs: dict) -> str:
        return key_string(self.keys, self._values(args, kwargs), args[0].dtype)

    def _values(self, args: tuple, kwargs: dict) -> tuple:
        return tuple(kwargs[name] if name in kwargs else args[i]
                     for name, i in self._positions.items())

    def _choose(self, args: tuple, kwargs: dict) -> object:
        key = self.table_key(args, kwargs)
        candidates = self.candidates(args, kwargs)
        if not candidates:
            raise ValueError(f"{self.name} {key}: the prune keeps none of its "
                             f"{len(self.configs)} configs on this device (each needs more "
                             "than it has, shared memory say), so nothing can launch")
        table = current_table()
        config = table.kernels.get(self.name, {}).get(key) if table is not None else None
        if config is not None and config in candidates:
            source = "table"
        elif len(candidates) == 1 or not autotuning_allowed():
            config, source = candidates[0], "single" if len(candidates) == 1 else "default"
        else:
            config, source = _AUTOTUNE, "tuned"
        self.reached[key] = Reached(len(candidates), source,
                                    None if config is _AUTOTUNE else config)
        return config

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        values = (*self._values(args, kwargs), args[0].dtype)
        config = self._chosen.get(values)
        if config is None:
            config = self._chosen[values] = self._choose(args, kwargs)
        if compiling_ahead():
            configs = self.candidates(args, kwargs) if config is _AUTOTUNE else [config]
            for c in configs:
                self.fn.warmup(*args, grid=grid, **kwargs, **c.all_kwargs())
            return None
        if config is _AUTOTUNE:
            result = self._autotune(args, grid, warmup, kwargs)
            self._chosen[values] = self.reached[self.table_key(args, kwargs)].config = \
                self.best_config
            return result
        try:
            return self._launch(args, grid, warmup, kwargs, config)
        except OutOfResources as error:
            return self._launch_next(args, grid, warmup, kwargs, values, config, error)

    def _launch_next(self, args: tuple, grid: Any, warmup: bool, kwargs: dict, values: tuple,
                     config: triton.Config, error: OutOfResources) -> Any:
        """Launch the first candidate after `config` that this GPU can run, and keep it for
        the key. A config is listed for every GPU and dtype, so the default one, or a
        table's from a larger GPU, may need more shared memory or registers than this one
        has; Triton finds out only when it loads the compiled kernel, before launching."""
        key = self.table_key(args, kwargs)
        candidates = self.candidates(args, kwargs)
        later = candidates[candidates.index(config) + 1:] if config in candidates else []
        for candidate in later:
            try:
                result = self._launch(args, grid, warmup, kwargs, candidate)
            except OutOfResources:
                continue
            logger.info("%s %s: config %s does not fit this GPU (%s); launched %s instead",
                        self.name, key, config, error, candidate)
            self._chosen[values] = self.reached[key].config = candidate
            return result
        raise error

    def _launch(self, args: tuple, grid: Any, warmup: bool, kwargs: dict,
                config: triton.Config) -> Any:
        return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **config.all_kwargs())

    def _autotune(self, args: tuple, grid: Any, warmup: bool, kwargs: dict) -> Any:
        return super().run(*args, grid=grid, warmup=warmup, **kwargs)

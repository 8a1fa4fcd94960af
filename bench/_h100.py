"""Shardline's kernels on the CPU as an H100 would launch them: its SM count and TMA
decide their choices, and Triton launches can be recorded instead of run.

bench/launches.py counts the launches of a decode step this way, bench/startup.py --count
the compiles of a start, bench/kernel_launches.py and kernel_resources.py the launches
and resources of the kernel bench's shapes.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import Iterator
from unittest import mock

H100_SMS = 132


@contextlib.contextmanager
def as_on_h100(sms: int = H100_SMS) -> Iterator[None]:
    """Make the kernels see an H100 whatever the device: its SM count (for matmul's split-K
    and decode attention's context splits) and TMA (which GEMM tiles are candidates)."""
    from shardline.kernels import _config, matmul
    saved = _config.num_sms, matmul.tma_capable
    _config.num_sms = lambda device, on_cpu: sms
    matmul.tma_capable = lambda device: True
    try:
        yield
    finally:
        _config.num_sms, matmul.tma_capable = saved


def _signature(fn: object, args: tuple, kwargs: dict, tile: dict) -> tuple:
    """What makes two launches one compiled kernel: argument specialization and launch
    options, leaving out the tile config `tile` (counted separately)."""
    from shardline.kernels._compile import specialize
    spec = specialize(fn, args, {**kwargs, **tile})
    constexprs = sorted((k, repr(v)) for k, v in spec.constexprs.items() if k not in tile)
    options = (kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))
    return tuple(sorted(spec.types.items())), tuple(constexprs), tuple(sorted(spec.aligned)), \
        options


@contextlib.contextmanager
def recording_launches(sms: int = H100_SMS, counts: Counter | None = None
                       ) -> Iterator[dict[str, dict[str, set]]]:
    """Within it, Triton kernels on CPU tensors record their launches instead of running,
    as on an H100 with `sms` SMs: kernel -> key ("" for an untuned kernel) -> launch
    signatures; `counts`, if given, gains one per launch of each kernel."""
    import triton
    from shardline.kernels import _config, _tuned, dispatch

    seen: dict[str, dict[str, set]] = {}

    counts = Counter() if counts is None else counts

    def plain_run(fn, *args, grid, warmup, **kwargs):
        counts[fn.__name__] += 1
        seen.setdefault(fn.__name__, {}).setdefault("", set()).add(
            _signature(fn, args, kwargs, {}))

    def tuned_launch(kernel, args, grid, warmup, kwargs, config):
        counts[kernel.name] += 1
        seen.setdefault(kernel.name, {}).setdefault(kernel.table_key(args, kwargs), set()).add(
            _signature(kernel.fn, args, kwargs, config.kwargs))

    env = {"SHARDLINE_FORCE_TRITON": "1", _tuned.TABLE_ENV: "none"}
    with mock.patch.dict(os.environ, env), \
            mock.patch.object(triton.runtime.JITFunction, "run", plain_run), \
            mock.patch.object(_config.TunedKernel, "_launch", tuned_launch), \
            as_on_h100(sms):
        dispatch.reset_triton_choice()
        _tuned.reset()
        _tuned.set_autotuning(False)
        try:
            yield seen
        finally:
            dispatch.reset_triton_choice()
            _tuned.reset()

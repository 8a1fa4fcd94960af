"""Launch configs tuned ahead of time, shipped per GPU, so a start times nothing.

bench/tune.py times every candidate config of every Triton kernel at the shape buckets a
model reaches, and writes the winners to `tuned/<gpu slug>.json` in this package. A launch
whose autotune key is in the table of the GPU it runs on uses that config directly: one
compile per shape and no timing. The table also says, per linear shape and the op its GEMM
feeds, whether the Triton form or the torch.matmul (cuBLAS) form of that op was faster.

A miss times nothing, as serving engines treat an untuned GPU: the kernel runs the first
candidate config that its prune keeps, and a linear takes its torch.matmul form, since
cuBLAS is the one GEMM known to be good on any GPU. So a start on a GPU without a table
compiles one config per kernel shape, and its linears are never slower than cuBLAS.
SHARDLINE_AUTOTUNE=1 autotunes a miss instead (triton.autotune over the candidates, a
linear in its Triton form), except in eager mode.

SHARDLINE_TUNED_TABLE names a table file to use instead of the packaged one ("none": no
table). Tables are read once per process; `reset` forgets what was read.

The kernels that read the table are shardline.kernels._config's TunedKernels. This module
itself imports no Triton: the engine reaches it on every device, and a model on the CPU
never loads Triton.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    import triton

    from shardline.kernels._config import TunedKernel

FORMAT_VERSION = 1
TABLE_DIR = Path(__file__).resolve().with_name("tuned")
TABLE_ENV = "SHARDLINE_TUNED_TABLE"
AUTOTUNE_ENV = "SHARDLINE_AUTOTUNE"
BACKENDS = ("triton", "torch")
SMALLEST_BUCKET = 16
LINEAR_OPS = ("linear", "silu_mul", "rms_norm", "qkv_rotary")
"""What a linear's GEMM feeds, and so what tuning times as one whole against its cuBLAS
form: nothing (the plain product), SiLU(gate) * up, the residual add and RMSNorm after a
row-parallel projection, and the rotary + KV-cache write after the QKV projection. The
Triton forms of the last two fold the split-K reduction into the op after it, so a GEMM
that loses to cuBLAS alone may still win with its fusion."""

class TunedTableError(ValueError):
    """A tuned-table file that cannot be used, with the path and the entry at fault."""


@dataclass
class TunedTable:
    """Per kernel, a key string -> its config; per linear key, the faster backend."""

    device: str
    kernels: dict[str, dict[str, triton.Config]] = field(default_factory=dict)
    linear: dict[str, dict[str, Any]] = field(default_factory=dict)
    tuned_with: dict[str, str] = field(default_factory=dict)


def device_slug(name: str) -> str:
    """A file name for a GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def packaged_table_path(device_name: str) -> Path:
    return TABLE_DIR / f"{device_slug(device_name)}.json"


def key_string(names: list[str], values: tuple, dtype: torch.dtype) -> str:
    """The table key of a launch: its autotune-key values and its first tensor's dtype."""
    parts = [f"{name}={value}" for name, value in zip(names, values)]
    return ",".join(parts + [f"dtype={str(dtype).removeprefix('torch.')}"])


def shape_bucket(n: int, cap: int = 4096) -> int:
    """The autotune key of a size: its next power of two, at least SMALLEST_BUCKET and at
    most `cap`, so tuning runs per bucket. Every kernel's row tiles are at least 16 rows
    (tl.dot's smallest), so sizes under 16 choose among the same tiles: one bucket."""
    return min(1 << (max(n, SMALLEST_BUCKET) - 1).bit_length(), cap)


def linear_key(m: int, weight_rows: int, k: int, dtype: torch.dtype, op: str) -> str:
    """The table key of a linear shape and the op its GEMM feeds (one of LINEAR_OPS), in
    the matmul kernel's bucketing of M."""
    return key_string(["M_BUCKET", "N", "K", "OP"], (shape_bucket(m), weight_rows, k, op),
                      dtype)


def config_to_json(config: triton.Config) -> dict[str, Any]:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
            "num_stages": config.num_stages}


def config_from_json(data: Any, where: str) -> triton.Config:
    if not isinstance(data, dict) or set(data) != {"kwargs", "num_warps", "num_stages"}:
        raise TunedTableError(f"{where}: a config is {{kwargs, num_warps, num_stages}}; "
                              f"got {data!r}")
    kwargs, warps, stages = data["kwargs"], data["num_warps"], data["num_stages"]
    if not isinstance(kwargs, dict) or not all(
            isinstance(v, (int, bool, str)) for v in kwargs.values()):
        raise TunedTableError(f"{where}: kwargs must map names to ints, bools or strings; "
                              f"got {kwargs!r}")
    if not isinstance(warps, int) or warps < 1 or warps & (warps - 1):
        raise TunedTableError(f"{where}: num_warps must be a power of two; got {warps!r}")
    if not isinstance(stages, int) or stages < 1:
        raise TunedTableError(f"{where}: num_stages must be an int >= 1; got {stages!r}")
    import triton
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def _mapping(data: Any, where: str) -> dict:
    if not isinstance(data, dict):
        raise TunedTableError(f"{where} must be a JSON object; got {type(data).__name__}")
    return data


def table_from_json(data: Any, where: str) -> TunedTable:
    """The table a JSON document describes; TunedTableError names what is wrong."""
    data = _mapping(data, where)
    if data.get("format") != FORMAT_VERSION:
        raise TunedTableError(f"{where}: format must be {FORMAT_VERSION}; got "
                              f"{data.get('format')!r}")
    if not isinstance(data.get("device"), str):
        raise TunedTableError(f"{where}: device must be the GPU's name; got "
                              f"{data.get('device')!r}")
    kernels = {name: {key: config_from_json(config, f"{where}: kernels.{name}[{key}]")
                      for key, config in _mapping(entries, f"{where}: kernels.{name}").items()}
               for name, entries in _mapping(data.get("kernels", {}), f"{where}: kernels").items()}
    linear = _mapping(data.get("linear", {}), f"{where}: linear")
    for key, entry in linear.items():
        if not isinstance(entry, dict) or entry.get("backend") not in BACKENDS:
            raise TunedTableError(f"{where}: linear[{key}] must name a backend in "
                                  f"{BACKENDS}; got {entry!r}")
    return TunedTable(data["device"], kernels, linear,
                      dict(_mapping(data.get("tuned_with", {}), f"{where}: tuned_with")))


def table_to_json(table: TunedTable) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "device": table.device, "tuned_with": table.tuned_with,
            "kernels": {name: {key: config_to_json(c) for key, c in sorted(entries.items())}
                        for name, entries in sorted(table.kernels.items())},
            "linear": dict(sorted(table.linear.items()))}


def read_table(path: str | os.PathLike) -> TunedTable:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TunedTableError(f"{path}: not valid JSON ({e})") from None
    return table_from_json(data, str(path))


def write_table(table: TunedTable, path: str | os.PathLike) -> None:
    """Replace the table at `path` in one rename: bench/tune.py rewrites it after every chunk
    of keys and may be killed at its time limit, which must leave the last whole table (an
    engine refuses a truncated one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(table_to_json(table), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


KERNELS: dict[str, TunedKernel] = {}
"""Every tuned kernel defined in this process, by name (shardline.kernels._config)."""
_tables: dict[str, TunedTable | None] = {}
_linear_choice: dict[tuple, bool] = {}
_qkv_heads: dict[tuple, tuple[int, int, int]] = {}
_autotuning: bool | None = None
# Per thread (and task), as triton's AsyncCompileMode is: another thread's launches run.
_compiling_ahead: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "shardline_compiling_ahead", default=False)


def device_name() -> str | None:
    """The current CUDA device's name, None without CUDA."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def current_table() -> TunedTable | None:
    """The table of the current GPU: SHARDLINE_TUNED_TABLE's file if set (None if it says
    "none"), else the packaged file for this GPU's name, if there is one."""
    override = os.environ.get(TABLE_ENV)
    name = device_name()
    cache_key = f"{override}|{name}"
    if cache_key not in _tables:
        if override:
            path = None if override.lower() == "none" else Path(override)
            if path is not None and not path.is_file():
                raise TunedTableError(f"{TABLE_ENV}={override}: no such file (name a table "
                                      f"written by bench/tune.py, or 'none' for no table)")
        else:
            path = packaged_table_path(name) if name else None
            path = path if path is not None and path.is_file() else None
        _tables[cache_key] = read_table(path) if path is not None else None
    return _tables[cache_key]


def compiling_ahead() -> bool:
    """Whether tuned-kernel launches here only compile (within `compile_ahead`)."""
    return _compiling_ahead.get()


def set_autotuning(enabled: bool) -> None:
    """Whether a table miss may be autotuned in this process where SHARDLINE_AUTOTUNE=1
    asks for it (the engine says no in eager mode)."""
    global _autotuning
    _autotuning = enabled


def autotuning_allowed() -> bool:
    """Whether a table miss is autotuned: only under SHARDLINE_AUTOTUNE=1, never where
    set_autotuning(False) said no."""
    value = os.environ.get(AUTOTUNE_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV}={value!r} is invalid: 1 autotunes the kernel "
                         "shapes missing from the GPU's tuned table, 0 or unset runs a "
                         "default config for them")
    return value == "1" and _autotuning is not False


def reset() -> None:
    """Forget the tables read and the choices made (for code that changes the settings)."""
    global _autotuning
    _tables.clear()
    _linear_choice.clear()
    _qkv_heads.clear()
    _autotuning = None
    for kernel in KERNELS.values():
        kernel.forget()


def linear_prefers_torch(x: torch.Tensor, weight: torch.Tensor, op: str,
                         heads: tuple[int, int, int] | None = None) -> bool:
    """True where the table of this GPU found the torch.matmul form of `op` (one of
    LINEAR_OPS) faster for this linear shape, and for a shape it lacks unless autotuning
    is on. `heads` (query heads, KV heads, head size) comes with "qkv_rotary", for
    bench/tune.py to rebuild the op."""
    shape = (x.shape[0], weight.shape[0], weight.shape[1], x.dtype, op)
    choice = _linear_choice.get(shape)
    if choice is None:
        table = current_table()
        entry = table.linear.get(linear_key(*shape)) if table is not None else None
        choice = _linear_choice[shape] = (entry["backend"] == "torch" if entry is not None
                                          else not autotuning_allowed())
        if heads is not None:
            _qkv_heads[shape] = heads
    return choice


def linear_shapes() -> list[tuple[int, int, int, torch.dtype, str, tuple | None]]:
    """(M, weight rows, K, dtype, op, heads) of every linear this process ran on CUDA, heads
    None but for "qkv_rotary": the shapes bench/tune.py times against torch.matmul."""
    return [(*shape, _qkv_heads.get(shape)) for shape in _linear_choice]


@contextlib.contextmanager
def compile_ahead(device: torch.device) -> Iterator[bool]:
    """Within it, tuned-kernel launches only compile their configs, on a thread per CPU
    core (triton's compiler releases the GIL), and launch nothing; leaving it waits for
    every compile. Yields False, compiling nothing ahead, off CUDA, in the interpreter and
    where this triton lacks AsyncCompileMode."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        AsyncCompileMode = None
    if (AsyncCompileMode is None or device.type != "cuda"
            or os.environ.get("TRITON_INTERPRET") == "1"):
        yield False
        return
    workers = max(1, min(32, len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
        token = _compiling_ahead.set(True)
        try:
            yield True
        finally:
            _compiling_ahead.reset(token)

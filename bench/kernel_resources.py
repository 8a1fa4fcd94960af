"""What each Triton kernel config costs an H100 in registers, spills and shared memory,
measured without a GPU.

Every launch the kernel wrappers make for the bench shapes (bench/kernel_launches.py)
is compiled for sm_90 once per config of its autotune table; ptxas's report gives the
registers per thread and spill bytes, the compiled kernel its shared memory. From those
and an H100's per-SM limits follow how many blocks fit on an SM and whether the config
can launch at all. These are compile-time facts, deterministic per triton version, not
timings. Results go to results/kernel_resources.json, one entry per triton version.

    python bench/kernel_resources.py            # every kernel, config and shape
    python bench/kernel_resources.py --quick    # a CI-sized subset
    python bench/kernel_resources.py --check    # exit 1 if a config the autotuner may
                                                # choose spills or cannot launch
"""

from __future__ import annotations

import os

# Resources are those of compiled code: the interpreter compiles nothing. Fusion is
# triton's default; saying so silences triton 3.9's warning about a future change.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse
import importlib
import json
import multiprocessing
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import triton

from shardline.kernels._compile import (SM90, Specialization, compile_sm90,
                                        cuda_backend_available, jit_function, specialize)

import kernel_launches
from _configs import describe
from _h100 import as_on_h100
from kernel_launches import Launch

RESULTS = Path(__file__).resolve().parent / "results" / "kernel_resources.json"
MAX_WORKERS = 2
MIN_GOOD_CANDIDATES = 2


@dataclass(frozen=True)
class H100:
    """The per-SM limits of an H100 (sm_90) that bound how many blocks are resident."""

    regs_per_sm: int = 65536
    regs_per_thread: int = 255
    reg_alloc_unit: int = 256          # registers are granted per warp in these units
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024
    smem_reserved_per_block: int = 1024
    warps_per_sm: int = 64
    blocks_per_sm: int = 32


@dataclass(frozen=True)
class Job:
    """One compile: a kernel under one specialization and launch options."""

    module: str
    kernel: str
    spec: Specialization
    num_warps: int
    num_stages: int

    def key(self) -> str:
        """Equal for jobs that compile to the same binary."""
        return repr((self.module, self.kernel, sorted(self.spec.types.items()),
                     sorted((k, repr(v)) for k, v in self.spec.constexprs.items()),
                     sorted(self.spec.aligned), self.num_warps, self.num_stages))


@dataclass
class Resources:
    """What one compiled config uses, and what that allows on an H100."""

    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0
    shared: int = 0
    blocks_per_sm: int = 0
    limited_by: str = ""
    occupancy: float = 0.0
    launchable: bool = False
    error: str = ""

    @property
    def verdict(self) -> str:
        """"ok", or why the config must not run: a compile error, no launch, spills."""
        if self.error:
            return f"error: {self.error}"
        if not self.launchable:
            return f"cannot launch ({self.shared} B shared, {self.registers} registers)"
        if self.spill_stores or self.spill_loads:
            return f"spills {self.spill_stores}/{self.spill_loads} B"
        return "ok"


def occupancy(res: Resources, num_warps: int, gpu: H100 = H100()) -> Resources:
    """Fill in how many blocks of `num_warps` fit on one SM, what limits them, and
    whether one block fits at all."""
    unit = gpu.reg_alloc_unit
    regs_per_warp = -(-max(res.registers, 1) * 32 // unit) * unit
    limits = {"regs": gpu.regs_per_sm // regs_per_warp // num_warps,
              "smem": gpu.smem_per_sm // (res.shared + gpu.smem_reserved_per_block),
              "warps": gpu.warps_per_sm // num_warps,
              "blocks": gpu.blocks_per_sm}
    res.limited_by = min(limits, key=limits.get)
    res.blocks_per_sm = limits[res.limited_by]
    res.occupancy = res.blocks_per_sm * num_warps / gpu.warps_per_sm
    res.launchable = (res.shared <= gpu.smem_per_block and res.blocks_per_sm > 0
                      and res.registers <= gpu.regs_per_thread)
    return res


def parse_ptxas(log: str) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, stack frame bytes) from `ptxas -v`."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                      r"(\d+) bytes spill loads", log)
    if regs is None or frame is None:
        raise ValueError(f"no register or spill report in the ptxas log: {log[-500:]!r}")
    return int(regs[1]), int(frame[2]), int(frame[3]), int(frame[1])


def measure(job: Job) -> Resources:
    """Compile one job for sm_90 and read off its resources (in a worker process)."""
    module = importlib.import_module(f"shardline.kernels.{job.module}")
    try:
        build = compile_sm90(getattr(module, job.kernel), job.spec.types, job.spec.constexprs,
                             aligned=job.spec.aligned, num_warps=job.num_warps,
                             num_stages=job.num_stages)
        regs, stores, loads, frame = parse_ptxas(build.ptxas_log)
    except Exception as error:  # a config that does not compile is a finding, not a crash
        lines = str(error).strip().splitlines() or [""]
        return Resources(error=f"{type(error).__name__}: {lines[-1][:200]}")
    return occupancy(Resources(regs, stores, loads, frame, build.compiled.metadata.shared),
                     job.num_warps)


@dataclass
class Candidate:
    """A config one launch may run with: its compile job and whether the autotuner's
    prune keeps it for this launch's shape."""

    job: Job
    config: str
    tile_keys: frozenset[str]
    choosable: bool


def candidates(launch: Launch) -> list[Candidate]:
    """The configs a launch may compile with: each of its autotune table (marked by
    whether the table's prune keeps it for this launch), or its own launch options."""
    module = importlib.import_module(f"shardline.kernels.{launch.module}")
    kernel = getattr(module, launch.kernel)
    if not isinstance(kernel, triton.runtime.Autotuner):
        kwargs = dict(launch.kwargs)
        warps, stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
        job = Job(launch.module, launch.kernel, specialize(kernel, launch.args, kwargs),
                  warps, stages)
        described = describe(triton.Config({}, num_warps=warps, num_stages=stages), short=True)
        return [Candidate(job, described, frozenset(), True)]
    kept = kernel.configs
    if kernel.early_config_prune is not None:
        positional = dict(zip(jit_function(kernel).arg_names, launch.args))
        with as_on_h100():
            kept = kernel.early_config_prune(kernel.configs, positional, **launch.kwargs)
    found = []
    for config in kernel.configs:
        spec = specialize(kernel, launch.args, launch.kwargs | config.kwargs)
        job = Job(launch.module, launch.kernel, spec, config.num_warps, config.num_stages)
        found.append(Candidate(job, describe(config, short=True), frozenset(config.kwargs),
                               config in kept))
    return found


def variant(job: Job, tile_keys: frozenset[str]) -> str:
    """The compile-time choices of a job other than its tile config: dtypes and flags."""
    fn = jit_function(getattr(importlib.import_module(f"shardline.kernels.{job.module}"),
                              job.kernel))
    declared = {p.name for p in fn.params if p.is_constexpr}
    dtypes = sorted({t.lstrip("*") for t in job.spec.types.values()
                     if t.startswith("*") and t not in ("*i32", "*i64")})
    flags = [f"{k.removeprefix('BLOCK_')}={v}" for k, v in job.spec.constexprs.items()
             if k in declared and k not in tile_keys and v is not False
             and k not in ("PRECISION", "DOT_PRECISION", "KV_BLOCK_SIZE", "BLOCK_SIZE")]
    return " ".join(["/".join(dtypes), *flags])


def compile_all(jobs: list[Job], workers: int) -> list[Resources]:
    """Measure every job over `workers` processes, reporting progress on stderr."""
    done: list[Resources] = []
    start = time.monotonic()
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for res in pool.map(measure, jobs):
            done.append(res)
            if len(done) % 20 == 0 or len(done) == len(jobs):
                print(f"  compiled {len(done)}/{len(jobs)} in {time.monotonic() - start:.0f} s",
                      file=sys.stderr, flush=True)
    return done


def _ptxas_version() -> str:
    """The release line of the ptxas this triton assembles sm_90 code with."""
    from triton.backends.nvidia.compiler import get_ptxas_version
    text = get_ptxas_version(SM90)
    release = re.search(r"release [\d.]+, V[\d.]+", text)
    return f"{text.split(':')[0]} {release[0] if release else text.strip()[:80]}"


def survey(quick: bool, workers: int, only: str = "") -> dict[str, Any]:
    """Compile every candidate of every captured launch; return the rows and launches.

    With `quick`, only the configs the autotuner may choose are compiled; `only` keeps
    the kernels whose name contains it.
    """
    launches = [launch for launch in kernel_launches.capture(quick) if only in launch.kernel]
    per_launch = [(launch, [c for c in candidates(launch) if c.choosable or not quick])
                  for launch in launches]
    unique: dict[str, Candidate] = {}
    for _, found in per_launch:
        for c in found:
            unique.setdefault(c.job.key(), c)
    keys = list(unique)
    print(f"{len(launches)} launches, {len(keys)} distinct compiles", file=sys.stderr)
    measured = dict(zip(keys, compile_all([unique[k].job for k in keys], workers)))

    rows: dict[str, dict[str, Any]] = {}
    for key, c in unique.items():
        rows[key] = {"kernel": c.job.kernel, "variant": variant(c.job, c.tile_keys),
                     "config": c.config, "num_warps": c.job.num_warps,
                     "verdict": measured[key].verdict, "launches": 0, "choosable_for": [],
                     **asdict(measured[key])}
    launch_rows = []
    for launch, found in per_launch:
        good = []
        for c in found:
            row = rows[c.job.key()]
            row["launches"] += 1
            if c.choosable:
                row["choosable_for"].append(launch.shape)
                if row["verdict"] == "ok":
                    good.append(c.config)
        launch_rows.append({"kernel": launch.kernel, "shape": launch.shape,
                            "autotuned": bool(found[0].tile_keys),
                            "candidates": sum(c.choosable for c in found), "good": good})
    return {"rows": list(rows.values()), "launches": launch_rows}


def compact(result: dict[str, Any]) -> dict[str, Any]:
    """The result as stored: each shape written once, rows and launches name it by index."""
    shapes = sorted({launch["shape"] for launch in result["launches"]})
    index = {shape: i for i, shape in enumerate(shapes)}
    return {"shapes": shapes,
            "rows": [{**row, "choosable_for": [index[s] for s in row["choosable_for"]]}
                     for row in result["rows"]],
            "launches": [{**launch, "shape": index[launch["shape"]]}
                         for launch in result["launches"]]}


def problems(result: dict[str, Any]) -> list[str]:
    """Why --check fails: a choosable config that spills or cannot launch, or an
    autotuned launch left with fewer than MIN_GOOD_CANDIDATES good configs."""
    found = [f"{row['kernel']} [{row['variant']}] {row['config']}: {row['verdict']}; "
             f"choosable for {row['choosable_for'][0]}"
             for row in result["rows"] if row["choosable_for"] and row["verdict"] != "ok"]
    for launch in result["launches"]:
        if launch["autotuned"] and len(launch["good"]) < MIN_GOOD_CANDIDATES:
            found.append(f"{launch['kernel']} for {launch['shape']}: only "
                         f"{len(launch['good'])} good candidates")
    return found


def print_table(result: dict[str, Any]) -> None:
    """One line per (kernel, variant, config), worst case over its specializations, the
    ones the autotuner may choose apart from those its prune drops."""
    merged: dict[tuple, dict[str, Any]] = {}
    for row in result["rows"]:
        key = (row["kernel"], row["variant"], row["config"], not row["choosable_for"])
        worst = merged.setdefault(key, dict(row))
        for field in ("registers", "spill_stores", "spill_loads", "shared"):
            worst[field] = max(worst[field], row[field])
        if row["blocks_per_sm"] < worst["blocks_per_sm"]:
            worst.update(blocks_per_sm=row["blocks_per_sm"], limited_by=row["limited_by"],
                         occupancy=row["occupancy"])
        if worst["verdict"] == "ok":
            worst["verdict"] = row["verdict"]
    header = (f"{'kernel':<22} {'variant':<34} {'config':<28} {'regs':>4} {'spill st/ld':>11} "
              f"{'smem KiB':>8} {'blk/SM':>6} {'occ':>4} {'limit':<6} status")
    print(header)
    print("-" * len(header))
    for (kernel, var, config, pruned), r in sorted(merged.items()):
        status = r["verdict"].split(" (")[0][:60] + (" (pruned)" if pruned else "")
        print(f"{kernel:<22} {var:<34} {config:<28} {r['registers']:>4} "
              f"{r['spill_stores']:>5}/{r['spill_loads']:<5} {r['shared'] / 1024:>8.1f} "
              f"{r['blocks_per_sm']:>6} {r['occupancy']:>4.2f} {r['limited_by']:<6} {status}")


def _git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent)
    return done.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true",
                        help="a CI-sized subset, compiling only the configs the autotuner "
                             "may choose")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a config the autotuner may choose for a listed shape "
                             "spills or cannot launch")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--only", default="", metavar="NAME",
                        help="only the kernels whose name contains NAME")
    parser.add_argument("--workers", type=int, default=MAX_WORKERS, choices=(1, 2),
                        help="compile processes")
    args = parser.parse_args()
    if not cuda_backend_available():
        print("triton has no CUDA backend here: nothing to compile", file=sys.stderr)
        return 2

    start = time.monotonic()
    result = survey(args.quick, args.workers, args.only)
    failures = problems(result)
    print_table(result)
    ptxas = _ptxas_version()
    print(f"\ntriton {triton.__version__} ({ptxas}), sm_90a with H100 limits: compile-time "
          f"resources, not timings; {len(result['rows'])} compiles in "
          f"{time.monotonic() - start:.0f} s")
    for failure in failures:
        print(f"CHECK: {failure}")

    runs = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs[triton.__version__] = {
        "what": "compile-time resources per config on sm_90a, not timings",
        "triton": triton.__version__, "ptxas": ptxas, "git_commit": _git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick, "h100_limits": asdict(H100()), "check_failures": failures,
        **compact(result)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, separators=(",", ":")))
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())

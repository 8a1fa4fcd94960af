"""What bench/kernels.py collects and how it shows it: the targets of issue 4, one Result
per measured case, the Bench state that records them, and the table and plot of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from _timing import Timer

TARGETS = {"matmul M<=16": 1.0, "matmul M>=512": 0.9, "decode attention": 0.8,
           "prefill attention": 0.7, "fused moe": 2.0}
METRICS = {"matmul M<=16": "x cuBLAS", "matmul M>=512": "x cuBLAS",
           "decode attention": "of copy BW", "prefill attention": "x flash SDPA",
           "fused moe": "x expert loop"}


@dataclass
class Result:
    """One measured case: our kernel's median time, the baseline's, and the verdict."""

    bench: str
    case: str
    ms: float
    baseline_ms: float | None
    value: float
    target: float
    rel_err: float
    passed: bool | None
    extra: dict


class Bench:
    """The shared state of a run: device, dtype, timer, ceilings and collected results."""

    def __init__(self, device: torch.device, dtype: torch.dtype, timer: Timer,
                 dry_run: bool) -> None:
        self.device, self.dtype, self.timer, self.dry_run = device, dtype, timer, dry_run
        self.device_name = ("CPU (Triton interpreter)" if dry_run
                            else torch.cuda.get_device_name(device))
        self.max_rel_err = 3e-2 if dtype == torch.bfloat16 else 1e-3
        self.results: list[Result] = []
        self.ceilings: dict[str, float] = {}

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype) * scale

    def copies(self, set_bytes: int) -> int:
        """How many input copies, cycled, keep the working set beyond four times L2."""
        if self.device.type != "cuda":
            return 2
        props = torch.cuda.get_device_properties(self.device)
        l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
        return max(1, min(64, math.ceil(4 * l2_bytes / set_bytes)))

    def record(self, bench: str, case: str, ms: float, baseline_ms: float | None,
               value: float, actual: torch.Tensor, expected: torch.Tensor,
               **extra: float) -> None:
        error = ((actual.float() - expected.float()).abs().max()
                 / expected.float().abs().max().clamp_min(1e-6)).item()
        target = TARGETS[bench]
        passed = None if self.dry_run else bool(value >= target and error <= self.max_rel_err)
        self.results.append(Result(bench, case, ms, baseline_ms, value, target, error, passed,
                                   extra))


def print_table(b: Bench, rows: list[Result] | None = None) -> None:
    """The run's results (or `rows` of them) as a table under the device's ceilings."""
    print(f"device: {b.device_name}  dtype: {b.dtype}  copy BW: "
          f"{b.ceilings['copy_GBps']:.1f} GB/s  matmul: {b.ceilings['matmul_TFLOPs']:.3g} "
          f"TFLOP/s" + ("  (DRY RUN: numbers mean nothing)" if b.dry_run else ""))
    header = (f"{'bench':<18} {'case':<50} {'ms':>9} {'base ms':>9} {'value':>7} "
              f"{'target':>13} {'rel err':>8}  verdict")
    print(header)
    print("-" * len(header))
    for r in b.results if rows is None else rows:
        base = f"{r.baseline_ms:9.3f}" if r.baseline_ms is not None else f"{'-':>9}"
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[r.passed]
        target = f">= {r.target:g} {METRICS[r.bench]}"
        grouped = (f"  ({r.extra['x_grouped_mm']:.2f}x torch._grouped_mm)"
                   if "x_grouped_mm" in r.extra else "")
        grouped += "  (TMA)" if r.extra.get("tma") else ""
        print(f"{r.bench:<18} {r.case:<50} {r.ms:9.3f} {base} {r.value:7.2f} "
              f"{target:>13} {r.rel_err:8.1e}  {verdict}{grouped}")


def plot(b: Bench, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(TARGETS), 1, figsize=(14, 4 * len(TARGETS)))
    for ax, (bench, target) in zip(axes, TARGETS.items()):
        rows = [r for r in b.results if r.bench == bench]
        colors = ["tab:green" if r.passed else "tab:gray" if r.passed is None else "tab:red"
                  for r in rows]
        ax.bar(range(len(rows)), [r.value for r in rows], color=colors)
        ax.axhline(target, color="black", linestyle="--", label=f"target {target:g}")
        ax.set_xticks(range(len(rows)), [r.case for r in rows], rotation=30, ha="right",
                      fontsize=7)
        ax.set_title(f"{bench} ({METRICS[bench]})")
        ax.legend(loc="upper right")
    fig.suptitle(f"shardline kernels on {b.device_name}, {b.dtype}"
                 + (" (dry run)" if b.dry_run else ""))
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)

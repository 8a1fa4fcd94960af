"""Where runs go: one JSON record per run (appended to a .jsonl file), and a plot.

A record holds the run's summary with what makes it comparable: the model, the layout,
the workload, the package versions, the device and the git revision of the checkout.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

LAYOUT_KEYS = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
               "sequence_parallel_size", "enable_expert_parallel")


def environment() -> dict:
    """Versions, the device and the git revision (None outside a git checkout)."""
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from importlib.metadata import PackageNotFoundError, version
    try:
        shardline_version = version("shardline")
    except PackageNotFoundError:
        shardline_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return {"shardline": shardline_version, "torch": torch.__version__,
            "triton": triton_version, "python": platform.python_version(),
            "device": device, "cpus": os.cpu_count(), "git_revision": _git_revision()}


def _git_revision() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def make_record(mode: str, target: str, layout: dict, workload: dict, summary: dict) -> dict:
    return {"mode": mode, "target": target, "layout": layout, "workload": workload,
            "command": " ".join(["shardline", *sys.argv[1:]]), **environment(),
            "results": summary}


def strict_json(value):
    """`value` with every float that is not finite written as a string ("inf", "-inf",
    "nan"), which strict JSON parsers read: they refuse Python's Infinity and NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def to_json(value, indent: int | None = None) -> str:
    """Strict JSON text of `value` (see strict_json)."""
    return json.dumps(strict_json(value), indent=indent, allow_nan=False)


def append_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as out:
        out.write(to_json(record) + "\n")


def read_records(path: Path) -> list[dict]:
    """Every record in the file, those written before strict_json (with Infinity) too; a
    ValueError names the first line that is not JSON or not a record the plot can draw."""
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from None
            wrong = _not_a_record(record)
            if wrong is not None:
                raise ValueError(f"line {number} {wrong}")
            records.append(record)
    return records


def _not_a_record(record) -> str | None:
    """What keeps `record` from being a run's record, or None."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    if record.get("mode") not in ("online", "offline"):
        return 'has no "mode" of "online" or "offline"'
    for key, kind in (("target", str), ("layout", dict), ("results", dict)):
        if not isinstance(record.get(key), kind):
            return f'has no "{key}" ({"text" if kind is str else "an object"})'
    return None


def layout_name(layout: dict) -> str:
    sizes = [f"{key.split('_')[0]}{layout[key]}" for key in LAYOUT_KEYS[:4]
             if layout.get(key, 1) != 1]
    name = "x".join(sizes) or "1 rank"
    return name + (" +ep" if layout.get("enable_expert_parallel") else "")


def plot(records: list[dict], path: Path) -> bool:
    """Online runs: end-to-end latency p50 against output tokens/s, one line per layout
    across its rates. Offline runs: one bar of output tokens/s per run. Returns False
    (and draws nothing) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    online = [r for r in records if r["mode"] == "online"]
    offline = [r for r in records if r["mode"] == "offline"]
    panels = [p for p in (online, offline) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    axes = list(axes[0])
    if online:
        ax = axes.pop(0)
        by_layout: dict[str, list[dict]] = {}
        for record in online:
            by_layout.setdefault(f"{record['target']} {layout_name(record['layout'])}",
                                 []).append(record["results"])
        for name, results in by_layout.items():
            results.sort(key=lambda r: r["output_tokens_per_s"])
            ax.plot([r["output_tokens_per_s"] for r in results],
                    [r["e2e_latency_s"].get("p50", float("nan")) for r in results],
                    marker="o", label=name)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("end-to-end latency p50 (s)")
        ax.set_title("online: latency against throughput across request rates")
        ax.legend()
    if offline:
        ax = axes.pop(0)
        labels = [f"{i}: {r['target']} {layout_name(r['layout'])}"
                  for i, r in enumerate(offline)]
        ax.bar(range(len(offline)), [r["results"]["output_tokens_per_s"] for r in offline])
        ax.set_xticks(range(len(offline)), labels, rotation=20, ha="right")
        ax.set_ylabel("output tokens/s")
        ax.set_title("offline runs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

"""The machine a CPU bench ran on, as its JSON records it: the numbers of a shared
machine mean little without its cores and load."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_info(cores_note: str, versions: dict[str, str | None]) -> dict:
    """The CPU model, the cores this process may run on (with `cores_note` on how the
    bench shares them), the load average now, the platform and Python, then `versions`
    (package -> version, or any other detail the bench's numbers depend on)."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return {
        "cpu": models[0] if models else platform.processor(),
        "cores_available": len(os.sched_getaffinity(0)),
        "cores_note": cores_note,
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }

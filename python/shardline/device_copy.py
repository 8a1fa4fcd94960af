"""Host-to-device copies that do not wait for the device.

A plain copy of pageable host memory to a GPU waits until the device has run everything
queued before it. With async scheduling the host prepares step N+1 while the device runs
step N, so such a wait would undo the overlap: each step's small host arrays go through
pinned memory instead (whose blocks torch's caching host allocator keeps until the copy
that reads them has run).
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values: torch.Tensor | np.ndarray | list, device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` (a host tensor, numpy array or list) as a tensor on `device`; on the CPU
    it may share memory with `values`."""
    if isinstance(values, np.ndarray):
        host = torch.from_numpy(values) if dtype is None else torch.from_numpy(values).to(dtype)
    else:
        host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)

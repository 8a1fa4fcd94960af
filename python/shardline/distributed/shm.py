"""Shared-memory all-reduce and all-gather for CPU ranks of one machine.

A thin layer over shardline._shm.ShmCollectives (csrc/shm_collectives.cpp): the group's
rank 0 creates the segment, the name travels over the group's gloo CPU group, the
others attach, and every rank agrees over gloo whether all of that worked. If anything
failed on any rank (no /dev/shm, too little room in it, a rank on another machine)
every rank gets None and the communicator keeps using gloo.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from shardline._shm import ShmCollectives

logger = logging.getLogger(__name__)

DEFAULT_BUFFER_BYTES = 256 * 1024
"""Staging bytes per rank (twice: two generations); larger tensors go through in pieces.
Pieces this small keep a collective's working set (this rank's staging, the peers' and
the output) closer to a core's L2: at 4 ranks on 2 cores, 1 MiB calls ran 1.4 to 1.5
times faster than in one 1 MiB piece (bench/README.md, collectives.py)."""

MAX_SHM_BUFFER_BYTES = 256 << 20
"""The largest staging size csrc/shm_collectives.hpp accepts (kMaxCollectiveBuffer)."""

_NAME_BYTES = 64

SUPPORTED_DTYPES = {getattr(torch, name): name for name in ShmCollectives.dtypes.split(", ")}
"""The dtypes the shared-memory all-reduce sums (all-gather moves any dtype)."""


class ShmGroup:
    """One rank's handle on a group's shared segment; collectives take CPU tensors."""

    def __init__(self, handle: ShmCollectives, timeout: float | None):
        self._handle = handle
        self.timeout = timeout

    @property
    def name(self) -> str:
        return self._handle.name

    @property
    def size(self) -> int:
        return self._handle.n_ranks

    def can_all_reduce(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in SUPPORTED_DTYPES

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the group in place (through a contiguous copy if x is not contiguous)."""
        target = x if x.is_contiguous() else x.contiguous()
        self._handle.all_reduce(target.data_ptr(), target.numel(), SUPPORTED_DTYPES[x.dtype],
                                self.timeout)
        if target is not x:
            x.copy_(target)
        return x

    def all_gather(self, x: torch.Tensor, dim: int, out: torch.Tensor) -> torch.Tensor:
        """Writes every rank's x (a CPU tensor of at least one dimension) concatenated
        along `dim`, in rank order, into `out` (contiguous, of that shape) in one pass over
        the shared buffers, and returns out."""
        source = x.contiguous()
        inner = math.prod(x.shape[dim:]) * x.element_size()
        self._handle.all_gather(source.data_ptr(), out.data_ptr(),
                                source.numel() * source.element_size(), inner, self.timeout)
        return out

    def close(self) -> None:
        """Ends the group for every rank (their waits raise); idempotent."""
        self._handle.close()


def _broadcast_name(name: str, cpu_group: dist.ProcessGroup, src: int) -> str:
    data = torch.tensor(list(name.encode().ljust(_NAME_BYTES, b"\0")), dtype=torch.uint8)
    dist.broadcast(data, src=src, group=cpu_group)
    return bytes(data.tolist()).rstrip(b"\0").decode()


def _all_ok(ok: bool, cpu_group: dist.ProcessGroup) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=cpu_group)
    return bool(flag.item())


def create_shm_group(ranks: Sequence[int], rank_in_group: int, cpu_group: dist.ProcessGroup,
                     *, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                     timeout: float | None = None) -> ShmGroup | None:
    """Sets up the shared segment of one group; every rank of the group calls it together.

    `ranks` are the group's global ranks (rank_in_group indexes them), all on this
    machine. Returns None on every rank if any rank could not take part.
    """
    handle: ShmCollectives | None = None
    error = ""
    if rank_in_group == 0:
        try:
            handle = ShmCollectives.create(len(ranks), buffer_bytes)
        except (OSError, ValueError) as exc:
            error = f"creating the segment failed: {exc}"
    name = _broadcast_name(handle.name if handle else "", cpu_group, src=ranks[0])
    if rank_in_group != 0 and name:
        try:
            handle = ShmCollectives.attach(name, rank_in_group)
        except (OSError, ValueError) as exc:
            error = f"attaching to {name} failed: {exc}"
    pids = [torch.empty(1, dtype=torch.int64) for _ in ranks]
    dist.all_gather(pids, torch.tensor([os.getpid()]), group=cpu_group)
    if not _all_ok(handle is not None, cpu_group):
        if handle is not None:
            handle.close()
        logger.warning("shared-memory collectives unavailable for ranks %s, using gloo%s",
                       list(ranks), f" ({error})" if error else "")
        return None
    handle.wait_attached(timeout=timeout, pids=[int(pid) for pid in pids])
    return ShmGroup(handle, timeout)

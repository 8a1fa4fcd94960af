"""Where this process sits in the rank grid: its tensor- and pipeline-parallel coordinates.

Layers ask this module for their partition sizes, so turning on tensor parallelism only
changes what is stored here. Until a process group is installed, every process is the
single rank of a one-rank grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class GroupCoordinate:
    """One parallel dimension as seen from this rank: its index, the group size, the group."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group (in place); a one-rank group returns x unchanged."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along `dim`, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


_tp = GroupCoordinate()
_pp = GroupCoordinate()


def get_tp_group() -> GroupCoordinate:
    return _tp


def get_pp_group() -> GroupCoordinate:
    return _pp


def set_parallel_state(tp: GroupCoordinate, pp: GroupCoordinate) -> None:
    """Install this rank's coordinates; called by the worker before it builds the model."""
    global _tp, _pp
    for name, coord in (("tp", tp), ("pp", pp)):
        if not 0 <= coord.rank < coord.size:
            raise ValueError(f"{name} rank={coord.rank} is invalid: must be in [0, {coord.size})")
        if coord.size > 1 and coord.group is None and not dist.is_initialized():
            raise ValueError(f"{name} size={coord.size} needs torch.distributed initialized "
                             "or an explicit process group")
    _tp, _pp = tp, pp

"""The rank grid as plain arithmetic: world = DP x PP x SP x TP, TP innermost.

Tensor-parallel ranks are contiguous (a TP group stays on one node, on the fastest
links), then sequence parallel, then pipeline stages, then data-parallel replicas:

    rank = ((dp * PP + pp) * SP + sp) * TP + tp

A group of one dimension holds the ranks that differ only in that coordinate. The
expert-parallel (EP) group spans the DP x SP x TP ranks of one pipeline stage. Nothing
here touches torch.distributed, so the layout can be checked and tested without
processes; parallel_state builds the process groups from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

DIMENSIONS = ("dp", "pp", "sp", "tp")
"""The grid's dimensions, outermost first."""

GROUP_KINDS = ("tp", "sp", "pp", "dp", "ep")
"""Every kind of group, in the order process groups are created on every rank."""


class ParallelSizes(Protocol):
    """Anything that names the four sizes the way ParallelConfig does."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    sequence_parallel_size: int


@dataclass(frozen=True)
class Coordinates:
    """Where one rank sits: its index along each dimension and in its EP group."""

    dp: int
    pp: int
    sp: int
    tp: int
    ep: int


@dataclass(frozen=True)
class RankGrid:
    """The sizes of the four dimensions; every method is pure arithmetic on them."""

    dp: int = 1
    pp: int = 1
    sp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in DIMENSIONS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} size={value!r} is invalid: must be an integer >= 1")

    @classmethod
    def from_sizes(cls, sizes: ParallelSizes) -> RankGrid:
        """The grid of a ParallelConfig (or anything with the same four size attributes)."""
        return cls(dp=sizes.data_parallel_size, pp=sizes.pipeline_parallel_size,
                   sp=sizes.sequence_parallel_size, tp=sizes.tensor_parallel_size)

    @classmethod
    def for_world(cls, world_size: int, *, tp: int = 1, pp: int = 1, dp: int = 1,
                  sp: int = 1) -> RankGrid:
        """The grid of these sizes, checked to fill exactly `world_size` ranks."""
        grid = cls(dp=dp, pp=pp, sp=sp, tp=tp)
        if grid.world_size != world_size:
            raise ValueError(f"world_size={world_size!r} does not match the grid: dp={dp} x "
                             f"pp={pp} x sp={sp} x tp={tp} = {grid.world_size} ranks; the "
                             "product of the sizes must equal the world size")
        return grid

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.sp * self.tp

    def size(self, kind: str) -> int:
        """The size of one group of `kind` (one of GROUP_KINDS)."""
        if kind == "ep":
            return self.dp * self.sp * self.tp
        self._check_kind(kind)
        return getattr(self, kind)

    def rank_of(self, *, dp: int = 0, pp: int = 0, sp: int = 0, tp: int = 0) -> int:
        """The global rank at these coordinates."""
        for name, value in (("dp", dp), ("pp", pp), ("sp", sp), ("tp", tp)):
            if not 0 <= value < getattr(self, name):
                raise ValueError(f"{name} coordinate={value} is invalid: must be in "
                                 f"[0, {getattr(self, name)})")
        return ((dp * self.pp + pp) * self.sp + sp) * self.tp + tp

    def coordinates(self, rank: int) -> Coordinates:
        """Every coordinate of `rank`, including its index in its EP group."""
        self._check_rank(rank)
        rest, tp = divmod(rank, self.tp)
        rest, sp = divmod(rest, self.sp)
        dp, pp = divmod(rest, self.pp)
        return Coordinates(dp=dp, pp=pp, sp=sp, tp=tp, ep=(dp * self.sp + sp) * self.tp + tp)

    def group_of(self, kind: str, rank: int) -> list[int]:
        """The global ranks of `rank`'s group of `kind`, ascending."""
        c = self.coordinates(rank)
        if kind == "ep":
            return [self.rank_of(dp=dp, pp=c.pp, sp=sp, tp=tp)
                    for dp in range(self.dp) for sp in range(self.sp) for tp in range(self.tp)]
        self._check_kind(kind)
        fixed = {name: getattr(c, name) for name in DIMENSIONS if name != kind}
        return [self.rank_of(**fixed, **{kind: i}) for i in range(getattr(self, kind))]

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of `kind`, each ascending, ordered by its lowest rank. Together
        they hold each rank exactly once."""
        seen: set[int] = set()
        groups = []
        for rank in range(self.world_size):
            if rank not in seen:
                group = self.group_of(kind, rank)
                seen.update(group)
                groups.append(group)
        return groups

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in GROUP_KINDS:
            raise ValueError(f"group kind={kind!r} is invalid: must be one of {GROUP_KINDS}")

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank!r} is invalid: must be an integer in "
                             f"[0, {self.world_size}) for {self}")

"""Where this process sits in the rank grid, and the process groups it talks through.

Layers ask this module for their groups (get_tp_group() ...), so turning on a layout
only changes what is stored here. Until init_distributed() runs, every process is the
single rank of a one-rank grid and every collective is the identity.

init_distributed() joins the grid (world = DP x PP x SP x TP, see grid.py): it starts
torch.distributed, then creates, on every rank and in the same order, a device group
(NCCL on CUDA, gloo on CPU) and a gloo CPU group for control data for each group of
each kind, and for CPU ranks of one machine the shared segment of each group.
destroy_distributed() leaves it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from shardline.distributed.communicator import Communicator
from shardline.distributed.grid import GROUP_KINDS, Coordinates, ParallelSizes, RankGrid
from shardline.distributed.shm import DEFAULT_BUFFER_BYTES, MAX_SHM_BUFFER_BYTES, create_shm_group
from shardline.distributed.topology import gather_node_ids, on_one_node, warn_split_groups

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


@dataclass
class GroupCoordinate:
    """One group as seen from this rank: its index in the group, the group's size, and
    the communicator that runs its collectives. Outside a grid comm is None: a lone rank,
    or a rank that only needs its coordinates (e.g. to load its weight slice)."""

    rank: int = 0
    size: int = 1
    comm: Communicator | None = None
    name: str = ""

    @property
    def ranks(self) -> tuple[int, ...]:
        """The group's global ranks."""
        return self.comm.ranks if self.comm is not None else tuple(range(self.size))

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def _comm(self, op: str) -> Communicator:
        if self.comm is not None:
            return self.comm
        if self.size == 1:
            return _SOLO
        raise RuntimeError(f"{op} on the {self.name or 'process'} group (rank {self.rank} of "
                           f"{self.size}) needs a communicator: join the grid with "
                           "init_distributed() first")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group (in place); a one-rank group returns x unchanged."""
        return self._comm("all_reduce").all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along `dim`, in rank order."""
        return self._comm("all_gather").all_gather(x, dim)

    def gather(self, x: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        """Every rank's x concatenated along `dim` on group rank `dst`; None elsewhere."""
        return self._comm("gather").gather(x, dst, dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return self._comm("reduce_scatter").reduce_scatter(x, dim)

    def exchange_splits(self, input_splits: Sequence[int]) -> list[int]:
        """The rows each rank will send this one in an all-to-all (see Communicator)."""
        return self._comm("exchange_splits").exchange_splits(input_splits)

    def all_to_all(self, x: torch.Tensor, input_splits: Sequence[int] | None = None,
                   output_splits: Sequence[int] | None = None) -> torch.Tensor:
        return self._comm("all_to_all").all_to_all(x, input_splits, output_splits)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self._comm("broadcast").broadcast(x, src)

    def broadcast_metadata(self, obj: object, src: int = 0) -> object:
        return self._comm("broadcast_metadata").broadcast_metadata(obj, src)

    def send(self, x: torch.Tensor, dst: int) -> None:
        self._comm("send").send(x, dst)

    def recv(self, shape: Sequence[int], dtype: torch.dtype, src: int) -> torch.Tensor:
        return self._comm("recv").recv(shape, dtype, src)

    def send_tensor_dict(self, tensors: dict[str, torch.Tensor], dst: int) -> None:
        self._comm("send_tensor_dict").send_tensor_dict(tensors, dst)

    def recv_tensor_dict(self, src: int) -> dict[str, torch.Tensor]:
        return self._comm("recv_tensor_dict").recv_tensor_dict(src)

    def send_to_next(self, tensors: Sequence[torch.Tensor]) -> None:
        """Pipeline: send tensors, in order, to the next rank of the group (the next stage)."""
        comm = self._comm("send_to_next")
        for t in tensors:
            comm.send(t, (self.rank + 1) % self.size)

    def recv_from_prev(self, shapes: Sequence[Sequence[int]], dtype: torch.dtype
                       ) -> list[torch.Tensor]:
        """Pipeline: receive tensors of these shapes, in order, from the previous stage."""
        comm = self._comm("recv_from_prev")
        return [comm.recv(shape, dtype, (self.rank - 1) % self.size) for shape in shapes]

    def barrier(self) -> None:
        self._comm("barrier").barrier()


_SOLO = Communicator((0,), 0, "cpu")


@dataclass
class ParallelState:
    """This rank's place in the grid and its groups, as init_distributed built them."""

    grid: RankGrid
    rank: int
    device: torch.device
    coordinates: Coordinates
    groups: dict[str, GroupCoordinate]
    node_ids: list[int] = field(default_factory=list)
    expert_dispatch: str | None = None

    def comm_stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """Bytes sent and calls per group and operation (see CommStats). Kinds that share
        one group (EP and TP when DP = SP = 1) are reported once, as "tp+ep"."""
        kinds: dict[int, list[str]] = {}
        comms: dict[int, Communicator] = {}
        for kind, group in self.groups.items():
            if group.size > 1:
                kinds.setdefault(id(group.comm), []).append(kind)
                comms[id(group.comm)] = group.comm
        return {"+".join(kinds[key]): comm.stats.snapshot() for key, comm in comms.items()}

    def reset_comm_stats(self) -> None:
        for group in self.groups.values():
            if group.comm is not None:
                group.comm.stats.reset()


_state: ParallelState | None = None
_tp = GroupCoordinate(name="tp")
_pp = GroupCoordinate(name="pp")
_dp = GroupCoordinate(name="dp")
_sp = GroupCoordinate(name="sp")
_ep = GroupCoordinate(name="ep")
_world = GroupCoordinate(name="world")
_expert_dispatch: str | None = None


def get_tp_group() -> GroupCoordinate:
    return _tp


def get_pp_group() -> GroupCoordinate:
    return _pp


def get_dp_group() -> GroupCoordinate:
    return _dp


def get_sp_group() -> GroupCoordinate:
    return _sp


def get_ep_group() -> GroupCoordinate:
    """The DP x SP x TP ranks of this rank's pipeline stage."""
    return _ep


def get_world_group() -> GroupCoordinate:
    return _world


def get_expert_dispatch() -> str | None:
    """How MoE layers reach their experts when the layout enables expert parallelism over
    more than one rank: "all_to_all" or "all_gather" (ParallelConfig.expert_dispatch);
    None when each rank holds a TP slice of every expert instead."""
    return _expert_dispatch


def get_parallel_state() -> ParallelState | None:
    """What init_distributed built, or None outside a grid."""
    return _state


def set_parallel_state(tp: GroupCoordinate, pp: GroupCoordinate, *,
                       dp: GroupCoordinate | None = None, sp: GroupCoordinate | None = None,
                       ep: GroupCoordinate | None = None,
                       world: GroupCoordinate | None = None,
                       expert_dispatch: str | None = None) -> None:
    """Install this rank's coordinates directly (tests and tools; the worker uses
    init_distributed). Groups not given become one-rank groups."""
    global _tp, _pp, _dp, _sp, _ep, _world, _expert_dispatch
    given = {"tp": tp, "pp": pp, "dp": dp, "sp": sp, "ep": ep, "world": world}
    for name, coord in given.items():
        if coord is not None and not 0 <= coord.rank < coord.size:
            raise ValueError(f"{name} rank={coord.rank} is invalid: must be in [0, {coord.size})")
    solo = {name: coord or GroupCoordinate(name=name) for name, coord in given.items()}
    _tp, _pp, _dp, _sp, _ep, _world = (solo[name] for name in given)
    _expert_dispatch = expert_dispatch if _ep.size > 1 else None


def _resolve_device(device: torch.device | str, rank: int) -> torch.device:
    device = torch.device(device)
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device={device} is invalid: must be cpu or cuda[:index]")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device} but CUDA is not available in this process")
    if device.index is None:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init_distributed(layout: RankGrid | ParallelSizes, rank: int, init_method: str,
                     device: torch.device | str = "cpu", *,
                     timeout: float = DEFAULT_TIMEOUT_S, shm_collectives: bool = True,
                     shm_buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> ParallelState:
    """Join the rank grid as `rank`; every rank of the world calls it with the same
    layout, init_method and device type, and blocks until all have.

    layout: a RankGrid or a ParallelConfig (its four sizes, and whether and how it
    splits experts: enable_expert_parallel, expert_dispatch). init_method: a
    torch.distributed URL every rank reaches, e.g. "tcp://127.0.0.1:29500". device:
    "cpu", or "cuda" (this rank's GPU is rank % device_count) or "cuda:<index>".
    timeout: seconds any collective may wait. shm_collectives: use shared memory for
    CPU all-reduce and all-gather among ranks of one machine (gloo otherwise);
    shm_buffer_bytes: its staging size per rank (larger tensors go in pieces).
    """
    grid = layout if isinstance(layout, RankGrid) else RankGrid.from_sizes(layout)
    grid.coordinates(rank)
    if not isinstance(init_method, str) or not init_method:
        raise ValueError(f"init_method={init_method!r} is invalid: must be a URL such as "
                         "'tcp://127.0.0.1:29500' or 'file:///tmp/store'")
    if shm_collectives and not (isinstance(shm_buffer_bytes, int) and shm_buffer_bytes % 64 == 0
                                and 64 <= shm_buffer_bytes <= MAX_SHM_BUFFER_BYTES):
        raise ValueError(f"shm_buffer_bytes={shm_buffer_bytes!r} is invalid: must be a multiple "
                         f"of 64 in [64, {MAX_SHM_BUFFER_BYTES}]")
    if _state is not None or dist.is_initialized():
        raise RuntimeError("init_distributed: this process is already in a process group; "
                           "call destroy_distributed() first")
    device = _resolve_device(device, rank)
    try:
        state = _build(grid, rank, init_method, device, timeout,
                       shm_buffer_bytes if shm_collectives else 0)
    except BaseException:
        destroy_distributed()
        raise
    if getattr(layout, "enable_expert_parallel", False):
        state.expert_dispatch = layout.expert_dispatch
    _install(state)
    logger.debug("rank %d joined %s at %s: %s", rank, grid, state.coordinates, device)
    return state


def _build(grid: RankGrid, rank: int, init_method: str, device: torch.device, timeout: float,
           shm_buffer_bytes: int) -> ParallelState:
    backend = "nccl" if device.type == "cuda" else "gloo"
    limit = timedelta(seconds=timeout)
    dist.init_process_group(backend=backend, init_method=init_method,
                            world_size=grid.world_size, rank=rank, timeout=limit)
    everyone = tuple(range(grid.world_size))

    def new_groups(ranks: tuple[int, ...]) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
        device_group = (dist.group.WORLD if ranks == everyone
                        else dist.new_group(list(ranks), timeout=limit, backend=backend))
        return device_group, dist.new_group(list(ranks), timeout=limit, backend="gloo")

    made: dict[tuple[int, ...], Communicator] = {}
    if grid.world_size > 1:
        made[everyone] = Communicator(everyone, rank, device, *new_groups(everyone))
    world = made.get(everyone)
    node_ids = gather_node_ids(world.cpu_group if world else None, grid.world_size)
    warn_split_groups(grid, node_ids)
    mine: dict[str, tuple[int, ...]] = {"world": everyone}
    created = {everyone}
    # Every rank creates every group, in the same order, even those it is not in; a
    # group of the same ranks as an earlier one (EP = TP when DP = SP = 1) is reused.
    for kind in GROUP_KINDS:
        for ranks in map(tuple, grid.groups(kind)):
            if rank in ranks:
                mine[kind] = ranks
            if len(ranks) == 1 or ranks in created:
                continue
            created.add(ranks)
            groups = new_groups(ranks)
            if rank in ranks:
                made[ranks] = Communicator(ranks, rank, device, *groups)
    if shm_buffer_bytes and device.type == "cpu":
        # In creation order, so that the members of each group set it up together.
        for ranks, comm in made.items():
            if on_one_node(node_ids, ranks):
                comm.shm = create_shm_group(ranks, comm.rank_in_group, comm.cpu_group,
                                            buffer_bytes=shm_buffer_bytes, timeout=timeout)
    coords = grid.coordinates(rank)
    index = {"tp": coords.tp, "sp": coords.sp, "pp": coords.pp, "dp": coords.dp,
             "ep": coords.ep, "world": rank}
    groups = {kind: GroupCoordinate(index[kind], len(ranks),
                                    made.get(ranks) or Communicator(ranks, rank, device), kind)
              for kind, ranks in mine.items()}
    return ParallelState(grid, rank, device, coords, groups, node_ids)


def _install(state: ParallelState) -> None:
    global _state
    _state = state
    g = state.groups
    set_parallel_state(g["tp"], g["pp"], dp=g["dp"], sp=g["sp"], ep=g["ep"], world=g["world"],
                       expert_dispatch=state.expert_dispatch)


def destroy_distributed() -> None:
    """Leave the grid: release the shared segments, destroy the process groups and go
    back to the one-rank grid. Idempotent; safe after a failed init_distributed."""
    global _state
    state, _state = _state, None
    if state is not None:
        for group in state.groups.values():
            if group.comm is not None:
                group.comm.close()
    set_parallel_state(GroupCoordinate(name="tp"), GroupCoordinate(name="pp"))
    if dist.is_initialized():
        dist.destroy_process_group()

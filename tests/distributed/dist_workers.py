"""Bodies of the spawned ranks in tests/distributed: each rank joins the grid, runs one
check function of this module and reports what it found (or its traceback) on a queue.

Spawned children import this module by name, so everything here is module-level.
"""

from __future__ import annotations

import importlib
import traceback
from multiprocessing.queues import Queue
from typing import TYPE_CHECKING

from shardline.distributed import parallel_state as ps
from shardline.distributed.grid import RankGrid

if TYPE_CHECKING:
    import torch

TIMEOUT = 60.0


def run_rank(rank: int, grid: RankGrid, init_method: str, check: str, args: tuple,
             results: Queue, shm: bool = True, shm_buffer_bytes: int = 1 << 20,
             prepare: str | None = None) -> None:
    """Joins the grid as `rank` (after running `prepare(rank)` if given), runs
    `check(rank, *args)` and puts (rank, "ok", value) or (rank, "error", traceback) on
    `results`; always leaves the grid. `check` names a function of this module, or of
    another as "module:function"."""
    try:
        if prepare is not None:
            globals()[prepare](rank)
        ps.init_distributed(grid, rank, init_method, "cpu", timeout=TIMEOUT,
                            shm_collectives=shm, shm_buffer_bytes=shm_buffer_bytes)
        module, _, name = check.rpartition(":")
        function = getattr(importlib.import_module(module), name) if module else globals()[name]
        value = function(rank, *args)
        results.put((rank, "ok", value))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        ps.destroy_distributed()


def describe_grid(rank: int) -> dict:
    """What this rank sees of the grid: coordinates, every group's ranks, the shm paths."""
    state = ps.get_parallel_state()
    groups = {kind: {"rank": g.rank, "size": g.size, "ranks": list(g.ranks),
                     "shm": g.comm is not None and g.comm.shm is not None}
              for kind, g in state.groups.items()}
    c = state.coordinates
    return {"coords": [c.dp, c.pp, c.sp, c.tp, c.ep], "groups": groups,
            "tp_is_accessor": ps.get_tp_group() is state.groups["tp"]}


def shm_names() -> list[str]:
    """The shared segments this rank's groups use."""
    state = ps.get_parallel_state()
    return sorted({g.comm.shm.name for g in state.groups.values()
                   if g.comm is not None and g.comm.shm is not None})


def _inputs(seed: int, n: int, shape: tuple[int, ...], dtype=None, salt: int = 0) -> list:
    """Every rank's input for one check, the same on every rank (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1000 + salt)
    xs = [torch.randn(shape, generator=gen) for _ in range(n)]
    if dtype is not None and not dtype.is_floating_point:
        return [(x * 1000).to(dtype) for x in xs]
    return [x.to(dtype) if dtype is not None else x for x in xs]


def _fp32_bound(xs: list) -> torch.Tensor:
    """How far an fp32 sum of xs, in any order, may be from the exact sum: each of the
    n - 1 additions rounds by at most half an ulp of a partial sum, which is at most
    sum(|x|); (n - 1) * eps * sum(|x|) covers it."""
    import torch

    magnitude = torch.stack([x.double().abs() for x in xs]).sum(0)
    return (len(xs) - 1) * torch.finfo(torch.float32).eps * magnitude + 1e-30


def check_every_op(rank: int, seed: int) -> dict:
    """Runs every Communicator operation on the world group against its definition,
    computed locally from every rank's seeded input. Returns the op counters."""
    import torch

    comm = ps.get_world_group().comm
    n, me = comm.size, comm.rank_in_group
    comm.stats.reset()

    xs = _inputs(seed, n, (5, 7), salt=1)
    exact = torch.stack([x.double() for x in xs]).sum(0)
    got = comm.all_reduce(xs[me].clone())
    assert ((got.double() - exact).abs() <= _fp32_bound(xs)).all(), "all_reduce fp32"
    strided = xs[me].clone().t()
    assert comm.all_reduce(strided) is strided
    assert ((strided.t().double() - exact).abs() <= _fp32_bound(xs)).all(), "all_reduce strided"
    ints = _inputs(seed, n, (9,), torch.int64, salt=2)
    assert torch.equal(comm.all_reduce(ints[me].clone()), sum(ints)), "all_reduce int64"

    xs = _inputs(seed, n, (2, 3, 4), salt=3)
    for dim in (0, 1, -1):
        assert torch.equal(comm.all_gather(xs[me], dim), torch.cat(xs, dim)), f"all_gather {dim}"
    out = torch.empty(2, 3 * n, 4)
    assert comm.all_gather(xs[me], 1, out=out) is out and torch.equal(out, torch.cat(xs, 1))
    assert torch.equal(comm.all_gather(torch.tensor(float(me))), torch.arange(n, dtype=torch.float))
    bf = _inputs(seed, n, (3,), torch.bfloat16, salt=4)
    assert torch.equal(comm.all_gather(bf[me], 0), torch.cat(bf)), "all_gather bf16"

    xs = _inputs(seed, n, (2 * n, 3 * n), salt=5)
    exact = torch.stack([x.double() for x in xs]).sum(0)
    for dim in (0, 1):
        got = comm.reduce_scatter(xs[me], dim)
        want = exact.chunk(n, dim)[me]
        bound = _fp32_bound([x.chunk(n, dim)[me] for x in xs])
        assert got.shape == want.shape and ((got.double() - want).abs() <= bound).all(), \
            f"reduce_scatter dim {dim}"

    # Uneven all-to-all: rank r sends (r + 2 j) % 3 rows to rank j, some of them none.
    splits = [[(r + 2 * j) % 3 for j in range(n)] for r in range(n)]
    xs = [torch.randn(sum(splits[r]), 4, generator=torch.Generator().manual_seed(seed + r))
          for r in range(n)]
    parts = [x.split(s) for x, s in zip(xs, splits)]
    want = torch.cat([parts[src][me] for src in range(n)])
    assert torch.equal(comm.all_to_all(xs[me], splits[me]), want), "all_to_all exchanged splits"
    received = [splits[src][me] for src in range(n)]
    assert comm.exchange_splits(splits[me]) == received
    assert torch.equal(comm.all_to_all(xs[me], splits[me], received), want), "all_to_all given"
    even = _inputs(seed, n, (2 * n, 3), salt=6)
    want = torch.cat([x.chunk(n)[me] for x in even])
    assert torch.equal(comm.all_to_all(even[me]), want), "all_to_all even"

    xs = _inputs(seed, n, (4, 2), salt=7)
    mine = xs[me].clone()
    assert torch.equal(comm.broadcast(mine, src=n - 1), xs[n - 1]), "broadcast"
    assert comm.broadcast_metadata({"step": 3, "ids": [1, 2]} if me == 0 else None) == \
        {"step": 3, "ids": [1, 2]}

    # A ring of sends: even ranks send first, odd ranks receive first.
    xs = _inputs(seed, n, (3, 5), salt=8)
    nxt, prev = (me + 1) % n, (me - 1) % n
    if me % 2 == 0:
        comm.send(xs[me], nxt)
        got = comm.recv((3, 5), torch.float32, prev)
    else:
        got = comm.recv((3, 5), torch.float32, prev)
        comm.send(xs[me], nxt)
    assert torch.equal(got, xs[prev]), "send/recv"

    tensors = {"hidden": xs[0], "ids": torch.arange(4), "half": xs[1].to(torch.bfloat16),
               "empty": torch.empty(0, 3)}
    if me == 0:
        comm.send_tensor_dict(tensors, 1)
        comm.send_metadata({"seq": [7, 8]}, 1)
    elif me == 1:
        got = comm.recv_tensor_dict(0)
        assert list(got) == list(tensors)
        assert all(torch.equal(got[k], tensors[k]) and got[k].dtype == tensors[k].dtype
                   for k in tensors), "send_tensor_dict"
        assert comm.recv_metadata(0) == {"seq": [7, 8]}
    comm.barrier()
    return comm.stats.snapshot()


def _rank_order_sum(xs: list) -> torch.Tensor:
    """What the shared-memory all-reduce computes: the ranks' inputs added in rank order,
    in fp32 for 16-bit floats (rounded once at the end), wrapping for integers."""
    import torch

    acc_dtype = torch.float32 if xs[0].dtype in (torch.float16, torch.bfloat16) else xs[0].dtype
    total = xs[0].to(acc_dtype).clone()
    for x in xs[1:]:
        total += x.to(acc_dtype)
    return total.to(xs[0].dtype)


def check_shm_matches_gloo(rank: int, seed: int, sizes: tuple[int, ...]) -> None:
    """The shared-memory all-reduce and all-gather against gloo's on the same inputs."""
    import torch
    import torch.distributed as dist

    comm = ps.get_world_group().comm
    n, me = comm.size, comm.rank_in_group
    assert comm.shm is not None, "the world group has no shared segment"
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32,
              torch.int64)
    for salt, (dtype, numel) in enumerate((d, s) for d in dtypes for s in sizes):
        xs = _inputs(seed, n, (numel,), dtype, salt=100 + salt)
        shm = comm.shm.all_reduce(xs[me].clone())
        gloo = xs[me].clone()
        dist.all_reduce(gloo, group=comm.device_group)
        what = f"{dtype} x {numel} at {n} ranks"
        assert torch.equal(shm, _rank_order_sum(xs)), f"shm all_reduce is not the rank-order sum: {what}"
        if not dtype.is_floating_point or (n == 2 and dtype in (torch.float32, torch.float64)):
            # Integer sums are exact, and a + b == b + a: two ranks agree bit for bit.
            assert torch.equal(shm, gloo), f"shm and gloo differ: {what}"
        else:
            # gloo adds in another order (and 16-bit floats in 16 bits), so each result
            # may be off by (n - 1) roundings of at most eps * sum(|x|), plus one final
            # rounding: allow n * eps of the dtype, times sum(|x|).
            magnitude = torch.stack([x.double().abs() for x in xs]).sum(0)
            bound = n * torch.finfo(dtype).eps * magnitude
            assert ((shm.double() - gloo.double()).abs() <= bound).all(), f"shm vs gloo: {what}"
        assert torch.equal(comm.all_gather(xs[me], 0), torch.cat(xs)), f"shm all_gather: {what}"
    # Rows of 101 floats straddle the pieces of the staging buffer (when it is 512 KiB).
    xs = _inputs(seed, n, (1700, 101), salt=99)
    for dim in (0, 1, -1):
        assert torch.equal(comm.all_gather(xs[me], dim), torch.cat(xs, dim)), f"dim {dim}"
    assert comm.stats.shm_calls["all_gather"] == comm.stats.calls["all_gather"]


def check_groups_are_wired(rank: int) -> dict:
    """Sums each rank's global rank over each of its groups (each sum must be the sum of
    that group's ranks), passes a tensor down the pipeline, and reports what it saw."""
    import torch

    sums = {kind: int(g.all_reduce(torch.tensor([float(rank)])).item())
            for kind, g in ps.get_parallel_state().groups.items()}
    pp = ps.get_pp_group()
    received = None
    if not pp.is_first:
        received = pp.recv_from_prev([(2,)], torch.float32)[0].tolist()
    if not pp.is_last:
        pp.send_to_next([torch.tensor([float(rank), 1.0])])
    return {**describe_grid(rank), "sums": sums, "received": received, "names": shm_names(),
            "stats": sorted(ps.get_parallel_state().comm_stats())}


def attach_fails_on_rank_1(rank: int) -> None:
    """Makes this process's shared-memory attach fail as a full /dev/shm would."""
    from shardline.distributed import shm

    real = shm.ShmCollectives

    class NoRoom:
        create = staticmethod(real.create)

        @staticmethod
        def attach(name: str, rank_in_group: int):
            raise OSError(28, f"No space left on device (attaching {name})")

    if rank == 1:
        shm.ShmCollectives = NoRoom


def check_falls_back_to_gloo(rank: int) -> dict:
    """The sums still come out right, over gloo."""
    import torch

    tp = ps.get_tp_group()
    total = tp.all_reduce(torch.full((4,), float(rank + 1)))
    assert torch.equal(total, torch.full((4,), float(sum(range(1, tp.size + 1)))))
    return {"shm": describe_grid(rank)["groups"]["tp"]["shm"], "stats": tp.comm.stats.snapshot()}


def check_gather(rank: int, seed: int) -> None:
    """gather() delivers every rank's x, concatenated in rank order, to dst alone."""
    import torch

    comm = ps.get_world_group().comm
    n, me = comm.size, comm.rank_in_group
    xs = _inputs(seed, n, (3, 4), salt=9)
    for dst in range(n):
        for dim in (0, -1):
            got = comm.gather(xs[me], dst=dst, dim=dim)
            if me == dst:
                assert torch.equal(got, torch.cat(xs, dim)), f"gather to {dst} along {dim}"
            else:
                assert got is None, f"gather gave rank {me} a result meant for {dst}"

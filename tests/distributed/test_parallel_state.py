"""Joining and leaving the rank grid: every group of every kind holds the ranks the grid
says and sums over exactly them, the pipeline passes tensors stage to stage, leaving
restores the one-rank grid and leaves nothing in /dev/shm, and bad arguments raise
before any process group exists."""

import pytest
import torch
import torch.distributed as dist
from conftest import shm_leftovers

from shardline.distributed import parallel_state as ps
from shardline.distributed.grid import RankGrid


@pytest.mark.parametrize("grid,shared", [(RankGrid(pp=2, tp=2), ["pp", "tp+ep", "world"]),
                                          (RankGrid(dp=2, sp=2), ["dp", "sp", "world+ep"])],
                         ids=["tp2-pp2", "dp2-sp2"])
def test_every_group_holds_and_sums_over_the_grids_ranks(run_world, grid, shared):
    """`shared`: the groups the stats report, kinds of the same ranks sharing one group."""
    reports = run_world(grid, "check_groups_are_wired")
    for rank, seen in enumerate(reports):
        c = grid.coordinates(rank)
        assert seen["coords"] == [c.dp, c.pp, c.sp, c.tp, c.ep]
        assert seen["tp_is_accessor"]
        for kind in ("tp", "sp", "pp", "dp", "ep"):
            group = seen["groups"][kind]
            assert group["ranks"] == grid.group_of(kind, rank), kind
            assert group["ranks"][group["rank"]] == rank
            assert group["shm"] == (group["size"] > 1), kind
            assert seen["sums"][kind] == sum(grid.group_of(kind, rank)), kind
        assert seen["sums"]["world"] == sum(range(grid.world_size))
        prev = grid.group_of("pp", rank)[c.pp - 1] if c.pp > 0 else None
        assert seen["received"] == (None if prev is None else [prev, 1.0])
        assert shm_leftovers(seen["names"]) == []
        assert seen["stats"] == shared


def test_one_rank_grid_in_process(tmp_path):
    state = ps.init_distributed(RankGrid(), 0, f"file://{tmp_path}/store", "cpu")
    try:
        assert ps.get_parallel_state() is state and dist.get_world_size() == 1
        assert all(g.size == 1 and g.ranks == (0,) for g in state.groups.values())
        x = torch.randn(3)
        assert ps.get_tp_group().all_reduce(x) is x
        with pytest.raises(RuntimeError, match="already in a process group; call "
                                               "destroy_distributed"):
            ps.init_distributed(RankGrid(), 0, f"file://{tmp_path}/other", "cpu")
    finally:
        ps.destroy_distributed()
    assert ps.get_parallel_state() is None and not dist.is_initialized()
    assert ps.get_tp_group().size == 1 and ps.get_tp_group().comm is None
    ps.destroy_distributed()


@pytest.mark.parametrize("args,kwargs,error,message", [
    ((RankGrid(tp=2), 2, "tcp://127.0.0.1:1"), {}, ValueError,
     r"rank=2 is invalid: must be an integer in \[0, 2\)"),
    ((RankGrid(tp=2), 0, ""), {}, ValueError, r"init_method='' is invalid: must be a URL"),
    ((RankGrid(), 0, "tcp://127.0.0.1:1", "meta"), {}, ValueError,
     r"device=meta is invalid: must be cpu or cuda"),
    ((RankGrid(), 0, "tcp://127.0.0.1:1"), {"shm_buffer_bytes": 100}, ValueError,
     r"shm_buffer_bytes=100 is invalid: must be a multiple of 64 in \[64, 268435456\]"),
])
def test_bad_arguments_raise_before_any_process_group(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        ps.init_distributed(*args, **kwargs)
    assert not dist.is_initialized() and ps.get_parallel_state() is None


def test_parallel_config_is_a_layout():
    from shardline.config import ParallelConfig

    with pytest.raises(ValueError, match=r"rank=4 is invalid: must be an integer in \[0, 4\)"):
        ps.init_distributed(ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2),
                            4, "tcp://127.0.0.1:1")


def test_a_rank_that_cannot_attach_sends_every_rank_to_gloo(run_world):
    reports = run_world(RankGrid(tp=2), "check_falls_back_to_gloo",
                        prepare="attach_fails_on_rank_1")
    for seen in reports:
        assert seen["shm"] is False
        assert seen["stats"]["calls"] == {"all_reduce": 1} and seen["stats"]["shm_calls"] == {}

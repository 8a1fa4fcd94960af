"""The rank grid's arithmetic, for every layout of up to 8 ranks, checked against the
definition (rank = ((dp * PP + pp) * SP + sp) * TP + tp) rather than against itself."""

import itertools

import pytest

from shardline.distributed.grid import GROUP_KINDS, RankGrid

LAYOUTS = [(dp, pp, sp, tp)
           for dp, pp, sp, tp in itertools.product(range(1, 9), repeat=4)
           if dp * pp * sp * tp <= 8]


def expected_rank(grid: RankGrid, dp: int, pp: int, sp: int, tp: int) -> int:
    return ((dp * grid.pp + pp) * grid.sp + sp) * grid.tp + tp


def all_coordinates(grid: RankGrid):
    return itertools.product(range(grid.dp), range(grid.pp), range(grid.sp), range(grid.tp))


@pytest.mark.parametrize("dp,pp,sp,tp", LAYOUTS)
def test_coordinates_and_groups_follow_the_definition(dp, pp, sp, tp):
    grid = RankGrid(dp=dp, pp=pp, sp=sp, tp=tp)
    assert grid.world_size == dp * pp * sp * tp
    ranks_seen = set()
    for d, p, s, t in all_coordinates(grid):
        rank = expected_rank(grid, d, p, s, t)
        ranks_seen.add(rank)
        assert grid.rank_of(dp=d, pp=p, sp=s, tp=t) == rank
        c = grid.coordinates(rank)
        assert (c.dp, c.pp, c.sp, c.tp) == (d, p, s, t)
        # Each dimension's group: the ranks that differ from this one only there.
        assert grid.group_of("tp", rank) == [expected_rank(grid, d, p, s, i) for i in range(tp)]
        assert grid.group_of("sp", rank) == [expected_rank(grid, d, p, i, t) for i in range(sp)]
        assert grid.group_of("pp", rank) == [expected_rank(grid, d, i, s, t) for i in range(pp)]
        assert grid.group_of("dp", rank) == [expected_rank(grid, i, p, s, t) for i in range(dp)]
        # EP: every rank of this pipeline stage, whatever its DP, SP and TP coordinates.
        stage = sorted(expected_rank(grid, a, p, b, e)
                       for a in range(dp) for b in range(sp) for e in range(tp))
        assert grid.group_of("ep", rank) == stage
        assert stage[c.ep] == rank
        for kind in GROUP_KINDS:
            assert len(grid.group_of(kind, rank)) == grid.size(kind)
    assert ranks_seen == set(range(grid.world_size))


@pytest.mark.parametrize("dp,pp,sp,tp", LAYOUTS)
def test_groups_of_each_kind_partition_the_world(dp, pp, sp, tp):
    grid = RankGrid(dp=dp, pp=pp, sp=sp, tp=tp)
    for kind in GROUP_KINDS:
        groups = grid.groups(kind)
        members = sorted(rank for group in groups for rank in group)
        assert members == list(range(grid.world_size)), kind
        assert [g[0] for g in groups] == sorted(g[0] for g in groups)
        for group in groups:
            assert group == sorted(group)
            assert all(grid.group_of(kind, rank) == group for rank in group)
    # TP innermost: every TP group is a run of consecutive ranks.
    for group in grid.groups("tp"):
        assert group == list(range(group[0], group[0] + tp))


def test_from_sizes_reads_a_parallel_config():
    from shardline.config import ParallelConfig

    config = ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=3,
                            data_parallel_size=1, sequence_parallel_size=1)
    assert RankGrid.from_sizes(config) == RankGrid(dp=1, pp=3, sp=1, tp=2)


@pytest.mark.parametrize("kwargs,message", [
    ({"tp": 0}, "tp size=0 is invalid: must be an integer >= 1"),
    ({"pp": 2.0}, "pp size=2.0 is invalid"),
    ({"dp": True}, "dp size=True is invalid"),
])
def test_invalid_sizes_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankGrid(**kwargs)


def test_world_size_must_match_the_product():
    with pytest.raises(ValueError, match=r"world_size=6 does not match the grid: dp=1 x pp=2 x "
                                         r"sp=1 x tp=2 = 4 ranks"):
        RankGrid.for_world(6, tp=2, pp=2)
    assert RankGrid.for_world(4, tp=2, pp=2) == RankGrid(pp=2, tp=2)


def test_bad_ranks_coordinates_and_kinds_are_named():
    grid = RankGrid(tp=2, pp=2)
    with pytest.raises(ValueError, match=r"rank=4 is invalid: must be an integer in \[0, 4\)"):
        grid.coordinates(4)
    with pytest.raises(ValueError, match=r"pp coordinate=2 is invalid: must be in \[0, 2\)"):
        grid.rank_of(pp=2)
    with pytest.raises(ValueError, match=r"group kind='xp' is invalid"):
        grid.groups("xp")

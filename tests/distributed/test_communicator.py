"""Every Communicator operation across processes, against its definition computed from
every rank's seeded input: over gloo alone, and with the shared-memory collectives."""

import pytest
import torch

from shardline.distributed.communicator import Communicator
from shardline.distributed.grid import RankGrid
from shardline.distributed.parallel_state import GroupCoordinate


@pytest.mark.parametrize("world,shm", [(3, False), (2, True)], ids=["gloo-3", "shm-2"])
def test_every_op_matches_its_definition(run_world, fresh_seed, world, shm):
    stats = run_world(RankGrid(tp=world), "check_every_op", fresh_seed, shm=shm)
    fp32, n = 4, world
    for rank, s in enumerate(stats):
        sent = s["bytes_sent"]
        # Two fp32 all-reduces of 5x7 and one int64 of 9 elements.
        assert sent["all_reduce"] == 2 * 35 * fp32 + 9 * 8
        # 2x3x4 fp32 along three dims and once into out=, 3 bf16, one fp32 scalar.
        assert sent["all_gather"] == 4 * 24 * fp32 + 3 * 2 + fp32
        assert sent["reduce_scatter"] == 2 * (2 * n * 3 * n) * fp32
        uneven_rows = sum((rank + 2 * j) % 3 for j in range(n)) - (3 * rank) % 3
        assert sent["all_to_all"] == 2 * uneven_rows * 4 * fp32 + (2 * n - 2) * 3 * fp32
        # The ring's 3x5 fp32; rank 0 also sends 3x5 fp32, 4 int64, 3x5 bf16 and nothing.
        assert sent["send"] == 15 * fp32 + (15 * fp32 + 4 * 8 + 15 * 2 if rank == 0 else 0)
        assert sent.get("broadcast", 0) == (8 * fp32 if rank == n - 1 else 0)
        assert s["calls"]["all_reduce"] == 3
        served = s["shm_calls"]
        if shm:
            assert served == {"all_reduce": 3, "all_gather": 6, "reduce_scatter": 2}
        else:
            assert served == {}


@pytest.mark.parametrize("world,shm", [(3, False), (2, True)], ids=["gloo-3", "shm-2"])
def test_gather_reaches_the_destination_rank_only(run_world, fresh_seed, world, shm):
    run_world(RankGrid(tp=world), "check_gather", fresh_seed, shm=shm)


def test_one_rank_group_is_the_identity_and_needs_no_process_group():
    comm = Communicator([5], 5, "cpu")
    x = torch.randn(3, 4)
    assert comm.all_reduce(x) is x and comm.all_gather(x, 0) is x and comm.broadcast(x) is x
    assert comm.reduce_scatter(x) is x and comm.all_to_all(x, [3]) is x
    out = torch.empty(3, 4)
    assert comm.all_gather(x, 0, out=out) is out and torch.equal(out, x)
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of "
                                         r"shape \[3, 4\] on cpu, got torch.float32 \[4, 3\]"):
        comm.all_gather(x, 0, out=torch.empty(4, 3))
    assert comm.stats.snapshot()["bytes_sent"] == {}
    with pytest.raises(ValueError, match=r"dst=0 is this rank itself"):
        comm.send(x, 0)


def test_misuse_is_named():
    with pytest.raises(ValueError, match=r"rank=2 is not in the group's ranks \[0, 1\]"):
        Communicator([0, 1], 2, "cpu")
    with pytest.raises(ValueError, match="needs a device_group and a cpu_group"):
        Communicator([0, 1], 0, "cpu")
    with pytest.raises(ValueError, match=r"input_splits=\[1, 1\] is invalid: must be 1 "):
        Communicator([0], 0, "cpu").all_to_all(torch.zeros(3), [1, 1])
    with pytest.raises(RuntimeError, match=r"all_reduce on the tp group \(rank 1 of 2\) needs a "
                                           r"communicator: join the grid with init_distributed"):
        GroupCoordinate(1, 2, name="tp").all_reduce(torch.zeros(2))

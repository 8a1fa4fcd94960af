"""Node keys, and the warning for TP and SP groups that span nodes."""

import logging

from shardline.distributed.grid import RankGrid
from shardline.distributed.topology import node_key, on_one_node, warn_split_groups


def test_node_key_is_a_stable_int64():
    assert node_key() == node_key()
    assert 0 <= node_key() < 2**63


def test_groups_spanning_nodes(caplog):
    grid = RankGrid(pp=2, tp=2)
    per_stage = [0, 0, 1, 1]  # each TP group on its own node; PP crosses them
    assert on_one_node(per_stage, [0, 1]) and not on_one_node(per_stage, [0, 2])
    with caplog.at_level(logging.WARNING, logger="shardline.distributed.topology"):
        warn_split_groups(grid, per_stage)
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="shardline.distributed.topology"):
        warn_split_groups(grid, [0, 1, 0, 1])
    assert [r.getMessage() for r in caplog.records] == [
        f"the TP group of ranks {ranks} spans nodes [0, 1]: its per-layer collectives will "
        "cross the network; put whole TP groups on one node" for ranks in ([0, 1], [2, 3])]

"""elastic.py against streaming itself: the read positions it assumes are the ones streaming's partition gives,
and the restart plan re-partitions consumed positions without losing or repeating one (in-process, no data)."""
from __future__ import annotations

import numpy as np
import pytest

from modernbert_train.data import elastic


def _rank_reads(partition: np.ndarray, node: int, local: int) -> np.ndarray:
    """A rank's samples in the order its DataLoader yields them: batch b comes from worker b % workers."""
    per_worker = partition[node, local]  # (workers, batches, batch)
    order = per_worker.transpose(1, 0, 2).reshape(-1)
    return order[order != -1]


@pytest.mark.parametrize("nodes,ranks_per_node,canonical,workers,batch,drop", [
    (1, 8, 1, 1, 4, 0), (1, 4, 2, 2, 3, 40), (2, 2, 2, 1, 4, 12), (2, 4, 8, 2, 2, 64), (4, 2, 8, 1, 5, 96),
])
def test_read_positions_match_streamings_partition(nodes, ranks_per_node, canonical, workers, batch, drop):
    from streaming.base.partition.orig import get_partitions_orig

    samples = 997
    order = get_partitions_orig(samples, canonical, 1, 1, 1, 1, 0).reshape(-1)  # the one-process order
    partition = get_partitions_orig(samples, canonical, nodes, ranks_per_node, workers, batch, drop)
    world = nodes * ranks_per_node
    for rank in range(world):
        reads = _rank_reads(partition, *divmod(rank, ranks_per_node))
        state = {"origin": drop, "stride": world, "offset": elastic.rank_offset(rank, world, nodes)}
        positions = elastic.read_positions(state, 0, len(reads))
        inside = positions < len(order)  # streaming pads each rank's tail by repeating samples
        assert inside.sum() >= len(reads) - ranks_per_node
        np.testing.assert_array_equal(reads[inside], order[positions[inside]])


def _simulate(world, nodes, reads, rng, origin=0, skips=None):
    """Rank states after each rank read `reads[g]` positions (dropping its skips); returns (states, taken)."""
    states, taken = [], []
    for rank in range(world):
        state = {"origin": origin, "stride": world, "offset": elastic.rank_offset(rank, world, nodes),
                 "reads": int(reads[rank]), "skip": np.zeros(0, np.int64)}
        positions = elastic.read_positions(state, 0, int(reads[rank]))
        skip = set() if skips is None else set(skips[rank].tolist())
        taken += [q for q in positions.tolist() if q not in skip]
        state["skip"] = np.array(sorted(q for q in skip if q > (positions[-1] if len(positions) else -1)), np.int64)
        states.append(state)
    return states, taken


@pytest.mark.parametrize("old,old_nodes,new,new_nodes", [(8, 1, 4, 1), (4, 1, 8, 1), (4, 2, 3, 1), (16, 4, 8, 2)])
def test_restart_plan_takes_every_position_once(old, old_nodes, new, new_nodes):
    rng = np.random.default_rng(old * 100 + new)
    states, taken = _simulate(old, old_nodes, 40 + rng.integers(0, 9, old), rng)
    frontier, extras = elastic.consumed(states)
    assert sorted(taken) == list(range(frontier)) + extras.tolist()
    plans = [elastic.restart_plan(frontier, extras, rank=g, world_size=new, num_nodes=new_nodes, align=new * 4)
             for g in range(new)]
    start = plans[0][0]
    assert start % (new * 4) == 0 and start <= frontier
    states2, taken2 = _simulate(new, new_nodes, 30 + rng.integers(0, 9, new), rng, origin=start,
                                skips=[p[2] for p in plans])
    everything = taken + taken2
    assert len(everything) == len(set(everything)), "a position was read twice"
    frontier2, extras2 = elastic.consumed(states2)
    assert frontier2 > frontier
    assert sorted(everything) == list(range(frontier2)) + extras2.tolist()


def test_buffers_are_handed_over_whole():
    ranks = [{"buffer": np.array([[10 * g + i, 0, 0, i, i // 2] for i in range(3)]),
              "packer": {"next_seq": 3, "budgets_packed": 7}} for g in range(5)]
    owners = {new_rank: list(elastic.inherited_ranks(5, 2, new_rank)) for new_rank in range(2)}
    assert owners == {0: [0, 2, 4], 1: [1, 3]}
    merged, counters = elastic.merge_buffers([ranks[g] for g in owners[0]])
    assert sorted(merged[:, 0].tolist()) == [0, 1, 2, 20, 21, 22, 40, 41, 42]
    assert merged[:, 3].tolist() == list(range(9)) and counters == {"next_seq": 9, "budgets_packed": 7}
    assert merged[:, 4].tolist() == sorted(merged[:, 4].tolist())  # oldest pieces first, waits kept
    assert list(elastic.inherited_ranks(2, 4, 3)) == []  # a rank added by the resize starts empty


def test_node_count_must_divide_the_canonical_nodes():
    elastic.check_node_count(8, 4)
    with pytest.raises(Exception, match="num_canonical_nodes=2.*3 node"):
        elastic.check_node_count(2, 3)

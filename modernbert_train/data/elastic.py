"""Resume the training loader on another number of ranks: positions consumed, restart point, buffers.

Streaming lays each epoch out as one global sequence of *positions* fixed by the seed, the epoch and
`num_canonical_nodes` (its "orig" partition flattens the canonical nodes' ranges the same way for any physical
node count that divides them). Restarted at position `start` (streaming's `sample_in_epoch`), the rank on
node p, local rank r of W ranks on P nodes reads positions start + p + P*r + i*W, i = 0, 1, ... So what every
rank has read is known from four numbers (origin, stride, offset, reads) plus the positions it was told to
skip; the union over ranks is "everything below a frontier, and a few extras above it".

A new world restarts streaming at a point at or below that frontier (rounded down to whole raw batches of
the new world), and each rank skips the positions in its own stripe that were already read. Each new rank
also takes over the packer buffers (documents read but not yet packed) of the old ranks congruent to it
modulo the new world size. Per rank this costs its own stripe of the extras and ceil(old/new) buffers:
it does not grow with the world size.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from modernbert_train.common.errors import UserError


def rank_offset(rank: int, world_size: int, num_nodes: int) -> int:
    """Where `rank`'s stripe starts in each block of `world_size` positions (streaming's rank order)."""
    ranks_per_node = world_size // num_nodes
    node, local_rank = divmod(rank, ranks_per_node)
    return node + num_nodes * local_rank


def read_positions(rank_state: dict[str, Any], first: int, stop: int) -> np.ndarray:
    """Positions of reads number `first` .. `stop - 1` of a rank since its origin."""
    reads = np.arange(first, stop, dtype=np.int64)
    return int(rank_state["origin"]) + reads * int(rank_state["stride"]) + int(rank_state["offset"])


def consumed(ranks: Sequence[dict[str, Any]]) -> tuple[int, np.ndarray]:
    """(frontier, extras): every position below the frontier was read by some rank, and so were the extras
    (sorted, unique, all at or above it); nothing else was."""
    origins = {int(r["origin"]) for r in ranks}
    strides = {int(r["stride"]) for r in ranks}
    if len(origins) != 1 or len(strides) != 1:
        raise UserError(f"data loader state: ranks restarted at different positions {sorted(origins)} / strides "
                        f"{sorted(strides)}; the checkpoint is inconsistent")
    stride = strides.pop()
    offsets = sorted(int(r["offset"]) for r in ranks)
    if offsets != list(range(stride)):
        raise UserError(f"data loader state: rank stripes {offsets} do not cover 0..{stride - 1}")
    common = min(int(r["reads"]) for r in ranks)
    frontier = origins.pop() + common * stride
    parts = [read_positions(r, common, int(r["reads"])) for r in ranks]
    parts += [np.asarray(r["skip"], dtype=np.int64) for r in ranks]
    extras = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    return frontier, extras[extras >= frontier]


def restart_plan(frontier: int, extras: np.ndarray, *, rank: int, world_size: int, num_nodes: int,
                 align: int) -> tuple[int, int, np.ndarray]:
    """(start, offset, skip) for one rank of the new world: streaming restarts at `start` (a multiple of
    `align`, itself a multiple of the node count), this rank reads start + offset + i * world_size and drops
    the reads at the `skip` positions (already read before the checkpoint)."""
    start = frontier // align * align
    offset = rank_offset(rank, world_size, num_nodes)
    # Positions in [start, frontier) were all read: this rank re-reads its stripe of them and drops them.
    between = np.arange(start + offset, frontier, world_size, dtype=np.int64)
    extras = np.asarray(extras, dtype=np.int64)
    mine = extras[(extras - start) % world_size == offset]
    return start, offset, np.union1d(between, mine)


def inherited_ranks(old_world: int, new_world: int, new_rank: int) -> range:
    """Old ranks whose packer buffers and counters a new rank takes over."""
    return range(new_rank, old_world, new_world)


def merge_buffers(ranks: Sequence[dict[str, Any]]) -> tuple[np.ndarray, dict[str, int]]:
    """One packer buffer out of several ranks' (reference rows: sample_id, piece_index, epoch, seq, arrival).

    Pieces keep their arrival (so waiting times carry over) and get new arrival numbers in the order
    (arrival, old rank, old number); the counters are those of the first rank (all ranks pack the same
    number of budgets per step)."""
    if not ranks:
        return np.zeros((0, 5), np.int64), {"next_seq": 0, "budgets_packed": 0}
    rows = [np.asarray(r["buffer"], dtype=np.int64).reshape(-1, 5) for r in ranks]
    if len(rows) == 1:
        return rows[0], dict(ranks[0]["packer"])
    tagged = np.concatenate([np.column_stack([b, np.full(len(b), i, np.int64)]) for i, b in enumerate(rows)])
    order = np.lexsort((tagged[:, 3], tagged[:, 5], tagged[:, 4]))
    merged = tagged[order, :5].copy()
    merged[:, 3] = np.arange(len(merged), dtype=np.int64)
    budgets = max(int(r["packer"]["budgets_packed"]) for r in ranks)
    return merged, {"next_seq": len(merged), "budgets_packed": budgets}


def check_node_count(num_canonical_nodes: int, num_nodes: int) -> None:
    """The global order stays the saved one only if the new node count divides the canonical node count."""
    if num_canonical_nodes % num_nodes:
        raise UserError(f"the checkpoint's data order uses num_canonical_nodes={num_canonical_nodes}, which this "
                        f"run's {num_nodes} node(s) do not divide; resume on a node count dividing it, and start "
                        f"runs with data.loader_options.num_canonical_nodes set to a multiple of every node count "
                        f"you may use (the large recipes set 128)")

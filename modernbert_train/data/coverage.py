"""Epochs smaller than a source that still read every sample once per pass ("coverage" sampling).

streaming draws an epoch of a weighted source afresh each epoch: a source of N samples that gives C < N per
epoch (the manifest's `epoch_size`, or a proportion below its natural share) is a new random choice of C every
epoch, so over N / C epochs some samples come twice and about a third never (1/e). At 2T tokens that is the
choice between one epoch of ~2e9 samples (streaming's epoch arrays: ~100 GB and half an hour on every node's
leader, bench/RESULTS.md 2026-12-02) and an `epoch_size` that leaves data unread.

Here a source's epochs are consecutive windows of one endless sequence: pass p lays the source's shards out in
an order drawn from (seed, p), each shard's samples in order; epoch e takes the samples at positions
[e * C, (e + 1) * C) of pass 0, pass 1, ... laid end to end. Every sample is read once in each pass of N / C
epochs, none twice before all were read once, and an epoch costs O(shards + C), never O(N). streaming's
shuffle then mixes the epoch as usual (its units are the shard spans returned here).

Whole repeats (C a multiple of N: every sample equally often in every epoch) keep streaming's own sampling.
"""
from __future__ import annotations

import numpy as np


def coverage_epoch(samples_per_shard: np.ndarray, sample_offset_per_shard: np.ndarray, choose: int,
                   seed: tuple[int, ...], epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """One source's epoch `epoch` of `choose` samples: (units, sample_ids).

    samples_per_shard / sample_offset_per_shard: the source's shards (sizes, first global sample id);
    seed: the key of the source's shard orders (pass p's order is drawn from (*seed, p)).
    units: samples taken from each shard span, in order (streaming's shuffle units);
    sample_ids: the global sample ids, span after span (sum(units) == choose).
    """
    sizes_all = np.asarray(samples_per_shard, dtype=np.int64)
    offsets_all = np.asarray(sample_offset_per_shard, dtype=np.int64)
    total = int(sizes_all.sum())
    if total <= 0 or choose <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    start, stop = epoch * choose, (epoch + 1) * choose
    units, firsts = [], []
    for pass_index in range(start // total, (stop - 1) // total + 1):
        lo, hi = max(start - pass_index * total, 0), min(stop - pass_index * total, total)
        order = np.random.default_rng([*seed, pass_index]).permutation(len(sizes_all))
        sizes = sizes_all[order]
        ends = np.cumsum(sizes)
        begins = ends - sizes
        inside = (ends > lo) & (begins < hi) & (sizes > 0)
        take_lo = np.clip(lo - begins[inside], 0, None)
        take_hi = np.minimum(hi - begins[inside], sizes[inside])
        units.append(take_hi - take_lo)
        firsts.append(offsets_all[order[inside]] + take_lo)
    units_arr = np.concatenate(units)
    firsts_arr = np.concatenate(firsts)
    span_starts = np.cumsum(units_arr) - units_arr
    sample_ids = np.repeat(firsts_arr - span_starts, units_arr) + np.arange(int(units_arr.sum()), dtype=np.int64)
    return units_arr, sample_ids


def coverage_resample(dataset, epoch: int, streaming_resample) -> tuple[np.ndarray, np.ndarray]:
    """streaming's `StreamingDataset.resample_streams(epoch)` with coverage sampling (same return shape).

    `streaming_resample(epoch, stream_id)` is streaming's own, used for sources drawn in whole repeats."""
    units, sample_ids = [], []
    for sid in range(dataset.num_streams):
        first = int(dataset.shard_offset_per_stream[sid])
        shard_ids = first + np.arange(int(dataset.shards_per_stream[sid]))
        sizes = dataset.samples_per_shard[shard_ids]
        choose, total = int(dataset.streams[sid].choose), int(sizes.sum())
        if total and choose % total == 0:
            u, ids = streaming_resample(epoch, sid)
        else:  # each source its own orders, all from the run's seed
            u, ids = coverage_epoch(sizes, dataset.sample_offset_per_shard[shard_ids], choose,
                                    (int(dataset.shuffle_seed), sid), epoch)
        units.append(u)
        sample_ids.append(ids)
    return np.concatenate(units).astype(np.int64), np.concatenate(sample_ids).astype(np.int64)

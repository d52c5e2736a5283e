"""Coverage sampling (data/coverage.py): epochs smaller than a source read every sample once per pass."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from modernbert_train.data import build_mlm_loader
from modernbert_train.data.config import MLMLoaderConfig
from modernbert_train.data.coverage import coverage_epoch
from tests.data.conftest import write_manifest


def _shards(rng, count=37):
    sizes = rng.integers(0, 50, size=count)  # empty shards too
    offsets = 1000 + np.cumsum(sizes) - sizes
    return sizes, offsets


@pytest.mark.parametrize("choose_fraction", [0.23, 0.5, 1.7, 2.5])
def test_every_sample_once_per_pass_in_epoch_order(choose_fraction):
    rng = np.random.default_rng(7)
    sizes, offsets = _shards(rng)
    total = int(sizes.sum())
    choose = max(1, round(choose_fraction * total))
    epochs = [coverage_epoch(sizes, offsets, choose, (3, 0), e) for e in range(12)]
    for units, ids in epochs:
        assert units.sum() == ids.size == choose and (units > 0).all()
    stream = np.concatenate([ids for _, ids in epochs])
    everything = np.arange(1000, 1000 + total)
    for p in range(stream.size // total):
        window = np.sort(stream[p * total:(p + 1) * total])
        np.testing.assert_array_equal(window, everything)  # pass p: each sample exactly once
    # Each unit is a run of consecutive ids inside one shard.
    units, ids = epochs[1]
    for start, length in zip(np.cumsum(units) - units, units):
        run = ids[start:start + length]
        assert (np.diff(run) == 1).all()
        shard = np.searchsorted(offsets + sizes, run[0], side="right")
        assert offsets[shard] <= run[0] and run[-1] < offsets[shard] + sizes[shard]
    # Passes are laid out in different orders, and the same key gives the same epoch.
    first_pass, second_pass = stream[:total], stream[total:2 * total]
    assert not np.array_equal(first_pass, second_pass)
    np.testing.assert_array_equal(coverage_epoch(sizes, offsets, choose, (3, 0), 5)[1], epochs[5][1])
    assert not np.array_equal(coverage_epoch(sizes, offsets, choose, (4, 0), 5)[1], epochs[5][1])


def _reads_per_sample(corpus, sampling: str, epochs: int) -> dict[int, list[int]]:
    """Reads of each sample of each source (by stream) over the first `epochs` epochs."""
    total = sum(meta["chunks"] for meta in corpus["meta"].values())
    manifest = write_manifest(corpus["tmp"] / f"{sampling}.yaml", corpus["shards"],
                              {"code": {"proportion": 0.5}, "prose": {"proportion": 0.2},
                               "docstrings": {"proportion": 0.3}}, epoch_size=max(8, total // 5))
    config = MLMLoaderConfig(manifest=str(manifest), tokenizer=corpus["tokenizer"], max_seq_len=256,
                             micro_batch_size=8, global_batch_size=16, return_provenance=True, sampling=sampling,
                             mixture_log_every=0)
    loader = build_mlm_loader(config)
    reads: dict[int, Counter] = {}
    for step in loader:
        for mb in step["micro_batches"]:
            for sid, piece, epoch, source in zip(mb["sample_ids"], mb["piece_indices"], mb["epochs"],
                                                 mb["source_ids"]):
                if piece == 0 and epoch < epochs:
                    reads.setdefault(int(source), Counter())[int(sid)] += 1
        if loader.epoch >= epochs + 2:
            break
    dataset = loader.dataset
    per_source = {}
    for stream in range(dataset.num_streams):
        first = int(dataset.sample_offset_per_stream[stream])
        counts = reads.get(stream, Counter())
        per_source[stream] = [counts.get(i, 0) for i in range(first, first + int(dataset.samples_per_stream[stream]))]
    loader.close()
    return per_source


def test_training_epochs_cover_each_source_before_repeating(corpus_copy):
    """epoch_size a fifth of the corpus: over 6 epochs every source's samples are read k or k+1 times (one
    pass after another); streaming's own sampling repeats some and never reads others."""
    for source, per_sample in _reads_per_sample(corpus_copy, "coverage", epochs=6).items():
        assert max(per_sample) >= 1 and max(per_sample) - min(per_sample) <= 1, (source, Counter(per_sample))
    spreads = [max(c) - min(c) for c in _reads_per_sample(corpus_copy, "balanced", epochs=6).values()]
    assert max(spreads) >= 2, spreads  # what coverage sampling fixes


def test_bounds_spanner_answers_as_streamings_spanner():
    from streaming.base.spanner import Spanner

    from modernbert_train.data.dataset import BoundsSpanner

    rng = np.random.default_rng(3)
    for sizes in (rng.integers(0, 40, size=200), np.array([0, 0, 5, 0, 1024, 3, 0]), np.array([2048])):
        sizes = sizes.astype(np.int64)
        theirs, ours = Spanner(sizes.copy()), BoundsSpanner(sizes.copy())
        for index in range(int(sizes.sum())):
            assert ours[index] == tuple(int(v) for v in theirs[index]), index
        for bad in (-1, int(sizes.sum())):
            with pytest.raises(IndexError):
                ours[bad]

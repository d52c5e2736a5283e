"""Guards on one rank's start-up cost (bench/startup_bench.py, scaled down; not timed): what a rank keeps and
does for a resume must not grow with the world size, and streaming's epoch work must stay within a bound
computed from the index (bytes per sample of the epoch), and split by rank."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "startup_bench.py"
sys.path.insert(0, str(BENCH.parent))

import startup_bench  # noqa: E402


def test_resume_work_per_rank_does_not_grow_with_the_world():
    costs = {world: startup_bench.resume_plan_cost(world, world // 2, 64, np.random.default_rng(world))
             for world in (8, 64, 512)}
    for world, cost in costs.items():
        # Its stripe of the positions between the common restart point and the furthest reads: under one raw
        # batch plus the ranks' spread (64 here), and two old buffers (halving the world).
        assert cost["skip"] <= 64 + 64, (world, cost)
        assert cost["buffer_refs"] == 2 * startup_bench.BUFFER_PIECES, (world, cost)
    sizes = [cost["per_rank_state_bytes"] for cost in costs.values()]
    assert max(sizes) <= min(sizes) * 1.01, sizes


@pytest.mark.slow
def test_epoch_work_stays_within_a_bound_from_the_index(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(BENCH), "--workdir", str(tmp_path), "--shards", "2000",
                           "--sample-scale", "2e-5", "--world-sizes", "8,64", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    samples = result["samples"]
    for row in result["rows"]:
        assert row["epoch_samples"] >= samples
        # This rank's slice is its share of the epoch (the partition is split, not replicated).
        assert row["rank_samples"] <= samples / row["world"] * 1.05 + row["world"]
        # Streaming's resample + partition + shuffle: a few int64 arrays of the epoch, plus a fixed slack.
        assert row["partition_peak_bytes"] <= 120 * samples + (64 << 20), row


@pytest.mark.slow
def test_epoch_work_follows_the_epoch_size_not_the_mixture(tmp_path):
    """With the manifest's epoch_size (coverage sampling reads every sample once per pass), a rank's epoch work
    is bounded by the epoch, not by the mixture: here a 16th of it, far below what one whole epoch takes."""
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(BENCH), "--workdir", str(tmp_path), "--shards", "2000",
                           "--sample-scale", "2e-3", "--epoch-size", "250000", "--world-sizes", "8,64",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["samples"] >= 16 * 250_000
    for row in result["rows"]:
        # The partition pads to whole raw batches of every rank (-1 entries).
        assert 250_000 - 4 <= row["epoch_samples"] <= 250_000 + 2 * 64 * row["world"], row  # 2 workers a rank
        assert row["rank_samples"] <= 250_000 / row["world"] * 1.05 + row["world"]
        assert row["partition_peak_bytes"] <= 120 * 250_000 + (64 << 20) < 48 * result["samples"], row


def test_building_the_dataset_holds_nothing_per_sample(tmp_path, monkeypatch):
    """4M and 40M samples in 2,000 shards: the dataset's set-up (index, sample -> shard map) allocates the same,
    O(shards), not 8 bytes a sample as streaming's Spanner did (~16 GB per rank at the 2T mixture's 2e9)."""
    import tempfile
    import tracemalloc

    from modernbert_train.data.dataset import build_streaming_dataset
    from modernbert_train.data.manifest import load_manifest, sampling_manifest

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("MODERNBERT_SHARD_CACHE", str(tmp_path / "cache"))
    peaks, datasets = {}, []
    for scale in (0.002, 0.002, 0.02):  # the first build imports what set-up needs: not counted
        manifest, _, samples = startup_bench.synthesize(tmp_path / f"s{scale}-{len(datasets)}", 2000, scale, 1_000_000)
        streaming_manifest, _ = sampling_manifest(load_manifest(manifest), 1024)
        tracemalloc.start()
        try:
            datasets.append(build_streaming_dataset(streaming_manifest, batch_size=64, shuffle=True, seed=17,
                                                    num_canonical_nodes=1, cache_limit="100tb"))
            peaks[samples] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        dataset = datasets[-1]
        assert dataset.num_samples == samples and dataset.spanner[samples - 1][0] == dataset.num_shards - 1
    (small, small_peak), (large, large_peak) = sorted(peaks.items())
    assert large >= 40_000_000 and large >= 9 * small
    # streaming's Spanner: 8 bytes for each of the 36M more samples (~290 MB) on top.
    assert large_peak - small_peak < 16 << 20, (small_peak / 2**20, large_peak / 2**20)

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

"""A rollback that fails on rank 0 (nothing safe to go back to, too many rollbacks) stops every rank at once.

Rank 0 alone prepares the run folder; the others used to wait for it in a barrier, which a failure on rank 0
never reached: they hung until the collective timeout (30 minutes on gloo). Two gloo processes here."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import sys, time
import torch.distributed as dist
from modernbert_train.common.errors import UserError
from modernbert_train.train.recipe_schema import SpikeGuardConfig
from modernbert_train.train.spike_guard import SpikeRollback, roll_back

rank, store, run_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
# Judging began at step 9, the streak at 41, and the run folder holds no checkpoint before it.
spikes = SpikeRollback([41, 42, 43], ["step 41 loss rule: loss 9 > limit 7"], 9, {s: s for s in range(44)})
start = time.monotonic()
try:
    roll_back(run_dir, spikes, SpikeGuardConfig(enabled=True))
    print("no error")
except UserError as err:
    print(f"UserError after {time.monotonic() - start:.1f}s: {err}")
dist.destroy_process_group()
"""


def test_a_failed_rollback_on_rank_0_stops_every_rank_promptly(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    start = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, "-c", WORKER, str(rank), str(tmp_path / "store"), str(run_dir)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = []
    try:
        for rank in ranks:
            out, err = rank.communicate(timeout=240)
            assert rank.returncode == 0, err[-3000:]
            outputs.append(out.strip().splitlines()[-1])
    finally:
        for rank in ranks:
            rank.kill()
    print(f"both ranks done in {time.monotonic() - start:.1f}s: {outputs}")
    assert outputs[0].startswith("UserError") and "no checkpoint of" in outputs[0]
    assert outputs[1].startswith("UserError") and "the rollback failed on rank 0" in outputs[1]
    assert "no checkpoint of" in outputs[1]  # rank 0's reason, not a timeout
    # Each rank's error came within seconds of the call (the 240 s above only bounds a slow start-up).
    assert all(float(line.split(" after ")[1].split("s:")[0]) < 20 for line in outputs)

"""How a rank ends when it must: disk full while saving is one line (and the relaunch resumes); SIGTERM ends a
rank within the grace even while it sits in a collective with a stalled peer (as SLURM's requeue sends it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.scale.harness import losses
from tests.train.test_rank_failures import _two_ranks

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
RECIPE = str(REPO / "yamls/tiny/phase1.yaml")
COMMON = ["max_duration=6ba", "checkpoint.interval=2ba", "checkpoint.keep_last=-1",
          "data.loader_options={prefetch_steps: 0}"]

# Runs the trainer's CLI with torch.save failing as a full disk does, from its second checkpoint on.
FULL_DISK = """
import errno, sys, torch
save, calls = torch.save, []
def full_disk_save(obj, f, *args, **kwargs):
    calls.append(f)
    if len(calls) >= 2:
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return save(obj, f, *args, **kwargs)
torch.save = full_disk_save
from modernbert_train.cli.main import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def test_disk_full_while_saving_is_one_line_and_the_relaunch_resumes(data_overrides, tmp_path):
    run_dir = tmp_path / "run"
    args = [RECIPE, *data_overrides(), *COMMON, f"save_folder={run_dir}"]
    full = subprocess.run([sys.executable, "-c", FULL_DISK, *args], cwd=REPO, capture_output=True, text=True,
                          env=_env(tmp_path), timeout=600)
    assert full.returncode == 2, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: no space left on the device of save_folder") and str(run_dir) in last, last
    assert "Traceback" not in full.stderr
    # As a real full disk leaves it: the step-4 file begun (empty), `latest` still on the step-2 checkpoint.
    assert os.readlink(run_dir / "latest-rank0.pt") == "ep0-ba2-rank0.pt"

    relaunch = subprocess.run([sys.executable, "-m", "modernbert_train.cli.main", "train", *args], cwd=REPO,
                              capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    reference_dir = tmp_path / "reference"
    reference = subprocess.run([sys.executable, "-m", "modernbert_train.cli.main", "train", RECIPE,
                                *data_overrides(), *COMMON, f"save_folder={reference_dir}"], cwd=REPO,
                               capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert losses(run_dir) == losses(reference_dir) and sorted(losses(run_dir)) == list(range(1, 7))


def _wait_for_step(procs, run_dir: Path, tmp_path: Path, step: int) -> None:
    """Until the two ranks' run has logged `step` (failing if a rank exits first)."""
    deadline = time.monotonic() + 300
    while max(losses(run_dir), default=0) < step:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [(tmp_path / f"rank{r}.err").read_text()[-2000:] for r in range(2)]
        time.sleep(0.2)


def test_sigterm_ends_a_rank_blocked_in_a_collective_within_the_grace(data_overrides, tmp_path):
    """Rank 1 stalled (SIGSTOP), rank 0 waits for it in the step's collective (timeout 120 s here); SIGTERM to
    rank 0 must end it within the grace (3 s here), with exit code 143 and its line, not at the timeout."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "modernbert_train.train", RECIPE, *data_overrides(), "max_duration=400ba",
               "checkpoint.interval=2ba", f"save_folder={run_dir}"]
    procs = _two_ranks(command, tmp_path, lambda rank: {"MODERNBERT_DIST_TIMEOUT": "120",
                                                        "MODERNBERT_SIGTERM_GRACE": "3"})
    try:
        _wait_for_step(procs, run_dir, tmp_path, 3)
        procs[1].send_signal(signal.SIGSTOP)
        time.sleep(2.0)  # rank 0 reaches the next collective and waits in it
        sent = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        code = procs[0].wait(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait()
    assert code == 128 + signal.SIGTERM, code
    assert seconds < 3 + 10, seconds
    text = (tmp_path / "rank0.err").read_text()
    assert "rank 0: SIGTERM received" in text, text[-2000:]


def test_a_rank_killed_mid_run_is_named_by_the_rank_left(data_overrides, tmp_path):
    """Two ranks with no launcher between them (as on two nodes): rank 1 SIGKILLed after step 3; rank 0 ends with
    one line naming rank 1 (the relaunch after such a kill: tests/scale/test_faults.py)."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "modernbert_train.train", RECIPE, *data_overrides(), "max_duration=400ba",
               "checkpoint.interval=2ba", f"save_folder={run_dir}"]
    procs = _two_ranks(command, tmp_path, lambda rank: {"MODERNBERT_DIST_TIMEOUT": "60"})
    try:
        _wait_for_step(procs, run_dir, tmp_path, 3)
        procs[1].kill()
        killed = time.monotonic()
        code = procs[0].wait(timeout=120)
        seconds = time.monotonic() - killed
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert code == 2 and seconds < 60, (code, seconds)
    last = (tmp_path / "rank0.err").read_text().strip().splitlines()[-1]
    assert last.startswith("error: rank 0 of 2: a collective with the other ranks failed"), last
    assert f"rank 1 (pid {procs[1].pid} on this host) has exited" in last, last

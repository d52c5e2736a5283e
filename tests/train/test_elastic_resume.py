"""Trainer-level elastic resume in the default data mode: a 2-process FSDP2 run's sharded checkpoint continues on
1 process. The model and optimizer are resharded, the schedule (lr, global rows per step) continues exactly, and
the loader hands its data position over (the sample-level count is tests/data/test_elastic_resume.py)."""
from __future__ import annotations

import shutil

import pytest

from .test_fsdp import FSDP_SHARDED, _copy_data, _launch, _metrics, _wait

pytestmark = pytest.mark.slow
STEPS, CHECKPOINT_AT = 6, 3
COMMON = [f"max_duration={STEPS}ba", f"checkpoint.interval={CHECKPOINT_AT}ba", "scheduler.warmup=2ba",
          "batch_warmup.tokens=1500", "logging.progress_bar=false", "run_name=elastic-check", FSDP_SHARDED]


def test_two_processes_resume_on_one(tiny_data, tmp_path):
    data = _copy_data(tiny_data, tmp_path / "data2")
    two, one = tmp_path / "two", tmp_path / "one"
    _wait(_launch(2, [*COMMON, *data, f"save_folder={two}"], tmp_path, "two"), tmp_path, "two")
    reference = {r["step"]: r for r in _metrics(two) if "event" not in r}
    assert sorted(reference) == list(range(1, STEPS + 1))
    # The run as it stood at its step-3 checkpoint, continued by ONE process.
    shutil.copytree(two, one, symlinks=True)
    for path in one.iterdir():
        if path.name.startswith(f"ep0-ba{STEPS}") or path.name.startswith("latest"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    data1 = _copy_data(tiny_data, tmp_path / "data1")
    _wait(_launch(1, [*COMMON, *data1, f"save_folder={one}"], tmp_path, "one"), tmp_path, "one")
    resumed = {r["step"]: r for r in _metrics(one) if "event" not in r}
    assert sorted(resumed) == list(range(1, STEPS + 1)), "steps 1-3 kept, 4-6 trained once each"
    for step in range(1, CHECKPOINT_AT + 1):
        assert resumed[step] == reference[step]
    for step in range(CHECKPOINT_AT + 1, STEPS + 1):
        # The schedule continues exactly: same lr and global rows per step as the uninterrupted run.
        assert resumed[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-6)
        assert resumed[step]["batch_size"] == reference[step]["batch_size"]
        # The tokens continue from the checkpoint's count (other documents per row: close, not equal).
        assert resumed[step]["tokens"] == pytest.approx(reference[step]["tokens"], rel=0.1)
    # Trained weights and moments came back (a fresh model would start near the first step's loss).
    first, at_break = reference[1]["train/loss"], reference[CHECKPOINT_AT]["train/loss"]
    after = resumed[CHECKPOINT_AT + 1]["train/loss"]
    assert abs(after - reference[CHECKPOINT_AT + 1]["train/loss"]) < (first - at_break) / 2, (first, at_break, after)

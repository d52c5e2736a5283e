"""Exact resume: a run killed with SIGKILL mid-way and relaunched with the same command ends with the same
per-step losses (bit for bit), token counts and steps as an uninterrupted run. Real CLI, subprocesses."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
STEPS, CHECKPOINT_EVERY, KILL_AFTER = 12, 4, 9


def launch(args: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "modernbert_train.train", str(REPO / "yamls/tiny/phase1.yaml"), *args]
    return subprocess.Popen(command, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=dict(os.environ))


def steps_written(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def copy_data(tiny_data, dest: Path) -> Path:
    """Same shards in other folders: two concurrent streaming datasets may not share a local directory."""
    for source in ("code", "prose"):
        shutil.copytree(tiny_data["root"] / "shards" / source, dest / source)
    manifest = dest / "mix.yaml"
    manifest.write_text("name: mix\nsources:\n" + "".join(
        f"  - name: {s}\n    local: {dest / s}\n    proportion: 0.5\n" for s in ("code", "prose")))
    return manifest


def test_sigkill_and_relaunch_continues_bit_identically(tiny_data, tmp_path):
    common = [f"data.tokenizer={tiny_data['tokenizer']}", "logging.progress_bar=false", f"max_duration={STEPS}ba",
              f"checkpoint.interval={CHECKPOINT_EVERY}ba", "scheduler.warmup=4ba", "batch_warmup.tokens=3000",
              "run_name=resume-check"]
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = launch(common + [f"data.manifest={tiny_data['mix']}", f"save_folder={reference_dir}"],
                       tmp_path / "reference.log")
    killed_args = common + [f"data.manifest={copy_data(tiny_data, tmp_path / 'copy')}", f"save_folder={killed_dir}"]
    victim = launch(killed_args, tmp_path / "killed-1.log")
    deadline = time.monotonic() + 240
    while KILL_AFTER not in steps_written(killed_dir):
        assert victim.poll() is None, (tmp_path / "killed-1.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the step to kill it at"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert max(steps_written(killed_dir)) < STEPS
    # The newest checkpoint is older than the last logged step: the relaunch must redo steps 9.. exactly.
    assert (killed_dir / "latest-rank0.pt").resolve().name == "ep0-ba8-rank0.pt"

    relaunch = launch(killed_args, tmp_path / "killed-2.log")
    assert relaunch.wait(timeout=300) == 0, (tmp_path / "killed-2.log").read_text()[-3000:]
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    ref = [json.loads(line) for line in (reference_dir / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # nothing repeated, nothing skipped
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
    assert [r["batch_size"] for r in got] == [r["batch_size"] for r in ref]
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]
    assert [r["train/loss"] for r in got] == [r["train/loss"] for r in ref]  # bit-identical floats
    assert [r["train/masked_accuracy"] for r in got] == [r["train/masked_accuracy"] for r in ref]
    # time_s continues across the restart instead of starting again at zero.
    assert all(b["time_s"] > a["time_s"] for a, b in zip(got, got[1:]))
    assert "done: 12 steps" in (tmp_path / "killed-2.log").read_text()
    # keep_last=2 of the tiny recipe: only the two newest checkpoints stay.
    assert sorted(p.name for p in killed_dir.glob("ep*-ba*-rank0.pt")) == ["ep0-ba12-rank0.pt", "ep0-ba8-rank0.pt"]

"""Exact resume: a run killed with SIGKILL mid-way and relaunched with the same command ends with the same
per-step losses (bit for bit), token counts and steps as an uninterrupted run. Real CLI, subprocesses.

Both tests compare with one uninterrupted reference run, started once and trained alongside them."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modernbert_train.checkpoint import is_complete_checkpoint

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


def common_args(tiny_data, checkpoint_every: int = CHECKPOINT_EVERY) -> list[str]:
    return [f"data.tokenizer={tiny_data['tokenizer']}", "logging.progress_bar=false", f"max_duration={STEPS}ba",
            f"checkpoint.interval={checkpoint_every}ba", "scheduler.warmup=4ba", "batch_warmup.tokens=3000",
            "run_name=resume-check"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_metrics(tiny_data, tmp_path_factory):
    """metrics.jsonl of the uninterrupted run (a callable: it waits for the run, which starts right away)."""
    work = tmp_path_factory.mktemp("reference")
    reference = launch(common_args(tiny_data) + [f"data.manifest={tiny_data['mix']}", f"save_folder={work / 'run'}"],
                       work / "reference.log")

    def finished() -> list[dict]:
        assert reference.wait(timeout=300) == 0, (work / "reference.log").read_text()[-3000:]
        return read_metrics(work / "run")
    yield finished
    if reference.poll() is None:
        reference.kill()
        reference.wait()


def assert_same_run(got: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # nothing repeated, nothing skipped
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
    assert [r["batch_size"] for r in got] == [r["batch_size"] for r in ref]
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]
    assert [r["train/loss"] for r in got] == [r["train/loss"] for r in ref]  # bit-identical floats
    assert [r["train/masked_accuracy"] for r in got] == [r["train/masked_accuracy"] for r in ref]
    # time_s continues across the restarts instead of starting again at zero.
    assert all(b["time_s"] > a["time_s"] for a, b in zip(got, got[1:]))


def test_sigkill_and_relaunch_continues_bit_identically(tiny_data, tmp_path, reference_metrics):
    killed_dir = tmp_path / "killed"
    killed_args = common_args(tiny_data) + [f"data.manifest={copy_data(tiny_data, tmp_path / 'copy')}",
                                            f"save_folder={killed_dir}"]
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
    assert_same_run(read_metrics(killed_dir), reference_metrics())
    assert "done: 12 steps" in (tmp_path / "killed-2.log").read_text()
    # keep_last=2 of the tiny recipe: only the two newest checkpoints stay.
    assert sorted(p.name for p in killed_dir.glob("ep*-ba*-rank0.pt")) == ["ep0-ba12-rank0.pt", "ep0-ba8-rank0.pt"]


def kill_mid_save(victim: subprocess.Popen, run_dir: Path, log: Path) -> Path | None:
    """SIGKILL `victim` while it writes a checkpoint file; the file it was writing, or None if it finished.

    Each new checkpoint file is caught as soon as it appears and the process frozen (SIGSTOP) on the spot:
    if the file is still incomplete, the kill lands mid-save; if the save had already ended, training goes on
    and the next checkpoint is tried."""
    seen = {p.name for p in run_dir.glob("ep*-ba*-rank0.pt")} if run_dir.exists() else set()
    while victim.poll() is None:
        new = [p for p in run_dir.glob("ep*-ba*-rank0.pt") if p.name not in seen] if run_dir.exists() else []
        if not new:
            time.sleep(0.001)
            continue
        victim.send_signal(signal.SIGSTOP)
        if not is_complete_checkpoint(new[0]):
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            return new[0]
        seen.add(new[0].name)
        victim.send_signal(signal.SIGCONT)
    assert victim.returncode == 0, log.read_text()[-3000:]
    return None


def kill_after_step(victim: subprocess.Popen, run_dir: Path, log: Path, step: int, delay_s: float) -> None:
    """SIGKILL `victim` `delay_s` after this launch logged `step` (a relaunch first cuts metrics.jsonl back)."""
    metrics = run_dir / "metrics.jsonl"
    old_file = metrics.stat().st_ino if metrics.exists() else None
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.stat().st_ino != old_file and step in steps_written(run_dir)):
        assert victim.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the run never reached step {step}"
        time.sleep(0.01)
    time.sleep(delay_s)
    victim.send_signal(signal.SIGKILL)
    victim.wait()


def newest_complete_step(run_dir: Path) -> int:
    steps = [int(p.name.split("-ba")[1].split("-")[0]) for p in run_dir.glob("ep*-ba*-rank0.pt")
             if is_complete_checkpoint(p)]
    return max(steps, default=0)


def test_three_sigkills_one_mid_save_give_the_uninterrupted_losses(tiny_data, tmp_path, reference_metrics):
    """Issue 12's "done when": killed at three moments (one of them inside a checkpoint save), relaunched each
    time with the same command, the run logs the reference's per-step losses bit for bit."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    run_dir = tmp_path / "killed"
    # A checkpoint every 2 steps while the reference saves every 4: saving must not change the numbers.
    args = common_args(tiny_data, checkpoint_every=2) + [
        f"data.manifest={copy_data(tiny_data, tmp_path / 'copy')}", f"save_folder={run_dir}"]
    logs = [tmp_path / f"launch-{i}.log" for i in range(4)]

    kill_after_step(launch(args, logs[0]), run_dir, logs[0], rng.randint(2, 5), rng.uniform(0.0, 0.3))
    cut_short = kill_mid_save(launch(args, logs[1]), run_dir, logs[1])
    assert cut_short is not None, f"no checkpoint save was caught mid-write (seed {seed})"
    resume_step = newest_complete_step(run_dir)
    kill_after_step(launch(args, logs[2]), run_dir, logs[2], rng.randint(resume_step + 1, STEPS - 1),
                    rng.uniform(0.0, 0.3))
    final = launch(args, logs[3])
    assert final.wait(timeout=300) == 0, logs[3].read_text()[-3000:]

    assert_same_run(read_metrics(run_dir), reference_metrics())
    # The half-written file was kept under another name, and the relaunch after it said so.
    assert (run_dir / (cut_short.name + ".incomplete")).is_file(), sorted(p.name for p in run_dir.iterdir())
    assert f"{cut_short.name} was not written to the end" in logs[2].read_text(), seed

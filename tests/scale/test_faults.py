"""Faults injected into a 4-rank FSDP2 job of the real trainer under the real launcher (tiny preset, gloo, CPU).

For each fault: the job ends by itself within BOUND_S with a line naming what failed, the relaunch of the same
command resumes past any half-written checkpoint, and its per-step losses equal those of an uninterrupted 4-rank
run bit for bit. Slow (minutes each on 2 cores): `make test-scale` runs them (SCALE_TESTS=1); results go to
$SCALE_RESULTS for bench/RESULTS.md's fault table.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.train.conftest import tiny_data  # noqa: F401 - the shared real shards
from tests.train.test_fsdp import _copy_data as copy_data
from tests.scale.harness import (DIST_TIMEOUT_S, FaultResult, launch, losses, relaunch_and_compare,
                                 wait_for_step)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600),
              pytest.mark.skipif(os.environ.get("SCALE_TESTS") != "1", reason="cluster rehearsal: make test-scale")]
STEPS, EVERY, FAULT_AT = 6, 2, 3
# The collective timeout, the loader's bounded wait for its prefetch thread at exit (30 s), the launcher's SIGTERM
# grace (30 s) and the exits.
BOUND_S = DIST_TIMEOUT_S + 120
COMMON = [f"max_duration={STEPS}ba", f"checkpoint.interval={EVERY}ba", "checkpoint.keep_last=-1",
          "logging.progress_bar=false", "run_name=rehearsal", "batch_warmup.start_batch_size=null",
          "parallelism.fsdp={version: 2, state_dict_type: sharded}"]


@pytest.fixture(scope="module")
def rehearsal(tiny_data, tmp_path_factory):
    """(work folder, args maker, reference losses of an uninterrupted 4-rank run)."""
    work = tmp_path_factory.mktemp("rehearsal")

    def args_for(name: str, save_folder: Path | None = None) -> tuple[list[str], Path]:
        run_dir = save_folder or work / name / "run"
        return [*COMMON, *copy_data(tiny_data, work / name / "data"), f"save_folder={run_dir}"], run_dir

    args, run_dir = args_for("reference")
    job = launch(work, "reference", args)
    seconds = job.wait_ended(1800)
    assert seconds is not None and [p.returncode for p in job.launchers] == [0], job.launcher_text()[-3000:]
    reference = losses(run_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))
    return work, args_for, reference


def _fault(rehearsal, name: str, inject, *, nodes: int = 1, env: dict | None = None, relaunch_env: dict | None = None,
           save_folder: Path | None = None, between=None, fault_at: int = FAULT_AT, reference: dict | None = None):
    work, args_for, one_node_reference = rehearsal
    reference = one_node_reference if reference is None else reference
    args, run_dir = args_for(name, save_folder)
    job = launch(work, name, args, nodes=nodes, env=env)
    wait_for_step(job, run_dir, fault_at)
    what = inject(job, run_dir)
    seconds = job.wait_ended(BOUND_S)
    if seconds is None:
        job.kill_all()
    lines = job.error_lines()
    if between is not None:
        between()
    outcome, compared = relaunch_and_compare(work, f"{name}-relaunch", args, run_dir, reference, STEPS, nodes=nodes,
                                             env=relaunch_env if relaunch_env is not None else env)
    result = FaultResult(fault=name, what_the_run_does=what, seconds_to_exit=None if seconds is None else round(seconds, 1),
                         launcher_line=_launcher_line(job)[:300], error_line=(lines[0] if lines else "")[:300],
                         relaunch=outcome, steps_compared=compared)
    result.record()
    return result, job


def _launcher_line(job) -> str:
    """The launcher's first word on the failure: 'Rank R crashed with exit code C.' (composer's launcher)."""
    for line in job.launcher_text().splitlines():
        if "crashed with exit code" in line or "exited with code" in line:
            return line.split("launcher:")[-1].strip()
    return ""


def _assert_ok(result: FaultResult, names: str) -> None:
    assert result.seconds_to_exit is not None, f"{result.fault}: the job did not end within {BOUND_S} s"
    assert names in result.launcher_line.lower() or names in result.error_line, result
    assert result.relaunch == "bit-identical", result


def test_one_rank_sigkilled_mid_step(rehearsal):
    def inject(job, run_dir):
        os.kill(job.rank_pids()[2], signal.SIGKILL)
        return "SIGKILL rank 2 after step 3"
    result, _ = _fault(rehearsal, "rank-sigkill", inject)
    _assert_ok(result, "rank 2")


def test_a_whole_node_killed(rehearsal):
    # Two nodes read the data in another layout than one node of four ranks: the losses to match are those of an
    # uninterrupted 2-node run.
    work, args_for, _ = rehearsal
    args, run_dir = args_for("reference-2-nodes")
    job = launch(work, "reference-2-nodes", args, nodes=2)
    assert job.wait_ended(1800) is not None and not any(p.returncode for p in job.launchers), job.launcher_text()[-3000:]
    two_nodes = losses(run_dir)
    assert sorted(two_nodes) == list(range(1, STEPS + 1))

    def inject(job, run_dir):
        os.killpg(job.launchers[1].pid, signal.SIGKILL)  # node 1's launcher and its ranks 2, 3
        for pid in [pid for rank, pid in job.rank_pids().items() if rank >= 2]:
            os.kill(pid, signal.SIGKILL)
        return "SIGKILL node 1 (its launcher and ranks 2-3) after step 3"
    result, _ = _fault(rehearsal, "node-kill", inject, nodes=2, reference=two_nodes)
    assert result.seconds_to_exit is not None and result.relaunch == "bit-identical", result
    assert "rank 2" in result.error_line or "rank 3" in result.error_line, result  # the ranks left name them


def test_a_rank_stalled_past_the_collective_timeout(rehearsal):
    stopped = []

    def inject(job, run_dir):
        pid = job.rank_pids()[1]
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
        return f"SIGSTOP rank 1 after step 3 (collective timeout {DIST_TIMEOUT_S} s)"
    result, _ = _fault(rehearsal, "rank-sigstop", inject)
    assert result.seconds_to_exit is not None and result.seconds_to_exit >= DIST_TIMEOUT_S - 1, result
    assert result.relaunch == "bit-identical", result


def test_the_launcher_killed(rehearsal):
    def inject(job, run_dir):
        job.launchers[0].send_signal(signal.SIGKILL)
        job.launchers[0].wait()
        return "SIGKILL the composer launcher after step 3"
    result, _ = _fault(rehearsal, "launcher-sigkill", inject)
    assert result.seconds_to_exit is not None and result.seconds_to_exit < 10, result  # ranks die with it
    assert result.relaunch == "bit-identical", result


def test_a_kill_during_a_save_on_some_ranks(rehearsal):
    def inject(job, run_dir):
        # The step-4 save begins when its folder appears: ranks 1 and 3 die while writing their shards.
        deadline = time.monotonic() + 300
        while not (run_dir / "ep0-ba4").exists():
            assert time.monotonic() < deadline, "no save began"
            time.sleep(0.005)
        pids = job.rank_pids()
        for rank in (1, 3):
            os.kill(pids[rank], signal.SIGKILL)
        written = sorted(p.name for p in (run_dir / "ep0-ba4").iterdir())
        return f"SIGKILL ranks 1, 3 as the step-4 sharded save began (present then: {len(written)} files)"
    result, _ = _fault(rehearsal, "kill-during-save", inject)
    _assert_ok(result, "rank 1")


def test_disk_full_while_saving(rehearsal, tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        def inject(job, run_dir):
            return ("save_folder on a 20 MiB tmpfs: the step-2 sharded checkpoint (about 13 MB) fits, the step-4 "
                    "one does not (seconds counted from step 2)")

        def bigger_disk():
            subprocess.run(["mount", "-o", "remount,size=512m", str(mount)], check=True)
        result, _ = _fault(rehearsal, "disk-full", inject, save_folder=mount / "run", between=bigger_disk,
                           fault_at=2)
    finally:
        subprocess.run(["umount", "-l", str(mount)])
    assert result.seconds_to_exit is not None, result
    # One line per rank, naming the rank and the save folder (not a traceback).
    assert result.error_line.startswith("error: rank ") and "no space left" in result.error_line, result
    assert result.relaunch == "bit-identical", result

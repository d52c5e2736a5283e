"""launch/slurm_phase.sbatch under a real SLURM (slurmctld + two slurmd on 127.0.0.1), as a user submits it.

The script runs unchanged; only its documented variables adapt it to this CPU cluster: SBATCH_GPUS_PER_NODE=0
(no GPU gres), NPROC_PER_NODE, PYTHON, NODE_TMPDIR, SBATCH_OUTPUT. The tiny recipe trains on gloo with
world-invariant data and no dropout, so every layout of 2 ranks computes the same losses.

  reference  1 node x 2 ranks, never interrupted
  one_node   1 node x 2 ranks, `scontrol requeue` mid-run, released, resumes from its checkpoint
  two_nodes  2 nodes x 1 rank (n0 and n1 share this host and its /dev/shm), requeued the same way: both nodes
             resume from ONE shared save_folder (composer's own autoresume failed here, llm-foundry#1736)

Each requeued run must end with every step once and losses identical to the reference, and no job may leave
its scratch folder behind. The figures (seconds from `scontrol requeue` until SLURM had ended every process of
the job, and from release to completion) are printed for bench/RESULTS.md ("cluster rehearsal").
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm_phase.sbatch"
pytestmark = pytest.mark.slow
STEPS, CHECKPOINT_EVERY, REQUEUE_AT = 16, 4, 5
COMMON = [f"max_duration={STEPS}ba", f"checkpoint.interval={CHECKPOINT_EVERY}ba", "checkpoint.keep_last=-1",
          "batch_warmup.start_batch_size=null", "model.config.attention_output_dropout=0.0",
          "data.loader_options={world_invariant: true}", "logging.progress_bar=false", "run_name=slurm-rehearsal"]
LAYOUTS = {"reference": (1, 2), "one_node": (1, 2), "two_nodes": (2, 1)}  # name: (nodes, ranks per node)
RUN_TIMEOUT_S = 600


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _log(work: Path, name: str) -> str:
    return "\n".join(p.read_text(errors="replace")[-6000:] for p in sorted(work.glob(f"{name}-*.out")))


def _submit(cluster, work: Path, data: dict, name: str) -> int:
    nodes, nproc = LAYOUTS[name]
    scratch = work / f"scratch-{name}"
    scratch.mkdir()
    env = {"SBATCH_GPUS_PER_NODE": "0", "NPROC_PER_NODE": str(nproc), "PYTHON": sys.executable,
           "NODE_TMPDIR": str(scratch), "SBATCH_OUTPUT": str(work / f"{name}-%j.out"), "OMP_NUM_THREADS": "1"}
    return cluster.sbatch(f"--nodes={nodes}", f"--job-name={name}", str(SBATCH), "yamls/tiny/phase1.yaml", *COMMON,
                          f"data.manifest={data['manifest']}", f"data.tokenizer={data['tokenizer']}",
                          f"save_folder={work / name}", env=env, cwd=REPO)


def _wait_done(cluster, job: int, work: Path, name: str) -> None:
    state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"},
                               RUN_TIMEOUT_S)
    assert state == "COMPLETED", f"job {job} ({name}) ended {state}:\n{_log(work, name)}"


def _training_processes(job: int) -> list[int]:
    """Training processes (ranks and launchers) of a SLURM job on this host."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job}".encode() in environ and b"modernbert_train" in cmdline:
            found.append(int(proc.name))
    return found


def _requeue_mid_run(cluster, job: int, work: Path, name: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    checked = 0.0
    while not any(r["step"] >= REQUEUE_AT for r in _metrics(work / name)):
        if time.monotonic() - checked > 2:  # scontrol is slow on a loaded machine: not on every poll
            checked = time.monotonic()
            assert cluster.state(job) in {"PENDING", "CONFIGURING", "RUNNING"}, _log(work, name)
        assert time.monotonic() < deadline, f"job {job} never reached step {REQUEUE_AT}:\n{_log(work, name)}"
        time.sleep(0.05)
    # The ranks are paused (SIGSTOP) so that the requeue lands mid-run however slowly this machine answers:
    # SLURM sends SIGCONT before SIGTERM, as to any job it ends.
    for pid in _training_processes(job):
        os.kill(pid, signal.SIGSTOP)
    requeued = time.monotonic()
    cluster.requeue(job)
    ranks_gone_s = None
    # SLURM ends every process of the job (SIGTERM, SIGKILL after KillWait), then queues it again, held ~120 s.
    while cluster.state(job) != "PENDING":
        if ranks_gone_s is None and not _training_processes(job):
            ranks_gone_s = time.monotonic() - requeued
        assert time.monotonic() - requeued < 120, f"job {job} still {cluster.state(job)} 120 s after the requeue"
        time.sleep(0.1)
    exit_s = time.monotonic() - requeued
    killed_at = max(r["step"] for r in _metrics(work / name))
    assert killed_at < STEPS, f"the run finished (step {killed_at}) before the requeue stopped it"
    released = time.monotonic()
    cluster.release(job)
    _wait_done(cluster, job, work, name)
    return {"ranks_gone_s": ranks_gone_s or exit_s, "exit_s": exit_s, "resume_to_done_s": time.monotonic() - released, "killed_at": killed_at,
            "restarts": cluster.job(job).get("Restarts")}


@pytest.fixture(scope="module")
def runs(slurm_cluster, scale_data, tmp_path_factory):
    """runs(name) -> the work folder, once that layout's job has ended (each job runs once, when first asked for,
    so `-k two_nodes` runs only the reference and the 2-node job)."""
    work = tmp_path_factory.mktemp("slurm_runs")
    figures: dict[str, dict] = {}

    def run(name: str) -> Path:
        if name not in figures:
            started = time.monotonic()
            job = _submit(slurm_cluster, work, scale_data, name)
            if name == "reference":
                _wait_done(slurm_cluster, job, work, name)
                figures[name] = {"run_s": time.monotonic() - started}
            else:
                figures[name] = _requeue_mid_run(slurm_cluster, job, work, name)
            print(f"\nslurm rehearsal, {name}:", json.dumps(figures[name]))
        return work

    run.figures = figures
    yield run
    (work / "figures.json").write_text(json.dumps(figures, indent=1))


@pytest.mark.parametrize("name", ["one_node", "two_nodes"])
def test_requeued_job_resumes_with_the_losses_of_an_uninterrupted_run(runs, name):
    runs("reference")
    work = runs(name)
    resumed, straight = _metrics(work / name), _metrics(work / "reference")
    assert [r["step"] for r in straight] == list(range(1, STEPS + 1))
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), "steps repeated or skipped after the requeue"
    assert [r["train/loss"] for r in resumed] == [r["train/loss"] for r in straight]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    assert straight[-1]["train/loss"] < straight[0]["train/loss"]  # it does train
    assert runs.figures[name]["restarts"] == "1"
    log = _log(work, name)
    assert "restart 1:" in log and "FileNotFoundError" not in log
    # The restart continued from a checkpoint written before the requeue (its first console line is the step
    # after one), not from scratch.
    restarted = re.search(r"train slurm-rehearsal: step (\d+)/", log.split("restart 1:", 1)[1])
    assert restarted, log
    first_step = int(restarted.group(1))
    assert first_step > CHECKPOINT_EVERY and (first_step - 1) % CHECKPOINT_EVERY == 0, first_step


@pytest.mark.parametrize("name", ["reference", "one_node", "two_nodes"])
def test_no_scratch_folder_is_left_behind(runs, name):
    scratch = runs(name) / f"scratch-{name}"
    assert scratch.is_dir() and list(scratch.iterdir()) == [], list(scratch.iterdir())


def test_the_job_asked_for_no_gpu_and_gave_each_node_its_process_count(runs):
    log = _log(runs("two_nodes"), "two_nodes")
    assert "2 node(s)" in log and "1 process(es) per node" in log
    assert "--nproc 0" not in log

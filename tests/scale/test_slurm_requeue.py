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
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm_phase.sbatch"
pytestmark = pytest.mark.slow
STEPS, CHECKPOINT_EVERY, REQUEUE_AT = 12, 4, 5
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


def _requeue_mid_run(cluster, job: int, work: Path, name: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not any(r["step"] >= REQUEUE_AT for r in _metrics(work / name)):
        assert cluster.state(job) in {"PENDING", "CONFIGURING", "RUNNING"}, _log(work, name)
        assert time.monotonic() < deadline, f"job {job} never reached step {REQUEUE_AT}:\n{_log(work, name)}"
        time.sleep(0.1)
    requeued = time.monotonic()
    cluster.requeue(job)
    # SLURM ends every process of the job (SIGTERM, SIGKILL after KillWait), then queues it again, held ~120 s.
    cluster.wait_state(job, {"PENDING"}, 120)
    exit_s = time.monotonic() - requeued
    killed_at = max(r["step"] for r in _metrics(work / name))
    assert killed_at < STEPS, f"the run finished (step {killed_at}) before the requeue stopped it"
    released = time.monotonic()
    cluster.release(job)
    _wait_done(cluster, job, work, name)
    return {"exit_s": exit_s, "resume_to_done_s": time.monotonic() - released, "killed_at": killed_at,
            "restarts": cluster.job(job).get("Restarts")}


@pytest.fixture(scope="module")
def runs(slurm_cluster, scale_data, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("slurm_runs")
    result = {"work": work, "figures": {}}
    started = time.monotonic()
    reference = _submit(slurm_cluster, work, scale_data, "reference")
    _wait_done(slurm_cluster, reference, work, "reference")
    result["figures"]["reference"] = {"run_s": time.monotonic() - started}
    for name in ("one_node", "two_nodes"):
        job = _submit(slurm_cluster, work, scale_data, name)
        result["figures"][name] = _requeue_mid_run(slurm_cluster, job, work, name)
        result[f"{name}_job"] = job
    print("\nslurm rehearsal figures:", json.dumps(result["figures"], indent=1))
    return result


@pytest.mark.parametrize("name", ["one_node", "two_nodes"])
def test_requeued_job_resumes_with_the_losses_of_an_uninterrupted_run(runs, name):
    work = runs["work"]
    resumed, straight = _metrics(work / name), _metrics(work / "reference")
    assert [r["step"] for r in straight] == list(range(1, STEPS + 1))
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), "steps repeated or skipped after the requeue"
    assert [r["train/loss"] for r in resumed] == [r["train/loss"] for r in straight]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    assert straight[-1]["train/loss"] < straight[0]["train/loss"]  # it does train
    figures = runs["figures"][name]
    assert figures["restarts"] == "1"
    log = _log(work, name)
    assert "restart 1:" in log and "FileNotFoundError" not in log
    # It resumed from the checkpoint written before the requeue, not from scratch.
    assert f"Loading checkpoint from {work / name}" in log or "ep0-ba" in log


@pytest.mark.parametrize("name", ["reference", "one_node", "two_nodes"])
def test_no_scratch_folder_is_left_behind(runs, name):
    scratch = runs["work"] / f"scratch-{name}"
    assert scratch.is_dir() and list(scratch.iterdir()) == [], list(scratch.iterdir())


def test_the_job_asked_for_no_gpu_and_gave_each_node_its_process_count(runs):
    log = _log(runs["work"], "two_nodes")
    assert "2 node(s)" in log and "1 process(es) per node" in log
    assert "--nproc 0" not in log

"""Two ranks started by hand (no launcher to kill the others, as on another node): a set-up failure on one rank
ends both at once with the same line naming it; a checkpoint to start from is read by one rank only."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
EXIT_BOUND_S = 90.0  # composer's collective timeout is 300 s: a rank left waiting in one would take that long


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_ranks(command: list[str], work: Path, per_rank_env=lambda rank: {}) -> list[subprocess.Popen]:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, TMPDIR=str(work), OMP_NUM_THREADS="1",
                   PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **per_rank_env(rank))
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                      stderr=(work / f"rank{rank}.err").open("w")))
    return procs


def _wait_all(procs, bound: float) -> list[int]:
    deadline = time.monotonic() + bound
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a rank was still running {bound:.0f} s after the failure")
    return codes


def test_a_setup_failure_on_rank_1_only_ends_every_rank_with_one_line_naming_it(tiny_data, data_overrides, tmp_path):
    missing = tmp_path / "only-on-node-0" / "mix.yaml"  # as a manifest present on one node's disk only
    command = [sys.executable, "-m", "modernbert_train.train", str(REPO / "yamls/tiny/phase1.yaml"),
               *data_overrides(), "data.manifest=${oc.env:TEST_MANIFEST}", f"save_folder={tmp_path / 'run'}",
               "max_duration=4ba"]
    started = time.monotonic()
    procs = _two_ranks(command, tmp_path, lambda rank: {
        "TEST_MANIFEST": str(tiny_data["mix"] if rank == 0 else missing)})
    codes = _wait_all(procs, EXIT_BOUND_S)
    seconds = time.monotonic() - started
    assert codes == [2, 2]
    # Ranks other than 0 prefix their lines with "[rank N] " (train/console.py).
    last = [re.sub(r"^\[rank \d+\] ", "", (tmp_path / f"rank{r}.err").read_text().strip().splitlines()[-1])
            for r in range(2)]
    assert last[0] == last[1], last
    assert last[0].startswith("error: rank 1 of 2 failed while reading the data manifest") and str(missing) in last[0]
    assert seconds < EXIT_BOUND_S


def test_a_checkpoint_to_start_from_is_read_on_one_rank_and_reaches_both(trained_tiny_run, data_overrides, tmp_path):
    """model.init_from + model.init_optimizer on 2 ranks: rank 0 reads the file (weights, then moments), rank 1
    never does, and both hold bit-identical weights and moments, equal to a 1-process set-up's."""
    out = tmp_path / "setup"
    args = [str(REPO / "yamls/tiny/phase2.yaml"), *data_overrides(), f"model.init_from={trained_tiny_run}",
            "model.init_optimizer=true", "max_duration=4ba", "data.loader_options={prefetch_steps: 0}"]
    procs = _two_ranks([sys.executable, str(REPO / "tests/train/rank_setup.py"), str(out), *args,
                        f"save_folder={tmp_path / 'two'}"], tmp_path)
    assert _wait_all(procs, 300) == [0, 0], [(tmp_path / f"rank{r}.err").read_text()[-3000:] for r in range(2)]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    single = subprocess.run([sys.executable, str(REPO / "tests/train/rank_setup.py"), f"{out}-single", *args,
                             f"save_folder={tmp_path / 'one'}"], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, TMPDIR=str(tmp_path),
                                     PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"))
    assert single.returncode == 0, single.stderr[-3000:]
    reference = json.loads(Path(f"{out}-single.rank0.json").read_text())
    checkpoint_reads = [[r for r in rank["reads"] if str(trained_tiny_run) in r] for rank in ranks]
    assert len(checkpoint_reads[0]) == 2 and checkpoint_reads[1] == []  # weights and moments, on rank 0 only
    assert len([r for r in reference["reads"] if str(trained_tiny_run) in r]) == 2
    assert ranks[0]["digest"] == ranks[1]["digest"] == reference["digest"]
    assert ranks[0]["moments"] == ranks[1]["moments"] == reference["moments"] > 0  # the moments were carried


def test_a_model_to_tile_from_is_read_on_one_rank(trained_tiny_run, data_overrides, tmp_path):
    """model.init_from=tile:RUN on 2 ranks: rank 0 reads the smaller model's checkpoint once, rank 1 never, and
    both start from the same tiled weights."""
    out = tmp_path / "setup"
    args = [str(REPO / "yamls/tiny/phase1.yaml"), *data_overrides(), f"model.init_from=tile:{trained_tiny_run}",
            "model.config.hidden_size=192", "model.config.num_hidden_layers=8", "model.config.intermediate_size=288",
            "max_duration=4ba", "data.loader_options={prefetch_steps: 0}", f"save_folder={tmp_path / 'two'}"]
    procs = _two_ranks([sys.executable, str(REPO / "tests/train/rank_setup.py"), str(out), *args], tmp_path)
    assert _wait_all(procs, 300) == [0, 0], [(tmp_path / f"rank{r}.err").read_text()[-3000:] for r in range(2)]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    reads = [[r for r in rank["reads"] if str(trained_tiny_run) in r] for rank in ranks]
    assert len(reads[0]) == 1 and reads[1] == [], reads
    assert ranks[0]["digest"] == ranks[1]["digest"]

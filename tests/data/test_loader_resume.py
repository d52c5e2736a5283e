"""Exact resume: K steps, save, restore in a new process, continue == an uninterrupted run, byte for byte.

Each run is a fresh process (`loader_run.py`), as after a crash. The epoch is kept small (`choose`) so the
runs cross several epoch boundaries, and batch-size warmup is on, so buffer, warmup position and epoch
hand-over are all part of the state under test.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import write_manifest

RUNNER = Path(__file__).with_name("loader_run.py")
TOTAL_STEPS = 48
SAVE_AT = 19


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(tmp: Path, config: dict, world: int, steps: int, out: str, *, save: str | None = None,
         save_at: int | None = None, load: str | None = None) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK"):
            env.pop(key, None)
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                       NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, str(RUNNER), "--config", json.dumps(config), "--steps", str(steps),
               "--out", str(tmp / out)]
        if save:
            cmd += ["--save", str(tmp / save)] + (["--save-at", str(save_at)] if save_at else [])
        if load:
            cmd += ["--load", str(tmp / load)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        outputs.append(output)
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
    return [json.loads((tmp / f"{out}.rank{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("world,num_workers", [(1, 0), (1, 2), (2, 0)], ids=["1rank-0workers", "1rank-2workers",
                                                                           "2ranks-0workers"])
def test_resume_in_new_process_is_byte_identical(corpus_copy, world, num_workers):
    tmp = corpus_copy["tmp"]
    manifest = write_manifest(tmp / "mix.yaml", corpus_copy["shards"],
                              {"code": {"choose": 6}, "prose": {"choose": 6}, "docstrings": {"choose": 32}})
    config = dict(manifest=str(manifest), tokenizer=corpus_copy["tokenizer"], max_seq_len=256, micro_batch_size=2,
                  global_batch_size=4 * world, batch_size_warmup_start=2 * world, batch_size_warmup_tokens=12_000,
                  num_workers=num_workers, raw_batch_size=8, packing_lookahead_tokens=1024)

    uninterrupted = _run(tmp, config, world, TOTAL_STEPS, "full", save="state.pkl", save_at=SAVE_AT)
    resumed = _run(tmp, config, world, TOTAL_STEPS - SAVE_AT, "resumed", load="state.pkl")

    for rank in range(world):
        full, rest = uninterrupted[rank], resumed[rank]
        assert len(full["digests"]) == TOTAL_STEPS
        assert max(full["epochs"]) >= 2, "the run should cross epoch boundaries"
        assert full["epochs"][SAVE_AT:] == rest["epochs"]
        mismatches = [i for i, (a, b) in enumerate(zip(full["digests"][SAVE_AT:], rest["digests"])) if a != b]
        assert not mismatches, f"rank {rank}: steps {[SAVE_AT + i for i in mismatches]} differ after resume"
        assert full["tokens_seen"] == rest["tokens_seen"]
    if world > 1:
        # The ranks read different partitions of the data.
        assert uninterrupted[0]["digests"][0] != uninterrupted[1]["digests"][0]

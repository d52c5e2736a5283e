"""Two jobs starting together on one host: streaming's leader finds the first free shared-memory prefix, then
creates it, so both can pick the same one and the second dies (FileExistsError '/000523_locals', seen in CI when
the exact-resume test's two runs started side by side). The host-wide lock around registration prevents it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import write_manifest

REPO = Path(__file__).resolve().parents[2]
JOBS = 3
WINDOW_S = 3.0

# Each job, once it has found its free prefix and is about to create it, waits until every job is there too (a
# file per job in found/), then reads every sample. "unlocked" replaces our lock with a no-op, so all jobs find
# the same prefix before any creates it: the collision the lock exists for, every time, however the machine
# schedules the jobs (a fixed 1 s pause was not enough on a loaded CI machine). Under the lock the others cannot
# reach that point while one holds it, so there the wait gives up after WINDOW_S.
CHILD = """
import contextlib, os, pathlib, sys, time
import streaming.base.shared.prefix as prefix
import modernbert_train.data.dataset as dataset_module
from modernbert_train.data import build_streaming_dataset, load_manifest

manifest, mode, rendezvous, jobs = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), int(sys.argv[4])
ready, found = rendezvous / "ready", rendezvous / "found"
window_s = 120.0 if mode == "unlocked" else float(sys.argv[5])
shared_memory = prefix.SharedMemory
def wait_for_all_then_create(name, create=True, *args, **kwargs):
    if create and name.endswith("locals") and not (found / str(os.getpid())).exists():
        (found / str(os.getpid())).touch()
        deadline = time.monotonic() + window_s
        while len(list(found.iterdir())) < jobs and time.monotonic() < deadline:
            time.sleep(0.01)
    return shared_memory(name, create, *args, **kwargs)
prefix.SharedMemory = wait_for_all_then_create
if mode == "unlocked":
    dataset_module.host_shm_lock = lambda *args, **kwargs: contextlib.nullcontext()
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < jobs:
    time.sleep(0.01)
dataset = build_streaming_dataset(load_manifest(manifest), batch_size=4, shuffle=False, seed=0)
print("samples", sum(1 for _ in dataset))
"""


def _start_together(manifest: Path, mode: str, tmp: Path) -> list[subprocess.CompletedProcess]:
    rendezvous = tmp / f"rendezvous-{mode}"
    (rendezvous / "ready").mkdir(parents=True)
    (rendezvous / "found").mkdir()
    command = [sys.executable, "-c", CHILD, str(manifest), mode, str(rendezvous), str(JOBS), str(WINDOW_S)]
    jobs = []
    for job in range(JOBS):
        # Each job its own TMPDIR, as launch/multinode.sh gives each launch: the lock must not depend on it.
        own_tmp = tmp / f"{mode}-{job}"
        own_tmp.mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(own_tmp),
               "MODERNBERT_SHARD_CACHE": str(tmp / "cache")}
        jobs.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True))
    return [subprocess.CompletedProcess(job.args, job.wait(timeout=300), job.stdout.read()) for job in jobs]


def test_jobs_starting_together_on_one_host_all_register_their_shared_memory(corpus_copy):
    manifest = write_manifest(corpus_copy["tmp"] / "mix.yaml", corpus_copy["shards"])
    total = sum(meta["chunks"] for meta in corpus_copy["meta"].values())

    unlocked = _start_together(manifest, "unlocked", corpus_copy["tmp"])
    collided = [job for job in unlocked if job.returncode != 0]
    assert collided and all("FileExistsError" in job.stdout for job in collided), [j.stdout[-800:] for j in unlocked]

    locked = _start_together(manifest, "locked", corpus_copy["tmp"])
    for job in locked:
        assert job.returncode == 0, job.stdout[-2000:]
        assert job.stdout.splitlines()[-1] == f"samples {total}"

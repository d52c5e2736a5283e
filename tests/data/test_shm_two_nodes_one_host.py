"""Two nodes of one job whose leaders share a host's /dev/shm (a test cluster's two slurmd on 127.0.0.1, or a
node that runs two launchers): the host-wide registration lock must never be held across a collective.

Before data/shm_prefix.py, node 0's leader took the lock and then waited in a global barrier, while node 1's
leader waited for the lock: both sat until the lock's timeout (600 s; lowered to LOCK_WAIT_S here), then went on
without it with a warning. Each node's leader must register its own prefix at once, one after the other.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from .conftest import write_manifest

REPO = Path(__file__).resolve().parents[2]
LOCK_WAIT_S = 40.0

CHILD = """
import sys, time
import streaming  # imported before the clock starts: on a loaded machine its imports alone take seconds
import torch.distributed as dist
import modernbert_train.data.dataset as dataset_module
from modernbert_train.data import build_streaming_dataset, load_manifest

dataset_module.SHM_LOCK_WAIT_S = float(sys.argv[2])
dist.init_process_group("gloo")
start = time.monotonic()
dataset = build_streaming_dataset(load_manifest(sys.argv[1]), batch_size=4, shuffle=False, seed=0)
built = time.monotonic() - start
print("built", round(built, 2), "prefix", dataset._shm_prefix_int, "samples", sum(1 for _ in dataset), flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_node_leaders_on_one_host_register_without_waiting_for_each_other(corpus_copy):
    tmp = corpus_copy["tmp"]
    manifest = write_manifest(tmp / "mix.yaml", corpus_copy["shards"])
    total = sum(meta["chunks"] for meta in corpus_copy["meta"].values())
    port = _free_port()
    nodes = []
    for node in range(2):
        own_tmp = tmp / f"node{node}"  # as launch/multinode.sh gives each node's launch its own TMPDIR
        own_tmp.mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(own_tmp), "RANK": str(node), "WORLD_SIZE": "2",
               "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        env.pop("MODERNBERT_SHARD_CACHE", None)
        nodes.append(subprocess.Popen([sys.executable, "-c", CHILD, str(manifest), str(LOCK_WAIT_S)], env=env,
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
        assert "without it" not in output, output[-3000:]  # nobody gave up waiting for the lock
    lines = [output.strip().splitlines()[-1].split() for output in outputs]
    built = [float(line[1]) for line in lines]
    print(f"\nseconds to build each node's dataset: {built}")
    assert max(built) < LOCK_WAIT_S / 2, (built, outputs)
    assert lines[0][3] != lines[1][3], "both nodes' leaders registered the same shared-memory prefix"
    # Each node reads its half of the samples (a node is a rank here); streaming pads the halves to equal size.
    counts = [int(line[5]) for line in lines]
    assert counts[0] == counts[1] and total <= sum(counts) < total + 2 * 4, (counts, total)

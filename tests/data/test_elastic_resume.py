"""Elastic resume: a loader state written by W ranks continues on another number of ranks (4 -> 8 -> 4, and two
"nodes" -> one), and across the breaks every sample of the epoch's prefix is read exactly once.

Each stage is a job of real processes on gloo (`loader_run.py`). The count: the documents emitted by all stages
plus those still in the last stage's packer buffers must be exactly the samples at the positions the last
state says were consumed (everything below its frontier plus a few extras), with no document emitted twice;
the positions are mapped to sample ids with the epoch's global order as one process would read it.
Two "nodes" on one host each get their own /dev/shm (a mount namespace) and TMPDIR, as on separate machines.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from modernbert_train.data import elastic

from .conftest import write_manifest

RUNNER = Path(__file__).with_name("loader_run.py")
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _namespace_prefix() -> list[str] | None:
    """A command prefix giving a process tree its own /dev/shm, or None where mount namespaces are refused."""
    if shutil.which("unshare") is None:
        return None
    for flags in (["-m"], ["-Urm"]):
        probe = subprocess.run(["unshare", *flags, "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"],
                               capture_output=True)
        if probe.returncode == 0:
            return ["unshare", *flags, "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "node"]
    return None


def _stage(tmp: Path, config: dict, name: str, *, world: int, nodes: int = 1, steps: int,
           load: str | None = None) -> list[dict]:
    """Run `steps` steps on `world` ranks over `nodes` nodes; save the final state as <name>.pkl (and the
    epoch's global order as <name>.order.json on a fresh start)."""
    port, per_node = _free_port(), world // nodes
    procs = []
    for rank in range(world):
        node, local = divmod(rank, per_node)
        node_tmp = tmp / f"{name}-node{node}"
        node_tmp.mkdir(exist_ok=True)
        env = dict(os.environ, TMPDIR=str(node_tmp if nodes > 1 else tmp), PYTHONPATH=str(REPO))
        env.pop("MODERNBERT_SHARD_CACHE", None)
        env.update(RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(per_node),
                   NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, str(RUNNER), "--config", json.dumps(config), "--steps", str(steps), "--pieces",
               "--out", str(tmp / name), "--save", str(tmp / f"{name}.pkl")]
        cmd += ["--load", str(tmp / f"{load}.pkl")] if load else ["--order", str(tmp / f"{name}.order.json")]
        procs.append((node, cmd, env))
    running = []
    if nodes == 1:
        running = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for _, cmd, env in procs]
    else:
        prefix = _namespace_prefix()
        for node in range(nodes):
            # One namespace per node, its ranks started inside it: they share that node's /dev/shm only.
            starts = "".join(f"env {' '.join(f'{k}={env[k]}' for k in _NODE_ENV)} {' '.join(map(_quote, cmd))} "
                             f"& pids=\"$pids $!\"; " for n, cmd, env in procs if n == node)
            script = f"pids=; {starts}rc=0; for p in $pids; do wait $p || rc=1; done; exit $rc"
            running.append(subprocess.Popen([*prefix, "sh", "-c", script], env=procs[node * per_node][2],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in running:
        try:
            outputs.append(proc.communicate(timeout=900)[0])  # generous: CI hosts may be loaded
        except subprocess.TimeoutExpired:
            for other in running:
                other.kill()
            raise
    for proc, output in zip(running, outputs):
        assert proc.returncode == 0, f"stage {name} failed:\n{output[-4000:]}"
    results = [json.loads((tmp / f"{name}.rank{rank}.json").read_text()) for rank in range(world)]
    assert all(len(r["digests"]) == steps for r in results)
    return results


_NODE_ENV = ("RANK", "LOCAL_RANK")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _order(tmp: Path, name: str) -> list[int]:
    return json.loads((tmp / f"{name}.order.json").read_text())


def _check_every_sample_once(stages: list[list[dict]], final_state: dict, order: list[int], break_frontiers):
    assert len(set(order)) == len(order), "the test mixture should hold each sample once per epoch"
    emitted = [tuple(p) for stage in stages for rank in stage for p in rank["pieces"]]
    buffered = [(int(e), int(s), int(p)) for r in final_state["ranks"]
                for s, p, e, _, _ in np.asarray(r["buffer"]).reshape(-1, 5).tolist()]
    assert {e for e, _, _ in emitted + buffered} == {0}, "the test should stay within epoch 0"
    counts = Counter(emitted + buffered)
    repeated = [piece for piece, n in counts.items() if n > 1]
    assert not repeated, f"documents emitted (or still buffered) twice: {repeated[:5]}"
    frontier, extras = elastic.consumed(final_state["ranks"])
    consumed = np.union1d(np.arange(frontier), extras)
    expected = {order[q] for q in consumed.tolist()}
    got = {s for _, s, _ in counts}
    assert got == expected, (f"{len(expected - got)} samples of the consumed prefix never came out, "
                             f"{len(got - expected)} came out that lie outside it")
    for sample in got:  # each sample's pieces are all there
        pieces = sorted(p for _, s, p in counts if s == sample)
        assert pieces == list(range(len(pieces))), f"sample {sample}: pieces {pieces}"
    # The prefix counted reaches well past each break: the later stages read on from it.
    assert all(frontier > f for f in break_frontiers), (frontier, break_frontiers)
    return frontier


@pytest.fixture
def elastic_config(corpus_copy):
    tmp = corpus_copy["tmp"]
    manifest = write_manifest(tmp / "mix.yaml", corpus_copy["shards"],
                              {"code": {"choose": 60}, "prose": {"choose": 60}, "docstrings": {"choose": 600}})
    return dict(manifest=str(manifest), tokenizer=corpus_copy["tokenizer"], max_seq_len=256, micro_batch_size=2,
                global_batch_size=24, raw_batch_size=4, packing_lookahead_tokens=512, return_provenance=True)


@pytest.mark.slow
def test_resume_4_to_8_to_4_ranks_reads_every_sample_once(corpus_copy, elastic_config):
    tmp, config = corpus_copy["tmp"], elastic_config
    first = _stage(tmp, config, "w4", world=4, steps=3)
    state4 = pickle.loads((tmp / "w4.pkl").read_bytes())
    second = _stage(tmp, config, "w8", world=8, steps=3, load="w4")
    state8 = pickle.loads((tmp / "w8.pkl").read_bytes())
    third = _stage(tmp, config, "w4b", world=4, steps=3, load="w8")
    final = pickle.loads((tmp / "w4b.pkl").read_bytes())
    _check_every_sample_once([first, second, third], final, _order(tmp, "w4"),
                             [elastic.consumed(s["ranks"])[0] for s in (state4, state8)])
    # The schedule continues: steps and the global token count carry over (the batch is the recipe's).
    assert state8["ranks"][0]["steps"] == 6 and final["ranks"][0]["steps"] == 9
    assert final["ranks"][0]["tokens_seen"] > state8["ranks"][0]["tokens_seen"] > state4["ranks"][0]["tokens_seen"]
    assert [r["stride"] for r in state8["ranks"]] == [8] * 8 and [r["stride"] for r in final["ranks"]] == [4] * 4


@pytest.mark.slow
def test_resume_from_two_nodes_on_one_node(corpus_copy, elastic_config):
    if _namespace_prefix() is None:
        pytest.skip("two nodes on one host need a /dev/shm each: mount namespaces (unshare -m) are refused here")
    tmp, config = corpus_copy["tmp"], elastic_config
    first = _stage(tmp, config, "n2", world=4, nodes=2, steps=4)
    state = pickle.loads((tmp / "n2.pkl").read_bytes())
    assert state["num_nodes"] == 2 and state["num_canonical_nodes"] == 2
    # Node-major ranks, streaming's stripe order: node 0 holds stripes 0 and 2.
    assert [r["offset"] for r in state["ranks"]] == [0, 2, 1, 3]
    second = _stage(tmp, config, "n1", world=3, steps=4, load="n2")  # 4 ranks -> 3: uneven hand-over
    final = pickle.loads((tmp / "n1.pkl").read_bytes())
    assert final["num_canonical_nodes"] == 2, "the canonical node count (the global order) is kept"
    _check_every_sample_once([first, second], final, _order(tmp, "n2"), [elastic.consumed(state["ranks"])[0]])

"""A cluster rehearsed on one machine: the real trainer under the real launcher (`composer -n N`, or two launcher
groups on 127.0.0.1 as launch/multinode.sh starts them), tiny preset, gloo, and faults injected from outside.

Each fault test launches a job, waits for a step, injects the fault, measures the seconds until the whole job
(launchers and every rank) has ended by itself, reads the job's last error line, relaunches the same command and
compares the per-step losses with an uninterrupted run of the same world size. `FaultResult` is what each
test records; tests/scale/test_faults.py writes them to $SCALE_RESULTS (json lines) for bench/RESULTS.md.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Collectives give up on a missing rank after this long in these jobs (production: 300 s).
DIST_TIMEOUT_S = 20
RANK_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
             "BASE_RANK", "NNODES", "NPROC_PER_NODE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(work: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_KEYS}
    env.update(TMPDIR=str(work), OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", MODERNBERT_DIST_TIMEOUT=str(DIST_TIMEOUT_S),
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.update(extra)
    return env


@dataclass
class Job:
    """One launch: its launcher processes (one per "node") and where their output goes."""
    launchers: list[subprocess.Popen]
    logs: list[Path]
    rank_logs: Path  # folder of rank{N}.err files

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.launchers) or bool(self.rank_pids())

    def rank_pids(self) -> dict[int, int]:
        """Training processes of this job still alive: {global rank: pid} (composer sets RANK in their env)."""
        found = {}
        for launcher in self.launchers:
            for pid in _descendants(launcher.pid):
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"modernbert_train.train" not in cmdline:
                    continue
                for item in env:
                    if item.startswith(b"RANK="):
                        found[int(item[5:])] = pid
        return found

    def wait_ended(self, bound: float) -> float | None:
        """Seconds until every launcher and rank has exited, or None if still running after `bound`."""
        started = time.monotonic()
        pids = set(self.rank_pids().values())
        while time.monotonic() - started < bound:
            launchers_done = all(p.poll() is not None for p in self.launchers)
            ranks_done = not any(_alive(pid) for pid in pids)
            if launchers_done and ranks_done:
                return time.monotonic() - started
            pids |= set(self.rank_pids().values())
            time.sleep(0.1)
        return None

    def kill_all(self) -> None:
        for pid in self.rank_pids().values():
            _signal(pid, signal.SIGKILL)
        for launcher in self.launchers:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()

    def error_lines(self) -> list[str]:
        """The lines starting with 'error:' in the ranks' stderr files (after composer's '[rank N] ' prefix)."""
        lines = []
        for path in sorted(self.rank_logs.glob("rank*.err")):
            for line in path.read_text(errors="replace").splitlines():
                line = re.sub(r"^\[rank \d+\] ", "", line)
                if line.startswith("error:"):
                    lines.append(line)
        return lines

    def launcher_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    children = [int(c) for c in out]
    return children + [g for c in children for g in _descendants(c)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def launch(work: Path, name: str, args: list[str], *, nproc: int = 4, nodes: int = 1, env: dict | None = None,
           recipe: str = "phase1") -> Job:
    """`composer -n nproc` (nodes=1) or `nodes` launcher groups of nproc/nodes ranks on 127.0.0.1, with distinct
    node ranks and one master, the way launch/multinode.sh starts each node."""
    logs_dir = work / f"{name}-logs-{int(time.time() * 1000)}"
    logs_dir.mkdir(parents=True)
    environment = base_env(work, **(env or {}))
    port = str(free_port())
    per_node = nproc // nodes
    launchers, logs = [], []
    for node in range(nodes):
        command = [str(BIN / "composer"), "-n", str(per_node)]
        if nodes > 1:
            command += ["--world_size", str(nproc), "--node_rank", str(node), "--base_rank", str(node * per_node),
                        "--master_addr", "127.0.0.1"]
        command += ["--master_port", port, "--stdout", str(logs_dir / "rank{rank}.out"),
                    "--stderr", str(logs_dir / "rank{rank}.err"),
                    "-m", "modernbert_train.train", str(REPO / f"yamls/tiny/{recipe}.yaml"), *args]
        log = logs_dir / f"launcher-node{node}.log"
        launchers.append(subprocess.Popen(command, cwd=REPO, env=environment, stdout=log.open("w"),
                                          stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)
    return Job(launchers, logs, logs_dir)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> train/loss, the last record of each step (a relaunch rewrites the steps after its checkpoint)."""
    out = {}
    for record in metrics(run_dir):
        if "train/loss" in record:
            out[int(record["step"])] = record["train/loss"]
    return out


def wait_for_step(job: Job, run_dir: Path, step: int, bound: float = 600) -> None:
    deadline = time.monotonic() + bound
    while not any(r.get("step", 0) >= step for r in metrics(run_dir)):
        if not job.alive():
            raise AssertionError(f"the job ended before step {step}:\n{job.launcher_text()[-3000:]}")
        if time.monotonic() > deadline:
            job.kill_all()
            raise AssertionError(f"the job never reached step {step}")
        time.sleep(0.05)




@dataclass
class FaultResult:
    fault: str
    what_the_run_does: str
    seconds_to_exit: float | None
    launcher_line: str  # the launcher's line naming the rank that failed first
    error_line: str     # the first 'error:' line of the ranks
    relaunch: str
    steps_compared: int

    def record(self) -> None:
        out = os.environ.get("SCALE_RESULTS")
        if out:
            with open(out, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(self)) + "\n")


def relaunch_and_compare(work: Path, name: str, args: list[str], run_dir: Path, reference: dict[int, float],
                         steps: int, *, nodes: int = 1, env: dict | None = None, bound: float = 900) -> tuple[str, int]:
    """Relaunch the same command; ('bit-identical' | what differed, steps compared)."""
    job = launch(work, name, args, nodes=nodes, env=env)
    seconds = job.wait_ended(bound)
    if seconds is None:
        job.kill_all()
        return "relaunch hung", 0
    codes = [p.returncode for p in job.launchers]
    if any(codes):
        return f"relaunch failed (exit {codes}): {(job.error_lines() or [job.launcher_text()[-300:]])[-1]}", 0
    got = losses(run_dir)
    if sorted(got) != list(range(1, steps + 1)):
        return f"relaunch ran steps {sorted(got)}", 0
    differing = [s for s in got if got[s] != reference[s]]
    return ("bit-identical" if not differing else f"losses differ at steps {differing}"), len(got)

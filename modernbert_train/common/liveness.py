"""Which rank failed, said by the ranks that are left.

When a rank or a node dies mid-step, every other rank learns it from its next collective as "Connection closed
by peer [10.0.0.7]:port" or a timeout: nothing says which rank. Only the launcher of the dead rank's own node
knows, and a whole node that dies takes its launcher with it. So each rank leaves a small file in the run folder
(shared by all nodes, as the README requires): its host and pid, its mtime refreshed every HEARTBEAT_S by a
daemon thread. A rank whose collective failed reads them: a rank on its own host is checked in /proc (exited,
or stopped); a rank elsewhere whose file went stale has stopped reporting (its node is gone or stalled).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

FOLDER = ".ranks"
HEARTBEAT_S = 5.0


class RankLiveness:
    """This rank's file in `run_dir/.ranks/`, kept fresh until `stop()`."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(run_dir) / FOLDER / f"rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"rank": rank, "world_size": world_size, "host": socket.gethostname(), "pid": os.getpid(),
                  "node_rank": int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0),
                  "started": time.time()}
        self.record = record
        partial = self.path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(record))
        os.replace(partial, self.path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name="rank-liveness")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full or unreachable folder: the training has its own error for that

    def stop(self) -> None:
        """A rank that ends normally takes its file away (one that dies leaves it, for the others to read)."""
        self._stop.set()
        try:
            self.path.unlink()
        except OSError:
            pass


def _process_state(pid: int) -> str | None:
    """'exited', 'stopped' or None (running) for a pid of this host."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "exited"
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X", "x"):
        return "exited"
    if state in ("T", "t"):
        return "stopped"
    return None


# Ranks of one job start within this many seconds of each other; older files are an earlier job's.
SAME_JOB_S = 300.0


def failed_ranks(run_dir: Path, mine: dict, heartbeat_s: float = HEARTBEAT_S, now: float | None = None,
                 settle_s: float = 3.0) -> list[str]:
    """What can be told of the other ranks of this job (`mine`: this rank's record): 'rank 2 (pid 77 on this
    host) has exited', 'rank 1 (...) is stopped', 'rank 5 (host b, node 1) stopped reporting 31 s ago'. Empty
    when every rank looks alive. A peer's socket closes while its process is still being torn down (it shows
    as running for a moment): with nothing to tell yet, look again for up to `settle_s`."""
    deadline = time.monotonic() + settle_s
    while True:
        told = _look(run_dir, mine, heartbeat_s, now)
        if told or time.monotonic() >= deadline:
            return told
        time.sleep(0.1)


def _look(run_dir: Path, mine: dict, heartbeat_s: float, now: float | None) -> list[str]:
    folder = Path(run_dir) / FOLDER
    my_rank = mine["rank"]
    host, now = socket.gethostname(), time.time() if now is None else now
    told = []
    for path in sorted(folder.glob("rank*.json"), key=lambda p: int(p.stem[4:]) if p.stem[4:].isdigit() else -1):
        try:
            record = json.loads(path.read_text())
            age = now - path.stat().st_mtime
        except (OSError, ValueError):
            continue
        if (record.get("rank") == my_rank or not 0 <= int(record.get("rank", -1)) < mine["world_size"]
                or abs(float(record.get("started", 0)) - mine["started"]) > SAME_JOB_S):
            continue
        who = f"rank {record.get('rank')}"
        if record.get("host") == host:
            state = _process_state(int(record.get("pid", -1)))
            if state is not None:
                told.append(f"{who} (pid {record.get('pid')} on this host) {'has exited' if state == 'exited' else 'is stopped'}")
        elif age > 3 * heartbeat_s:
            told.append(f"{who} (host {record.get('host')}, node {record.get('node_rank')}) stopped reporting "
                        f"{age:.0f} s ago")
    return told


def is_collective_failure(err: BaseException) -> bool:
    """A failure of a collective with the other ranks (a peer gone, a timeout), as gloo / NCCL report it."""
    import torch.distributed as torch_dist

    dist_error = getattr(torch_dist, "DistError", None)
    seen, current = set(), err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if dist_error is not None and isinstance(current, dist_error):
            return True
        text = str(current)
        if isinstance(current, RuntimeError) and any(marker in text for marker in (
                "Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "Timed out", "timed out")):
            return True
        current = current.__cause__ or current.__context__
    return False


__all__ = ["RankLiveness", "failed_ranks", "is_collective_failure", "FOLDER", "HEARTBEAT_S"]

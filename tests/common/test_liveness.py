"""The ranks left after a failure name the rank that failed (common/liveness.py)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from modernbert_train.common.liveness import FOLDER, RankLiveness, failed_ranks, is_collective_failure


def _record(folder, rank, **values):
    (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": 4, "node_rank": 0, **values}))


def test_exited_stopped_and_silent_ranks_are_named_and_an_earlier_jobs_files_are_not(tmp_path):
    me = RankLiveness(tmp_path, 0, 4, heartbeat_s=0.05)
    folder = tmp_path / FOLDER
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stopped.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        host, started = socket.gethostname(), me.record["started"]
        _record(folder, 1, host=host, pid=exited.pid, started=started)
        _record(folder, 2, host=host, pid=stopped.pid, started=started)
        _record(folder, 3, host="node-b", pid=1, started=started)
        os.utime(folder / "rank3.json", (time.time() - 40, time.time() - 40))
        _record(folder, 7, host=host, pid=exited.pid, started=started)  # a rank of a larger earlier world
        told = failed_ranks(tmp_path, me.record, heartbeat_s=5.0)
        assert told == [f"rank 1 (pid {exited.pid} on this host) has exited",
                        f"rank 2 (pid {stopped.pid} on this host) is stopped",
                        "rank 3 (host node-b, node 0) stopped reporting 40 s ago"], told
        # An earlier job's files (started long before this one) say nothing about this job.
        for rank in (1, 2, 3):
            _record(folder, rank, host=host, pid=exited.pid, started=started - 3600)
        assert failed_ranks(tmp_path, me.record, settle_s=0) == []
        # This rank's own file stays fresh while it runs and goes when it ends normally.
        before = (folder / "rank0.json").stat().st_mtime
        time.sleep(0.3)
        assert (folder / "rank0.json").stat().st_mtime > before
    finally:
        stopped.send_signal(signal.SIGCONT)
        stopped.kill()
        stopped.wait()
        me.stop()
    assert not (folder / "rank0.json").exists()


def test_collective_failures_are_told_from_other_errors():
    assert is_collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5"))
    try:
        try:
            raise RuntimeError("NCCL communicator was aborted on rank 0")
        except RuntimeError as inner:
            raise ValueError("step failed") from inner
    except ValueError as outer:
        assert is_collective_failure(outer)
    assert not is_collective_failure(RuntimeError("shape mismatch"))
    assert not is_collective_failure(OSError("No space left on device"))


def test_a_forked_childs_sigterm_does_not_end_the_parent(tmp_path):
    """The SIGTERM watcher (common/termination.py) wakes on the interpreter's wakeup fd; a forked child that is
    sent SIGTERM (a DataLoader worker being stopped) must not end its parent."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "os.environ['MODERNBERT_SIGTERM_GRACE'] = '0.2'\n"
        "from modernbert_train.common.termination import exit_promptly_on_sigterm\n"
        "exit_promptly_on_sigterm()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(30)\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
        "os.kill(pid, signal.SIGTERM)\n"
        "os.waitpid(pid, 0)\n"
        "time.sleep(1.5)\n"
        "print('parent alive')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert done.returncode == 0 and "parent alive" in done.stdout, (done.returncode, done.stderr[-2000:])

"""A real single-host SLURM for tests: munged, slurmctld and two slurmd "nodes" on 127.0.0.1 in one folder.

Debian's slurm-wlm (22.05) and munge, without systemd: munged runs as the munge user on a socket in the folder,
slurm.conf uses proctrack/linuxproc and task/none with no accounting, and two NodeNames share 127.0.0.1 with
their own Port= (each daemon started as `slurmd -N NAME`; SlurmdParameters=config_overrides lets them claim
CPUs this machine does not have). Everything lives in the folder given to `SlurmCluster`, and `stop()` ends
every daemon it started (by the pid each wrote), so a test leaves nothing running.

    python -m tests.scale.slurm_cluster /tmp/cluster   # starts one by hand, prints SLURM_CONF=..., Ctrl-C stops
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NODES = ("n0", "n1")
CPUS_PER_NODE = 4  # claimed, not real: 2 cores run everything; a 2-rank node needs 2 CPUs
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "srun", "runuser")
# How long SLURM gives a killed step between SIGTERM and SIGKILL: short, so a requeue is quick to measure.
KILL_WAIT_S = 10


def missing_reason() -> str | None:
    """Why this machine cannot run the cluster (None when it can): the tests skip with this reason."""
    absent = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if absent:
        return (f"slurm-wlm and munge are not installed ({', '.join(absent)} missing): run "
                f"tests/scale/install_slurm.sh (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs (run `make test-scale` as root, e.g. in CI's container)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "the munge user does not exist (reinstall the munge package)"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """Start with `start()`, stop with `stop()` (or use it as a context manager)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.munge_dir: Path | None = None  # made by start()
        self.logs = self.root / "log"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if key != "SLURM_CONF":
                del self.env[key]  # a test run inside a SLURM job must not leak that job's settings
        self._pid_files: list[Path] = []

    # --- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self._start_munge()
        self._write_conf()
        self._run([_binary("slurmctld"), "-f", str(self.conf)], "slurmctld")
        self._pid_files.append(self.root / "slurmctld.pid")
        for node in NODES:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
            self._run([_binary("slurmd"), "-f", str(self.conf), "-N", node], f"slurmd {node}")
            self._pid_files.append(self.root / f"slurmd-{node}.pid")
        self._wait_for_idle_nodes()
        return self

    def stop(self) -> None:
        """SIGTERM every daemon this cluster started (then SIGKILL what is left) and the jobs' processes with them."""
        if self.conf.exists() and self._pid_files:
            # Jobs first: SLURM signals their processes (the trainers), which stopping slurmd alone would not.
            self.run(_binary("scancel"), "--full", "--quiet", "--user", "root", check=False)
        pids = [pid for path in reversed(self._pid_files) if (pid := self._read_pid(path))]
        for pid in pids:
            self._signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while any(self._alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            self._signal(pid, signal.SIGKILL)
        self._pid_files.clear()
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)  # its own mkdtemp folder: key, socket, log

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what the tests call ---------------------------------------------------------------------------------
    def run(self, *command: str, check: bool = True, env: dict | None = None, cwd: Path | None = None):
        done = subprocess.run(list(command), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                              text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> int:
        out = self.run(_binary("sbatch"), "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...); {} once SLURM forgot it."""
        done = self.run(_binary("scontrol"), "show", "job", "-o", str(job_id), check=False)
        if done.returncode != 0:
            return {}
        fields = {}
        for word in done.stdout.split():
            key, sep, value = word.partition("=")
            if sep:
                fields[key] = value
        return fields

    def state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "GONE")

    def wait_state(self, job_id: int, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(job_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {state} after {timeout:.0f} s, not one of {sorted(states)}")
            time.sleep(0.2)

    def requeue(self, job_id: int) -> None:
        self.run(_binary("scontrol"), "requeue", str(job_id))

    def release(self, job_id: int) -> None:
        """Lift the ~120 s hold (BeginTime) SLURM puts on a requeued job."""
        self.run(_binary("scontrol"), "update", f"jobid={job_id}", "StartTime=now")

    # --- internals -------------------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        # munged runs as the munge user and checks every folder above its socket and log, and a socket path
        # must fit 108 bytes: its folder is a short one of its own in /tmp (pytest's are 0700 and long).
        self.munge_dir = Path(tempfile.mkdtemp(prefix="munge-", dir="/tmp"))
        self.socket = self.munge_dir / "munge.socket"
        self.munge_dir.chmod(0o755)  # the socket's folder must be searchable by every user
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self._run(["runuser", "-u", "munge", "--", _binary("munged"), f"--socket={self.socket}",
                   f"--key-file={key}", f"--pid-file={self.munge_dir / 'munged.pid'}",
                   f"--log-file={self.munge_dir / 'munged.log'}", f"--seed-file={self.munge_dir / 'munged.seed'}"],
                  "munged")
        self._pid_files.append(self.munge_dir / "munged.pid")

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        root = self.root
        lines = [
            "ClusterName=rehearsal", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "AuthType=auth/munge", f"AuthInfo=socket={self.socket}", "CredType=cred/munge",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}", f"SlurmdLogFile={self.logs / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none", "SlurmdParameters=config_overrides", "MpiDefault=none",
            "ReturnToService=2", "JobRequeue=1", f"KillWait={KILL_WAIT_S}", "InactiveLimit=0", "MinJobAge=600",
            "SlurmctldTimeout=30", "SlurmdTimeout=60",
        ]
        for node, port in zip(NODES, node_ports):
            lines.append(f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={CPUS_PER_NODE} RealMemory=4000 State=UNKNOWN")
        lines.append(f"PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        (root / "state").mkdir(exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")

    def _run(self, command: list[str], what: str) -> None:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"could not start {what}: {done.stderr.strip() or done.stdout.strip()} "
                               f"(logs in {self.logs} and {self.munge_dir})")

    def _wait_for_idle_nodes(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = self.run(_binary("sinfo"), "-h", "-N", "-o", "%N %T", check=False)
            states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
            if done.returncode == 0 and all(states.get(node) == "idle" for node in NODES):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {states or done.stderr.strip()} "
                                   f"(logs in {self.logs})")
            time.sleep(0.3)

    @staticmethod
    def _read_pid(path: Path) -> int | None:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _alive(pid: int) -> bool:
        """Alive and not a zombie (a daemon we started and did not reap yet)."""
        from modernbert_train.run.folder import _pid_alive

        try:
            return _pid_alive(pid) and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Start a two-node SLURM on 127.0.0.1 until Ctrl-C.",
                                     epilog="example:  python -m tests.scale.slurm_cluster /tmp/cluster")
    parser.add_argument("folder", type=Path, help="where the configuration, state and logs go")
    args = parser.parse_args()
    reason = missing_reason()
    if reason:
        raise SystemExit(reason)
    with SlurmCluster(args.folder.resolve()) as cluster:
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

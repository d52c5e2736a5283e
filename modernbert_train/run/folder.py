"""The files of a run folder besides checkpoints and metrics: who may write it, and what it was trained as.

    run.lock            held by the process that trains into the folder (rank 0): host, pid, start time
    config.yaml         the recipe as trained, with ${oc.env:...} interpolations left unresolved (no secrets)
    model_config.json   the architecture; `export` rebuilds the model from it, so a resume may not change it
    tokenizer.json      the data's tokenizer, shipped with every export

One writer per folder: a requeued job and a manual resubmission of the same run would otherwise write the same
checkpoints, prune each other's and interleave metrics. A lock left by a process that is gone is taken over:
a dead pid on this host, an earlier incarnation of the same SLURM job (requeue), or a lock whose holder stopped
refreshing it (another host, after STALE_AFTER_S).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from modernbert_train.common.errors import UserError

log = logging.getLogger("modernbert_train")

CONFIG_FILE = "config.yaml"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.json"
LOCK_FILE = "run.lock"
# The holder touches its lock this often; a lock from another host untouched for STALE_AFTER_S is abandoned.
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
# Model config fields that only affect training or the kernel choice, not what the weights mean: a resume may
# change them. Any other change would make model_config.json describe earlier checkpoints wrongly.
RESUMABLE_MODEL_FIELDS = frozenset({"attn_backend", "attention_dropout", "attention_output_dropout",
                                    "embedding_dropout", "mlp_dropout", "initializer_range",
                                    "initializer_cutoff_factor", "head_init"})


# -- what the run is ------------------------------------------------------------------------------------------
def is_run_dir(folder: Path) -> bool:
    """True for a folder the trainer wrote (its config.yaml and model_config.json are there)."""
    return (folder / CONFIG_FILE).is_file() and (folder / MODEL_CONFIG_FILE).is_file()


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_config(run_dir: Path, recipe_yaml: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(run_dir / CONFIG_FILE, recipe_yaml)


def read_model_config_values(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MODEL_CONFIG_FILE
    if not path.exists():
        raise UserError(f"{run_dir} has no {MODEL_CONFIG_FILE}: export a checkpoint inside the run directory "
                        f"the trainer wrote, or pass --model-config")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object of model config fields")
    return values


def check_resume_keeps_architecture(run_dir: Path, config_values: dict[str, Any],
                                    where: Callable[[str], str] = lambda key: "") -> None:
    """Refuse a resume whose model config differs from the run's model_config.json in an architecture field.

    where(field) -> 'recipe.yaml:12: '-style prefix naming where the new value was set."""
    if not (run_dir / MODEL_CONFIG_FILE).exists():
        return
    old = read_model_config_values(run_dir)
    changed = [k for k in sorted(set(old) | set(config_values))
               if k not in RESUMABLE_MODEL_FIELDS and old.get(k) != config_values.get(k)]
    if changed:
        key = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(changed[1:4])})" if len(changed) > 1 else ""
        raise UserError(f"{where(key)}resuming {run_dir} would change the architecture: {key} is {old.get(key)!r} in "
                        f"{run_dir / MODEL_CONFIG_FILE} but {config_values.get(key)!r} now{more}; its checkpoints "
                        f"were trained as the former. Keep the model settings, or start a new run (another "
                        f"save_folder, model.init_from={run_dir})")


def write_run_artifacts(run_dir: Path, config, tokenizer_file: str | Path | None) -> None:
    """model_config.json + tokenizer.json: what `modernbert-train export` rebuilds the model from."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(run_dir / MODEL_CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
    if tokenizer_file is not None:
        partial = run_dir / f".{TOKENIZER_FILE}.{os.getpid()}.partial"
        shutil.copyfile(tokenizer_file, partial)
        os.replace(partial, run_dir / TOKENIZER_FILE)


# -- who writes it ----------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live holder from a new process that reused its pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    started: str
    slurm_job_id: str | None = None
    process_start: str | None = None

    @staticmethod
    def this_process() -> "LockHolder":
        return LockHolder(host=socket.gethostname(), pid=os.getpid(),
                          started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                          slurm_job_id=os.environ.get("SLURM_JOB_ID") or None,
                          process_start=_process_start(os.getpid()))

    def is_this_process(self) -> bool:
        return self.host == socket.gethostname() and self.pid == os.getpid()

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"pid {self.pid} on {self.host}{job}, since {self.started}"


def _read_holder(path: Path) -> LockHolder | None:
    try:
        values = json.loads(path.read_text())
        return LockHolder(**{k: values.get(k) for k in ("host", "pid", "started", "slurm_job_id", "process_start")})
    except (OSError, ValueError, TypeError):
        return None


def _abandoned_because(holder: LockHolder | None, age_s: float) -> str | None:
    """Why a lock's holder is provably gone, or None when it may still be writing."""
    if holder is None:
        return "an unreadable lock" if age_s > HEARTBEAT_S else None
    if holder.host == socket.gethostname():
        if not _pid_alive(int(holder.pid)):
            return f"its process ({holder.describe()}) has ended"
        if holder.process_start and _process_start(int(holder.pid)) not in (None, holder.process_start):
            return f"its process ({holder.describe()}) has ended (the pid was reused)"
        return None
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.slurm_job_id == job:
        return f"SLURM requeued job {job}, which ends the earlier incarnation ({holder.describe()})"
    if age_s > STALE_AFTER_S:
        return f"its holder ({holder.describe()}) has not refreshed it for {age_s / 60:.0f} min"
    return None


class RunLock:
    """An exclusive claim on a run folder by this process, refreshed by a heartbeat thread until released."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.holder = LockHolder.this_process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return self
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                continue  # released while we looked: try again
            holder = _read_holder(self.path)
            if holder is not None and holder.is_this_process():
                self._start_heartbeat()  # this process already holds it (a second build in one process)
                return self
            reason = _abandoned_because(holder, time.time() - stat.st_mtime)
            if reason is None:
                who = holder.describe() if holder else "a process whose lock file is still being written"
                raise UserError(f"run folder {self.path.parent} is in use by {who} (lock {self.path}); wait for "
                                f"that run to end (a lock nobody refreshes for {STALE_AFTER_S / 60:.0f} min is "
                                f"taken over), or delete the lock file if you are sure it is gone")
            self._take_over(stat.st_ino, reason)
        raise UserError(f"could not take the lock {self.path}: other processes keep claiming it")

    def _create(self) -> bool:
        """Create the lock with its content in one step (hard link of a finished file): readers never see half."""
        partial = self.path.with_name(f".{LOCK_FILE}.{self.holder.host}.{self.holder.pid}")
        partial.write_text(json.dumps(asdict(self.holder)) + "\n")
        try:
            os.link(partial, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            partial.unlink(missing_ok=True)

    def _take_over(self, stale_inode: int, reason: str) -> None:
        """Move the abandoned lock aside, only if it is still the one judged abandoned (not a newer one)."""
        aside = self.path.with_name(f".{LOCK_FILE}.abandoned.{self.holder.host}.{self.holder.pid}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.stat().st_ino != stale_inode:  # someone else took it over first: give theirs back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        log.warning("took over the lock of %s: %s", self.path.parent, reason)

    def _start_heartbeat(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                log.error("the lock %s disappeared while this run holds it", self.path)
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None
        holder = _read_holder(self.path)
        if holder is not None and holder.is_this_process():
            self.path.unlink(missing_ok=True)


_held: dict[Path, RunLock] = {}


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take (or keep) this process's lock on `run_dir`; UserError naming the holder when another has it."""
    key = Path(run_dir).resolve()
    lock = _held.get(key) or RunLock(key)
    lock.acquire()
    _held[key] = lock
    return lock


def release_run_dir(run_dir: Path) -> None:
    lock = _held.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.release()

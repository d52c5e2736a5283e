"""A rank that is sent SIGTERM (a SLURM requeue or time limit, the launcher stopping its ranks) ends within a
bounded time, saying so in one line.

composer installs a SIGTERM handler that raises SystemExit in the main thread. A Python handler only runs when
the main thread runs Python code, and a rank whose peers are gone sits in a collective (C++) until the collective
timeout; then its exit path (closing the trainer, composer's atexit hooks) can wait on the dead peers again. Such
ranks outlived SIGTERM until the scheduler's SIGKILL (SLURM's KillWait), and their own clean-up never ran.

Here the interpreter's wakeup fd (written by the C-level signal handler even while the main thread is blocked)
wakes a watcher thread at once. The main thread still gets its orderly SystemExit when it can; if the process
is still alive `grace` seconds later, the watcher runs the given clean-up (best effort) and exits the process.
Checkpoints need nothing from either path: an interrupted save is set aside at the next start.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

SIGTERM_GRACE_ENV = "MODERNBERT_SIGTERM_GRACE"
DEFAULT_GRACE_S = 10.0  # under SLURM's KillWait (30 s by default) and composer's launcher grace (30 s)
_installed = False
_announced = threading.Event()


def _rank_label() -> str:
    return f"rank {os.environ.get('RANK', '0')}"


def _announce() -> None:
    if not _announced.is_set():
        _announced.set()
        print(f"{_rank_label()}: SIGTERM received (the scheduler or launcher is ending the job): stopping; "
              f"completed checkpoints are kept, re-run the same command to resume", file=sys.stderr, flush=True)


def _on_sigterm(signum, frame) -> None:
    _announce()
    raise SystemExit(128 + signum)


def _watch(read_fd: int, grace_s: float, cleanup: Callable[[], None] | None) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGTERM in data:
            break
    _announce()
    time.sleep(grace_s)
    print(f"{_rank_label()}: still running {grace_s:g} s after SIGTERM (blocked in a collective or I/O): "
          f"exiting now", file=sys.stderr, flush=True)
    if cleanup is not None:
        try:
            cleanup()
        except Exception:  # noqa: BLE001 - the exit must happen
            pass
    os._exit(128 + signal.SIGTERM)


def grace_seconds() -> float:
    value = os.environ.get(SIGTERM_GRACE_ENV)
    try:
        return float(value) if value not in (None, "") else DEFAULT_GRACE_S
    except ValueError:
        return DEFAULT_GRACE_S


def exit_promptly_on_sigterm(cleanup: Callable[[], None] | None = None) -> bool:
    """Install the SIGTERM handling above (main thread only; once per process). Returns whether it is active."""
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def forget_in_child() -> None:
        # A forked child (a DataLoader worker, streaming's helpers) shares the pipe: a SIGTERM sent to the child
        # would otherwise wake this process's watcher and end it.
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        for fd in (read_fd, write_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    os.register_at_fork(after_in_child=forget_in_child)
    signal.signal(signal.SIGTERM, _on_sigterm)
    threading.Thread(target=_watch, args=(read_fd, grace_seconds(), cleanup), daemon=True,
                     name="sigterm-watch").start()
    _installed = True
    return True


__all__ = ["exit_promptly_on_sigterm", "SIGTERM_GRACE_ENV", "DEFAULT_GRACE_S"]

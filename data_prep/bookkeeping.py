"""Safe bookkeeping of a prepare output folder: files replaced atomically, one writer at a time."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from modernbert_train.errors import UserError

LOCK_FILE = ".prepare.lock"


def write_json_atomic(path: Path, obj, indent: int | None = None) -> None:
    """Write to a temporary name, flush to disk, rename: a crash leaves the old file or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(obj, indent=indent))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class OutputLock:
    """An exclusive flock on --out/.prepare.lock: one prepare per output folder at a time.

    The kernel drops the lock when the holder exits, however it ends, so a crashed prepare never leaves a
    stale lock. The file stays (unlinking a lock file races with the next taker); it names the last holder.
    """

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.fh = None

    def __enter__(self) -> "OutputLock":
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "holder unknown"
            fh.close()
            raise UserError(f"--out {self.path.parent} is being written by another prepare ({holder}); wait for it "
                            f"to finish or stop it (lock file {self.path}; nothing was changed)") from None
        except OSError as err:  # e.g. a Lustre mount without flock support: run, but say so
            print(f"warning: cannot lock {self.path} ({err.strerror or err}); make sure no other prepare writes "
                  f"{self.path.parent} at the same time", file=sys.stderr)
            fh.close()
            return self
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on host {socket.gethostname()}, user {os.environ.get('USER', '?')}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()

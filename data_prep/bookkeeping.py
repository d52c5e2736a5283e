"""Safe bookkeeping of a prepare output folder: its layout (see prepare.py), files replaced atomically, one
writer at a time, and what an existing folder holds that a new run may keep."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from modernbert_train.data.shards import confined_path, read_json_file
from modernbert_train.common.errors import UserError

if TYPE_CHECKING:
    from data_prep.sources import WorkUnit

LOCK_FILE = ".prepare.lock"
PLAN_FILE, INDEX_FILE, META_FILE, SUMMARY_FILE = "plan.json", "index.json", "prep_meta.json", "prep_summary.json"
UNIT_SUMMARY_FILE = "unit_summary.json"
PART_PREFIX, TMP_PREFIX = "part-", ".tmp-part-"


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


# ------------------------------------------------------------------------------------- output folder state

def is_own_entry(name: str) -> bool:
    bookkeeping = (PLAN_FILE, INDEX_FILE, META_FILE, SUMMARY_FILE)
    return (name in bookkeeping or name == LOCK_FILE or name.removesuffix(".tmp") in bookkeeping
            or name.startswith(PART_PREFIX) or name.startswith(TMP_PREFIX))


def recognise_output(folder: Path) -> str | None:
    """The deletion guard's test (common/safety.py) for a prepare --out or --staging folder: empty, or only
    prepare's own entries with its plan.json; None when it is, else why not."""
    names = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)
    foreign = [n for n in names if not is_own_entry(n)]
    if foreign:
        return f"holds {', '.join(foreign[:3])}, which prepare does not write"
    if names and PLAN_FILE not in names:
        return "has no plan.json from `modernbert-data prepare`"
    return None


def recognise_part(folder: Path) -> str | None:
    """A part folder holds its index.json, unit_summary.json, MDS shards and their temporary files only."""
    foreign = [p.name for p in folder.iterdir()
               if p.name not in (INDEX_FILE, UNIT_SUMMARY_FILE) and not p.name.startswith("shard.")
               and not p.name.endswith(".tmp")]
    return f"holds {', '.join(sorted(foreign)[:3])}, which prepare does not write in a part" if foreign else None


def remove_own_entry(path: Path, label: str) -> None:
    """A part or temporary part of an output this prepare holds: through the guard, as a part folder."""
    from modernbert_train.common.safety import remove_tree

    remove_tree(path, label=label, recognise=recognise_part)


def _normalized(obj):
    return json.loads(json.dumps(obj))


def reconcile_output(out: Path, settings: dict, units: list[WorkUnit], overwrite: bool) -> dict[int, dict]:
    """Decide what an existing --out holds: {unit index: summary} of finished parts to keep.

    Refuses (UserError, nothing changed) on a folder we did not write, or one prepared with other settings
    unless `overwrite`. Parts whose inputs changed since they were written are removed and redone.
    """
    if not out.exists():
        out.mkdir(parents=True)
        return {}
    refuse_foreign_output(out)
    names = [p.name for p in out.iterdir() if p.name != LOCK_FILE]
    if not names:
        return {}
    try:
        old = read_json_file(out / PLAN_FILE, "; pass --overwrite to delete this output and start over")
    except UserError:
        if not overwrite:
            raise
        old = {"settings": {}}  # ours (only our entries), unreadable: --overwrite deletes it all
    changed = [k for k in sorted(set(settings) | set(old.get("settings", {})))
               if _normalized(settings.get(k)) != old.get("settings", {}).get(k)]
    if changed or overwrite:
        if not overwrite:
            key = changed[0]
            raise UserError(
                f"--out {out} was prepared with different settings ({key}: {old['settings'].get(key)!r} now "
                f"{settings.get(key)!r}); pass --overwrite to delete its shards and start over, or choose "
                f"another --out (nothing was changed)")
        from modernbert_train.common.safety import check_safe_to_replace

        # never the current directory, a home directory, / or a folder holding anything prepare did not write
        check_safe_to_replace(out, label="--out", recognise=recognise_output)
        for name in names:
            path = out / name
            remove_own_entry(path, "--out entry") if name.startswith((PART_PREFIX, TMP_PREFIX)) else path.unlink()
        return {}
    kept: dict[int, dict] = {}
    for name in names:
        path = out / name
        if name.startswith(TMP_PREFIX):
            remove_own_entry(path, "--out's temporary part")  # an attempt interrupted mid-write
        elif name.startswith(PART_PREFIX):
            try:
                summary = json.loads((path / UNIT_SUMMARY_FILE).read_text())
            except (OSError, ValueError):
                summary = None  # missing or unreadable: the part cannot be trusted, so it is redone
            index = summary["index"] if summary else -1
            if summary and index < len(units) and summary["identity"] == _normalized(units[index].identity) \
                    and name == f"{PART_PREFIX}{index:05d}":
                kept[index] = summary
            else:
                remove_own_entry(path, "--out part")  # its inputs changed or it no longer exists in the plan
    return kept


def refuse_foreign_output(out: Path) -> None:
    """Refuse (nothing changed) an --out that exists and holds anything `prepare` did not write."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    names = [p.name for p in out.iterdir() if p.name != LOCK_FILE]
    if not names:
        return
    foreign = [n for n in names if not is_own_entry(n)]
    if not (out / PLAN_FILE).is_file() or foreign:
        what = f"holds files prepare did not write ({', '.join(sorted(foreign)[:3])})" if foreign \
            else "has no plan.json from `modernbert-data prepare`"
        raise UserError(f"--out {out} is not empty and {what}; choose a new or empty folder (nothing was changed)")


def merged_index(out: Path, n_units: int) -> dict:
    """The MDS index listing every part's shards (paths relative to out), hashes included."""
    shards = []
    for index in range(n_units):
        part = f"{PART_PREFIX}{index:05d}"
        part_index = read_json_file(out / part / INDEX_FILE)  # synced from a remote on a resume: data
        for shard in part_index["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    confined_path(out / part, shard[key]["basename"], out / part / INDEX_FILE)
                    shard[key]["basename"] = f"{part}/{shard[key]['basename']}"
            shards.append(shard)
    return {"version": 2, "shards": shards}

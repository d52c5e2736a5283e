"""Checkpoint files of a run folder: their names, the `latest` link, completeness, recovery after a kill
mid-save, discovery and pruning. Reading what is inside is `checkpoint.trust`'s job (see DESIGN.md).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

from modernbert_train.common.errors import UserError

log = logging.getLogger("modernbert_train")

# The names composer writes (its save_filename / save_latest_filename): every pattern below derives from these.
CHECKPOINT_NAME = "ep{epoch}-ba{batch}-rank{rank}.pt"
LATEST_NAME = "latest-rank{rank}.pt"
# A full checkpoint is the rank-0 file; an FSDP sharded one is the folder composer names ep<E>-ba<B>.
_CHECKPOINT_STEP = re.compile(r"^ep\d+-ba(\d+)(-rank0\.pt)?$")
# Every file or folder composer writes for a step (any rank): what a kill mid-save can leave half-written.
_CHECKPOINT_ENTRY = re.compile(r"^ep\d+-ba(\d+)(-rank\d+\.pt)?$")
INCOMPLETE_SUFFIX = ".incomplete"


def is_complete_checkpoint(path: Path) -> bool:
    """Whether a checkpoint file or sharded folder was written to the end (cheap: no tensor is read).

    torch.save writes a zip whose central directory comes last, so a file cut short by a kill has none;
    torch.distributed.checkpoint writes a sharded folder's .metadata after every shard."""
    if path.is_dir():
        metadata = path / ".metadata"
        return metadata.is_file() and metadata.stat().st_size > 0
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _checkpoint_entries(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file or folder (not the `latest` link) of a run directory."""
    return [(int(m.group(1)), p) for p in run_dir.iterdir()
            if (m := _CHECKPOINT_ENTRY.match(p.name)) and not p.is_symlink()]


def checkpoints_by_step(run_dir: Path) -> dict[int, list[Path]]:
    """Every checkpoint file (any rank) or sharded folder of a run directory, grouped by step."""
    by_step: dict[int, list[Path]] = {}
    if run_dir.is_dir():
        for step, path in _checkpoint_entries(run_dir):
            by_step.setdefault(step, []).append(path)
    return by_step


def _remove_entry(path: Path) -> None:
    """A checkpoint entry that the name pattern above recognised (never anything else)."""
    assert _CHECKPOINT_ENTRY.match(path.name), path
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints of a run directory (every rank's files), never the `latest` target.

    Composer's own save_num_checkpoints_to_keep only counts what the current process saved, so a run killed and
    relaunched would keep the older process's checkpoints forever."""
    if keep_last < 0:
        return
    by_step = checkpoints_by_step(run_dir)
    keep = set(sorted(by_step)[-keep_last:]) if keep_last else set()
    latest = run_dir / LATEST_NAME.format(rank=0)
    latest_target = latest.resolve() if latest.exists() else None
    for step, paths in by_step.items():
        for path in paths:
            if step not in keep and path.resolve() != latest_target:
                _remove_entry(path)


def set_aside_checkpoints_after(run_dir: Path, step: int, aside: Path) -> None:
    """Move every checkpoint newer than `step` into `aside` (kept for inspection, never read again) and point
    every rank's `latest` link at `step`'s checkpoint: autoresume then restarts from there. Step 0 (no
    checkpoint) removes the links: the next start begins from the initial weights."""
    from modernbert_train.common.safety import check_safe_to_replace, only_these_entries

    # `aside` may already hold an earlier rollback's checkpoints, which a same-named one replaces: only when it
    # is a real folder holding nothing but checkpoints (a synced run folder could bring a link to elsewhere).
    check_safe_to_replace(aside, label="rollback folder", recognise=only_these_entries(
        lambda name: bool(_CHECKPOINT_ENTRY.match(name)), (), "a rollback"))
    for newer, paths in checkpoints_by_step(run_dir).items():
        if newer > step:
            aside.mkdir(exist_ok=True)
            for path in paths:
                target = aside / path.name
                if target.exists():
                    _remove_entry(target)
                path.rename(target)
    for latest in run_dir.glob(LATEST_NAME.format(rank="*")):
        if latest.is_symlink():
            name = re.sub(r"ba\d+", f"ba{step}", os.readlink(latest))
            latest.unlink()
            if step > 0:
                latest.symlink_to(name)


def _newest_complete(run_dir: Path) -> Path | None:
    """The newest rank-0 checkpoint file or sharded folder that was written to the end."""
    candidates = [(step, p) for step, p in _checkpoint_entries(run_dir)
                  if _CHECKPOINT_STEP.match(p.name) and is_complete_checkpoint(p)]
    return max(candidates)[1] if candidates else None


def latest_checkpoint(path: Path) -> Path:
    """The newest complete rank-0 checkpoint of a run directory (or `path` itself when it is a file).

    `latest-rank0.pt` is followed when its target is complete; otherwise the newest complete checkpoint
    (a run killed mid-save leaves a newer, truncated file)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path} is neither a checkpoint file nor a run directory")
    latest = path / LATEST_NAME.format(rank=0)
    if latest.exists() and is_complete_checkpoint(latest.resolve()):
        return latest.resolve()
    newest = _newest_complete(path)
    if newest is None:
        raise UserError(f"run directory {path} holds no complete checkpoint ({LATEST_NAME.format(rank=0)} or "
                        f"ep*-ba*-rank0.pt)")
    return newest


def _move_aside(path: Path) -> Path:
    """Rename a checkpoint so that neither composer nor our discovery sees it; never overwrite anything."""
    target = path.with_name(path.name + INCOMPLETE_SUFFIX)
    count = 1
    while target.exists() or target.is_symlink():
        target = path.with_name(f"{path.name}{INCOMPLETE_SUFFIX}-{count}")
        count += 1
    path.rename(target)
    return target


def recover_interrupted_save(run_dir: Path) -> Path | None:
    """Make a run directory resumable after a kill at any moment (rank 0, before the Trainer is built).

    Composer writes ep*-ba*-rank*.pt in place and then re-creates `latest-rank0.pt`; a kill mid-save leaves a
    truncated newer file (with save_overwrite=False, composer's fit_start refuses any newer checkpoint file)
    or no `latest` link at all. Incomplete checkpoints are renamed to <name>.incomplete with a warning (never
    deleted), and `latest-rank0.pt` is pointed at the newest complete checkpoint, or removed when there is
    none (the run then starts from scratch). Returns that checkpoint, or None.
    """
    if not run_dir.is_dir():
        return None
    for step, path in sorted(_checkpoint_entries(run_dir)):
        if not is_complete_checkpoint(path):
            moved = _move_aside(path)
            log.warning("checkpoint %s was not written to the end (a kill during the save?): renamed to %s",
                        path, moved.name)
    newest = _newest_complete(run_dir)
    latest = run_dir / LATEST_NAME.format(rank=0)
    if newest is None:
        if latest.is_symlink():
            latest.unlink()
        return None
    if not latest.exists() or latest.resolve() != newest.resolve():
        log.warning("%s pointed at %s; pointing it at the newest complete checkpoint %s", latest.name,
                    os.readlink(latest) if latest.is_symlink() else "nothing", newest.name)
        staged = run_dir / f".{latest.name}.tmp"
        staged.unlink(missing_ok=True)
        staged.symlink_to(newest.name)
        os.replace(staged, latest)  # atomic: a kill now leaves the old link or the new one
    return newest


def has_checkpoints(folder: Path) -> bool:
    return folder.is_dir() and any(_CHECKPOINT_STEP.match(p.name) for p in folder.iterdir())


def find_checkpoint(source: Path) -> tuple[Path, Path]:
    """(checkpoint file or sharded folder, run directory) for a checkpoint, sharded folder or run directory."""
    if not source.exists():
        raise UserError(f"{source} does not exist")
    if source.is_dir() and any(source.glob("*.distcp")):
        return source, source.parent
    if source.is_file():
        return source, source.parent
    checkpoint = latest_checkpoint(source)
    return checkpoint, source


def checkpoint_step(composer_state: dict) -> int:
    """Optimizer steps done at the checkpoint (composer stores its Timestamp as a state dict), or -1."""
    timestamp = composer_state.get("state", {}).get("timestamp")
    if isinstance(timestamp, dict):
        timestamp = timestamp.get("Timestamp", timestamp)  # composer nests it under the class name
        return int(timestamp.get("batch", -1))
    return int(timestamp.batch) if hasattr(timestamp, "batch") else -1


def resume_checkpoint(run_dir: Path) -> str | None:
    """On every rank: the newest complete checkpoint of `run_dir` (file or sharded folder), or None to start fresh.
    Passed to composer as `load_path`, with composer's own autoresume off.

    composer 0.32.1's autoresume cannot resume a multi-node run whose nodes share one save_folder: it writes a
    per-node signal file whose name is broadcast from rank 0, so every node deletes "._signal_file_node0_..." and
    the second delete raises FileNotFoundError (llm-foundry#1736). Here rank 0 alone makes the folder resumable
    (`recover_interrupted_save`) and names the checkpoint; its answer, or its error, reaches every rank."""
    from modernbert_train.common.ranks import load_on_one_rank

    def choose() -> str | None:
        newest = recover_interrupted_save(run_dir)
        return str(newest.resolve()) if newest is not None else None

    return load_on_one_rank("choosing the checkpoint to resume from", choose)

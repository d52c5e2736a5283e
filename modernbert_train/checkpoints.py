"""Composer checkpoint files: where a run keeps them, reading them (single file or FSDP sharded folder),
and the model weights and step inside.

Composer checkpoints are pickles. They are read with torch's weights-only unpickler, which runs no code; full
unpickling (needed for sharded folders' .metadata) only for our own run folders or when the user says so.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch

from modernbert_train.errors import UserError

log = logging.getLogger("modernbert_train")

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


def _checkpoint_data_types() -> list:
    """What a composer checkpoint holds besides tensors and plain containers: numpy arrays (RNG states), a
    timedelta (its timestamp), torch's version string. Plain data types: unpickling them runs no code."""
    import datetime

    import numpy as np
    from torch.torch_version import TorchVersion

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [_reconstruct, np.ndarray, np.dtype, *dtype_classes, datetime.timedelta, TorchVersion]


def _is_own_run_folder(folder: Path) -> bool:
    """A run folder our trainer wrote and this user owns: the only place full unpickling is allowed unasked."""
    from modernbert_train.run_dir import is_run_dir

    try:
        return is_run_dir(folder) and folder.stat().st_uid == os.getuid()
    except OSError:
        return False


def _refuse_pickle(checkpoint: Path, what: str, where: str) -> UserError:
    return UserError(f"{where}{checkpoint} {what}, and it is not in a run folder of ours; unpickling it could run "
                     f"any code. Pass --trust-checkpoint (export, convert-checkpoint) or model.trust_checkpoint=true "
                     f"(train) only if you trust where it came from")


def load_composer_state(checkpoint: Path, *, trust: bool = False, where: str = "") -> dict:
    """A composer checkpoint's state dict, unpickling no code unless trusted.

    A .pt file is read with torch's weights-only unpickler (tensors, containers and the plain data types above);
    only when it holds more, and it lies in our own run folder or `trust` is given, is it fully unpickled. A
    sharded folder's .metadata is a pickle that torch cannot read safely: it needs our run folder or `trust`.
    """
    trusted = trust or _is_own_run_folder(checkpoint.parent)
    if checkpoint.is_dir():
        if not trusted:
            raise _refuse_pickle(checkpoint, "is a sharded checkpoint (its .metadata is a pickle)", where)
        with tempfile.TemporaryDirectory() as tmp:
            merged = convert_sharded_checkpoint(checkpoint, Path(tmp) / "merged.pt", trust=True)
            return torch.load(merged, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_checkpoint_data_types()):
            return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trusted:
            try:
                found = torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint)
            except Exception:  # noqa: BLE001 - not a zip checkpoint: say so without the names
                found = []
            found = [name for name in found if name not in _allowed_names()]
            what = f"holds pickled objects ({', '.join(found[:3])})" if found else "holds pickled objects"
            raise _refuse_pickle(checkpoint, what, where) from None
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def _allowed_names() -> set[str]:
    return {f"{t.__module__}.{t.__qualname__}" for t in _checkpoint_data_types()}


def convert_sharded_checkpoint(sharded_dir: str | Path, out_file: str | Path, *, overwrite: bool = False,
                               trust: bool = False) -> Path:
    """An FSDP sharded checkpoint folder (.metadata + .distcp files) as one composer-style .pt file.

    The file holds the same nested state (state.model, state.optimizers, timestamp, callbacks) with full,
    unsharded tensors; `export`, `model.init_from` and torch.load read it like a full-state-dict checkpoint.
    """
    sharded_dir, out_file = Path(sharded_dir), Path(out_file)
    if not sharded_dir.is_dir() or not (sharded_dir / ".metadata").is_file():
        raise UserError(f"{sharded_dir} is not a sharded checkpoint folder (it needs a .metadata file and "
                        f".distcp shards)")
    if out_file.exists() and not overwrite:
        raise UserError(f"{out_file} exists (pass --overwrite to replace it)")
    if not (trust or _is_own_run_folder(sharded_dir.resolve().parent)):
        raise _refuse_pickle(sharded_dir, "is a sharded checkpoint (its .metadata is a pickle)", "")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    dcp_to_torch_save(str(sharded_dir), str(partial))
    partial.replace(out_file)
    return out_file


def checkpoint_step(composer_state: dict) -> int:
    """Optimizer steps done at the checkpoint (composer stores its Timestamp as a state dict), or -1."""
    timestamp = composer_state.get("state", {}).get("timestamp")
    if isinstance(timestamp, dict):
        timestamp = timestamp.get("Timestamp", timestamp)  # composer nests it under the class name
        return int(timestamp.get("batch", -1))
    return int(timestamp.batch) if hasattr(timestamp, "batch") else -1


def load_model_weights_from_checkpoint(model: torch.nn.Module, checkpoint: Path, where: str = "",
                                       trust: bool = False) -> int:
    """Copy the `model.*` weights of a composer checkpoint into `model`; returns the checkpoint's step.

    A sharded FSDP checkpoint (a folder of .distcp files) is merged first; see load_composer_state for what
    is unpickled when."""
    state = load_composer_state(checkpoint, trust=trust)
    try:
        weights = state["state"]["model"]
    except (KeyError, TypeError):
        raise UserError(f"{where}{checkpoint} is not a composer checkpoint (no state.model)") from None
    prefix = "model."
    inner = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    own = model.state_dict()
    missing = sorted(set(own) - set(inner))
    unexpected = sorted(set(inner) - set(own))
    mismatched = [k for k in own if k in inner and tuple(inner[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            k = mismatched[0]
            details.append(f"{k} is {tuple(inner[k].shape)} there but {tuple(own[k].shape)} here")
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                details.append(f"{label} {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else ""))
        raise UserError(f"{where}weights of {checkpoint} do not fit this recipe's model ({'; '.join(details)}); "
                        f"the phase's model.preset / model.config must describe the same architecture")
    model.load_state_dict(inner, strict=True)
    return checkpoint_step(state)

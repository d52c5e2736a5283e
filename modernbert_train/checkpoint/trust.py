"""The one trust policy for reading checkpoint pickles (docs/safety.md "Trusting checkpoints", DESIGN.md).

Composer checkpoints are pickles. They are read with torch's weights-only unpickler, which runs no code; full
unpickling (needed for sharded folders' .metadata) only for our own run folders or when the user says so.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from modernbert_train.common.errors import UserError


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
    from modernbert_train.run.folder import is_run_dir

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

"""The one trust policy for reading checkpoint pickles (docs/safety.md "Trusting checkpoints", DESIGN.md).

Composer checkpoints are pickles. Every checkpoint, our own run folders' included, is read without running
code: a .pt file with torch's weights-only unpickler plus an allow-list of plain data types, a sharded
folder's .metadata with an unpickler that can build only torch.distributed.checkpoint's metadata records.
Where a run folder came from cannot be told from the folder itself (one synced from a bucket looks like ours),
so full unpickling happens only when the user asks for it for this command (`--trust-checkpoint`,
`model.trust_checkpoint: true`): an opt-in a downloaded folder cannot carry with it.
"""
from __future__ import annotations

import io
import pickle
import tempfile
from pathlib import Path

import torch

from modernbert_train.common.errors import UserError


def _checkpoint_data_types() -> list:
    """What a composer checkpoint holds besides tensors and plain containers: numpy arrays (RNG states, the
    loader's positions), a timedelta (its timestamp), torch's version string, bytes (an empty numpy array's
    data is pickled as bytes()). Plain data types: unpickling them runs no code."""
    import datetime

    import numpy as np
    from torch.torch_version import TorchVersion

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [_reconstruct, np.ndarray, np.dtype, *dtype_classes, datetime.timedelta, TorchVersion, bytes]


def _refuse_pickle(checkpoint: Path, what: str, where: str) -> UserError:
    return UserError(f"{where}{checkpoint} {what}; unpickling it could run any code, so it is not read (wherever "
                     f"it lies, our run folders included). Pass --trust-checkpoint (export, average, "
                     f"convert-checkpoint) or model.trust_checkpoint=true (train) only if you trust where it came "
                     f"from")


def _unsafe_names(checkpoint: Path) -> list[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: say so without the names
        return []
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in _checkpoint_data_types()}
    return [name for name in found if name not in allowed]


def check_loads_safely(checkpoint: Path, where: str = "") -> None:
    """Refuse (UserError) a checkpoint that the safe readers below cannot read; reads no tensor data.

    For a path that another reader (composer's autoresume) then unpickles fully: a file that passes holds
    nothing but tensors, containers and the allow-listed data types."""
    if checkpoint.is_dir():
        _read_dcp_metadata(checkpoint, where)
        return
    try:
        with torch.serialization.safe_globals(_checkpoint_data_types()):
            torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        found = _unsafe_names(checkpoint)
        what = f"holds pickled objects ({', '.join(found[:3])})" if found else "holds pickled objects"
        raise _refuse_pickle(checkpoint, what, where) from None


def load_composer_state(checkpoint: Path, *, trust: bool = False, where: str = "") -> dict:
    """A composer checkpoint's state dict (a sharded folder merged), unpickling no code unless `trust`."""
    if checkpoint.is_dir():
        if trust:
            with tempfile.TemporaryDirectory() as tmp:
                merged = convert_sharded_checkpoint(checkpoint, Path(tmp) / "merged.pt", trust=True)
                return torch.load(merged, map_location="cpu", weights_only=False)
        return _load_sharded_safely(checkpoint, where)
    try:
        with torch.serialization.safe_globals(_checkpoint_data_types()):
            return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust:
            found = _unsafe_names(checkpoint)
            what = f"holds pickled objects ({', '.join(found[:3])})" if found else "holds pickled objects"
            raise _refuse_pickle(checkpoint, what, where) from None
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------- sharded folders (DCP)

def _dcp_metadata_types() -> dict[tuple[str, str], object]:
    """(module, name) -> object of everything a torch.distributed.checkpoint .metadata pickle names: records
    (dataclasses), torch.Size, dtypes, the layout helper and paths. Building them runs no code of the file's."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {}
    for name in ("Metadata", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING",
                 "MetadataIndex", "ChunkStorageMetadata", "BytesStorageMetadata"):
        if hasattr(metadata, name):
            allowed[metadata.__name__, name] = getattr(metadata, name)
    allowed[filesystem.__name__, "_StorageInfo"] = filesystem._StorageInfo
    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        allowed["pathlib", name] = getattr(pathlib, name)
    allowed["torch", "Size"] = torch.Size
    allowed["torch.serialization", "_get_layout"] = torch.serialization._get_layout
    allowed["collections", "OrderedDict"] = __import__("collections").OrderedDict
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed["torch", name] = getattr(torch, name)
    return allowed


class _Forbidden(pickle.UnpicklingError):
    """A global outside the allow-list (as opposed to bytes that are not a pickle at all)."""


class _MetadataUnpickler(pickle.Unpickler):
    """pickle's documented way to restrict globals: every class or function a pickle names goes through
    find_class, so a .metadata naming anything else (os.system, builtins.eval, ...) is refused unread."""

    def __init__(self, file, allowed: dict):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[module, name]
        except KeyError:
            raise _Forbidden(f"{module}.{name}") from None


def _read_dcp_metadata(folder: Path, where: str = ""):
    path = folder / ".metadata"
    if not path.is_file():
        raise UserError(f"{where}{folder} is not a sharded checkpoint folder (it needs a .metadata file and "
                        f".distcp shards)")
    try:
        return _MetadataUnpickler(io.BytesIO(path.read_bytes()), _dcp_metadata_types()).load()
    except _Forbidden as err:
        raise _refuse_pickle(folder, f"is a sharded checkpoint whose .metadata names {err}", where) from None
    except Exception as err:  # noqa: BLE001 - truncated or not a pickle at all
        raise UserError(f"{where}{path} is not a readable checkpoint metadata file ({type(err).__name__}: "
                        f"{err})") from None


def _load_sharded_safely(folder: Path, where: str = "") -> dict:
    """The merged state of a sharded folder, as dcp_to_torch_save builds it, without unpickling code: the
    metadata through _MetadataUnpickler; non-tensor entries are torch.load-ed by torch with weights_only."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    metadata = _read_dcp_metadata(folder, where)

    class SafeReader(FileSystemReader):
        def read_metadata(self):
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    state: dict = {}
    try:
        with torch.serialization.safe_globals(_checkpoint_data_types()):
            _load_state_dict(state, storage_reader=SafeReader(str(folder)), planner=_EmptyStateDictLoadPlanner(),
                             no_dist=True)
    except pickle.UnpicklingError as err:
        first = str(err).splitlines()[0] if str(err) else "objects"
        raise _refuse_pickle(folder, f"holds pickled objects ({first[:120]})", where) from None
    return state


def check_resume_is_safe(run_dir: Path, *, checkpoint: str | Path | None = None, trust: bool = False,
                         where: str = "") -> None:
    """Composer's loading of a resume (load_path, or its autoresume's `latest-rank*.pt`) fully unpickles the
    checkpoint (torch.load weights_only=False, pickle.load of a sharded .metadata). Before it does, `checkpoint`
    and every `latest-rank*.pt` target must pass the safe readers, unless the user opted in for this run
    (model.trust_checkpoint)."""
    if trust:
        return
    from modernbert_train.checkpoint.files import LATEST_NAME

    targets = [Path(checkpoint)] if checkpoint is not None else []
    targets += [latest.resolve() for latest in sorted(run_dir.glob(LATEST_NAME.format(rank="*"))) if latest.exists()]
    for target in dict.fromkeys(targets):
        check_loads_safely(target, where)


def convert_sharded_checkpoint(sharded_dir: str | Path, out_file: str | Path, *, overwrite: bool = False,
                               trust: bool = False) -> Path:
    """An FSDP sharded checkpoint folder (.metadata + .distcp files) as one composer-style .pt file.

    The file holds the same nested state (state.model, state.optimizers, timestamp, callbacks) with full,
    unsharded tensors; `export`, `model.init_from` and torch.load read it like a full-state-dict checkpoint.
    Read safely unless `trust` (then torch's own dcp_to_torch_save, which fully unpickles the .metadata).
    """
    sharded_dir, out_file = Path(sharded_dir), Path(out_file)
    if not sharded_dir.is_dir() or not (sharded_dir / ".metadata").is_file():
        raise UserError(f"{sharded_dir} is not a sharded checkpoint folder (it needs a .metadata file and "
                        f".distcp shards)")
    if out_file.exists() and not overwrite:
        raise UserError(f"{out_file} exists (pass --overwrite to replace it)")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    if trust:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(str(sharded_dir), str(partial))
    else:
        torch.save(_load_sharded_safely(sharded_dir), partial)
    partial.replace(out_file)
    return out_file

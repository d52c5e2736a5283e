"""StreamingDataset over the mixture manifest (one `Stream` per source), distributed set-up, shm hygiene.

Raw samples come out of a torch DataLoader (0..N workers) in streaming's deterministic order, each tagged with
its global sample index; packing and masking happen later in the main process (see loader.py). Importing this
module is cheap: streaming, composer and torch.distributed are imported inside the functions that need them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modernbert_train.data.manifest import Manifest
from modernbert_train.errors import UserError

# streaming names its shared memory "<6-digit prefix>_<what>" (streaming.base.shared.prefix._get_path).
_STREAMING_SHM_NAME = re.compile(r"^\d{6}_(locals|barrier|next_epoch|cache_usage|shard_states|"
                                 r"shard_access_times|resume|epoch_shape|epoch_data)$")
SHM_DIR = Path("/dev/shm")
# Sources with a `remote` are cached in their `local` folder; unless the recipe sets data.cache_limit, the
# cache may use this share of the free disk (plus what it already holds), so a 2T-token mixture never fills it.
DEFAULT_CACHE_DISK_FRACTION = 0.5
# streaming's attempts per shard download, spaced 1, 2, 4, 8, 16 s apart (on top of the client's own retries,
# e.g. botocore's AWS_MAX_ATTEMPTS): an object store unreachable for about half a minute is ridden out.
DOWNLOAD_RETRY = 6


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_local_leader(self) -> bool:
        return self.local_rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError as err:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from err


def initialize_distributed() -> DistInfo:
    """Start torch.distributed (composer's `initialize_dist`) when the launcher says WORLD_SIZE > 1.

    Must run before the StreamingDataset is built: otherwise streaming creates and destroys its own process
    group, and a later one of torchrun's breaks ("connection reset"). Works under torchrun and `composer -n`.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size > 1:
        import torch
        import torch.distributed as torch_dist
        from composer.utils import dist as composer_dist

        if not torch_dist.is_initialized():
            device = "gpu" if torch.cuda.is_available() else "cpu"
            composer_dist.initialize_dist(device)
        return DistInfo(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(),
                        local_rank=_env_int("LOCAL_RANK", 0),
                        local_world_size=_env_int("LOCAL_WORLD_SIZE", world_size))
    return DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1)


def cpu_process_group():
    """A gloo group for the loader's small CPU collectives (the default group may be NCCL); None if single."""
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return None
    if torch_dist.get_backend() == "gloo":
        return torch_dist.group.WORLD
    return torch_dist.new_group(backend="gloo")


def _mapped_shm_names() -> set[str] | None:
    """Names of /dev/shm files that any process of ours maps or holds open; None if /proc is unreadable."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    in_use: set[str] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    at = line.find("/dev/shm/")
                    if at != -1:
                        in_use.add(line[at + 9:].split(" (deleted)")[0].strip())
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    in_use.add(target[9:])
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            continue  # the process ended while we looked
        except OSError:
            # Cannot see what this process maps (e.g. a sandbox's init). If it could be a Python process
            # using streaming, assume nothing is stale; otherwise it cannot hold streaming's memory.
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                return None
            if b"python" in cmdline:
                return None
    return in_use


def clean_stale_streaming_shm(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink streaming shared-memory files of ours that no live process maps (left by a crashed run).

    Safer than `streaming.base.util.clean_stale_shared_memory()`, which unlinks every streaming prefix it
    finds up to the first clean one, including those of runs still alive on the same host. Returns the
    names removed. Call on the local leader only, before building datasets.
    """
    if not shm_dir.is_dir():
        return []
    uid = os.getuid()
    candidates = []
    for path in shm_dir.iterdir():
        if _STREAMING_SHM_NAME.match(path.name):
            try:
                if path.stat().st_uid == uid:
                    candidates.append(path)
            except FileNotFoundError:
                continue
    if not candidates:
        return []
    in_use = _mapped_shm_names()
    if in_use is None:
        return []
    removed = []
    for path in candidates:
        if path.name not in in_use:
            try:
                path.unlink()
                removed.append(path.name)
            except (FileNotFoundError, PermissionError):
                continue
    return removed


def prepare_streaming_environment(dist_info: DistInfo, group=None) -> None:
    """Clean stale shared memory on each node's leader, then wait for everyone."""
    if dist_info.is_local_leader:
        clean_stale_streaming_shm()
    if dist_info.world_size > 1:
        import torch.distributed as torch_dist

        torch_dist.barrier(group=group)


def _make_dataset_class():
    from streaming import StreamingDataset

    class IndexedStreamingDataset(StreamingDataset):
        """StreamingDataset whose samples carry their global index (the masking key and resume handle)."""

        def get_item(self, sample_id: int, retry: int = 7) -> Any:
            try:
                sample = super().get_item(sample_id, retry)
            except FileNotFoundError:
                raise
            except Exception as err:
                if isinstance(err, UserError) or not any(s.remote for s in self.streams):
                    raise
                self._raise_download_failure(err)
            return {"input_ids": sample["input_ids"], "sample_id": int(sample_id)}

        def __iter__(self):
            yield from super().__iter__()
            # streaming ends the epoch early, silently, when its download thread failed (e.g. the object
            # store stayed unreachable past the retry budget): that would skip samples, so stop instead.
            if getattr(self, "_event", None) is not None and self._event.is_set():
                self._raise_download_failure(RuntimeError("the background download thread failed"))

        def _raise_download_failure(self, err: BaseException):
            remotes = sorted({s.remote for s in self.streams if s.remote}) or ["the shard folders"]
            first = str(err).splitlines()[0] if str(err) else ""
            raise UserError(f"could not download shards from {', '.join(remotes)} after the retry budget "
                            f"({type(err).__name__}: {first}); the checkpoints are intact: re-run the same "
                            f"command to resume once the store is reachable") from err

    return IndexedStreamingDataset


_DATASET_CLASS = None


def dataset_class():
    global _DATASET_CLASS
    if _DATASET_CLASS is None:
        _DATASET_CLASS = _make_dataset_class()
    return _DATASET_CLASS


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def default_cache_limit(manifest: Manifest) -> int | None:
    """Bound on the local shard cache when any source streams from a remote, else None (nothing to evict).

    DEFAULT_CACHE_DISK_FRACTION of (free space + what the caches hold already) on the fullest filesystem
    among the sources' `local` folders. The recipe's data.cache_limit (bytes or "200gb") replaces it.
    """
    import shutil

    if not any(source.remote for source in manifest.sources):
        return None
    limits = []
    for source in manifest.sources:
        folder = Path(source.local).resolve()
        existing = folder
        while not existing.exists():
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        limits.append(free + _folder_bytes(folder))
    return int(min(limits) * DEFAULT_CACHE_DISK_FRACTION)


def build_streaming_dataset(manifest: Manifest, *, batch_size: int, shuffle: bool, seed: int,
                            shuffle_algo: str = "py1e", num_canonical_nodes: int | None = None,
                            shuffle_block_size: int | None = None, predownload: int | None = None,
                            cache_limit: int | str | None = None, download_timeout: float = 60.0,
                            sampling_method: str = "balanced", replication: int | None = None,
                            download_retry: int = DOWNLOAD_RETRY):
    """One `Stream` per manifest source, weights as the manifest says, deterministic shuffle by `seed`.

    replication=N: N consecutive ranks get the same samples (N = world size: every rank sees the stream a
    single process would). cache_limit None: `default_cache_limit` (bounded whenever a source is remote).
    """
    from streaming import Stream

    if cache_limit is None:
        cache_limit = default_cache_limit(manifest)
    streams = [Stream(remote=source.remote, local=source.local, download_timeout=download_timeout,
                      download_retry=download_retry, **source.stream_weight_kwargs())
               for source in manifest.sources]
    try:
        return dataset_class()(
            streams=streams, batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed, shuffle_algo=shuffle_algo,
            num_canonical_nodes=num_canonical_nodes, shuffle_block_size=shuffle_block_size,
            predownload=predownload, cache_limit=cache_limit, epoch_size=manifest.epoch_size,
            sampling_method=sampling_method, partition_algo="relaxed", batching_method="random",
            replication=replication)
    except ValueError as err:
        if "Reused local directory" in str(err):
            raise UserError(f"manifest {manifest.path}: a shard folder is already in use by another dataset in "
                            f"this job or by another job on this host ({err}); give each loader (train, eval) and "
                            f"each concurrent run its own folders") from err
        if "ache limit" in str(err) or "cache_limit" in str(err):
            raise UserError(f"data.cache_limit {cache_limit}: {err}") from err
        raise UserError(f"manifest {manifest.path}: streaming rejected the sources: {err}") from err
    except RuntimeError as err:
        if "contains no samples" in str(err):
            raise UserError(f"manifest {manifest.path}: {err}") from err
        raise


def stream_of_sample(dataset, sample_ids: np.ndarray) -> np.ndarray:
    """Index of the manifest source (stream) each global sample id belongs to."""
    offsets = np.asarray(dataset.sample_offset_per_stream, dtype=np.int64)
    return np.searchsorted(offsets, np.asarray(sample_ids, dtype=np.int64), side="right") - 1


def collate_raw(samples: list[dict]) -> tuple[np.ndarray, list[np.ndarray]]:
    """DataLoader collate: keep variable-length samples as a list, their ids as one array."""
    ids = np.fromiter((s["sample_id"] for s in samples), dtype=np.int64, count=len(samples))
    return ids, [s["input_ids"] for s in samples]


def build_raw_dataloader(dataset, *, batch_size: int, num_workers: int, prefetch_factor: int | None = None):
    """torch DataLoader yielding (sample_ids, token arrays) in streaming's order; batch_size must match
    the dataset's so streaming's per-worker partition lines up with the loader's round-robin."""
    from torch.utils.data import DataLoader

    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = True
        kwargs["prefetch_factor"] = prefetch_factor or 2
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_raw,
                      drop_last=False, **kwargs)

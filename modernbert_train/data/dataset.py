"""StreamingDataset over the mixture manifest (one `Stream` per source), distributed set-up, shm hygiene.

Raw samples come out of a torch DataLoader (0..N workers) in streaming's deterministic order, each tagged with
its global sample index; packing and masking happen later in the main process (see loader.py). Importing this
module is cheap: streaming, composer and torch.distributed are imported inside the functions that need them.

A prepared (local) source is read as streaming's `remote`, with a cache folder as its `local`: streaming
verifies each compressed shard's hash and decompresses it into the cache, never into the prepared folder
(which may be read-only, and must not hold a corrupt copy that outlives a restored original).
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modernbert_train.data.manifest import Manifest, SourceSpec
from modernbert_train.data.shards import (INDEX_FILE, SHARD_HASH, check_column_safety, check_stream_shard_names,
                                          confined_path, has_shard_hashes, load_index, remove_shard_cache)
from modernbert_train.common.errors import UserError
from modernbert_train.common.ranks import die_with_launcher, dist_timeout_s, new_gloo_group

# streaming names its shared memory "<6-digit prefix>_<what>" (streaming.base.shared.prefix._get_path).
_STREAMING_SHM_NAME = re.compile(r"^\d{6}_(locals|barrier|next_epoch|cache_usage|shard_states|"
                                 r"shard_access_times|resume|epoch_shape|epoch_data)$")
SHM_DIR = Path("/dev/shm")
log = logging.getLogger(__name__)
# Where prepared sources are decompressed for reading; default: <tempdir>/modernbert-shard-cache-<uid>.
SHARD_CACHE_ENV = "MODERNBERT_SHARD_CACHE"
# Sources with a `remote` are cached in their `local` folder; unless the recipe sets data.cache_limit, the
# cache may use this share of the free disk (plus what it already holds), so a 2T-token mixture never fills it.
DEFAULT_CACHE_DISK_FRACTION = 0.5
# streaming's attempts per shard download, spaced 1, 2, 4, 8, 16 s apart (on top of the client's own retries,
# e.g. botocore's AWS_MAX_ATTEMPTS): an object store unreachable for about half a minute is ridden out.
DOWNLOAD_RETRY = 6
# How long a job waits for another one on this host to finish registering its datasets' shared memory.
SHM_LOCK_WAIT_S = 600.0
SHM_LOCK_NAME = "modernbert-streaming-registration.lock"


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
            die_with_launcher()
            composer_dist.initialize_dist(device, timeout=dist_timeout_s())
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
    return new_gloo_group()


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


@contextmanager
def host_shm_lock():
    """Held by a node's leader while it registers or cleans streaming's shared memory on this host.

    streaming's leader finds the first free shm prefix, then creates it: two jobs starting together on one host
    (two single-GPU runs, a train and an eval job) can both pick the same prefix, and the second dies with
    FileExistsError '/000523_locals'. Every job of ours takes this host-wide lock first. It is never held across
    a collective (see data/shm_prefix.py): another node of the same job may need it to reach that collective.
    After SHM_LOCK_WAIT_S it goes on without the lock, with a warning, rather than wait forever.
    """
    fd, path = _open_registration_lock()
    deadline = time.monotonic() + SHM_LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                log.warning("another job on this host held %s for %.0f s; registering streaming's shared "
                            "memory without it", path, SHM_LOCK_WAIT_S)
                os.close(fd)
                fd = None
                break
            time.sleep(0.05)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _open_registration_lock() -> tuple[int, str]:
    """The lock sits next to what it guards, in /dev/shm: one per host for every job and user, whatever each
    launch's TMPDIR (the launch scripts give each launch its own). Read-only is enough for flock."""
    shared = SHM_DIR / SHM_LOCK_NAME
    for path, flags in ((shared, os.O_RDONLY), (shared, os.O_RDONLY | os.O_CREAT)):
        try:
            return os.open(path, flags, 0o644), str(path)
        except FileNotFoundError:
            continue
        except OSError:  # no /dev/shm, or another user's lock file we may not open
            break
    private = os.path.join(tempfile.gettempdir(), f"{SHM_LOCK_NAME}-{os.getuid()}")
    return os.open(private, os.O_RDONLY | os.O_CREAT, 0o644), private


def prepare_streaming_environment(dist_info: DistInfo, group=None) -> None:
    """Clean stale shared memory on each node's leader, then wait for everyone."""
    if dist_info.is_local_leader:
        with host_shm_lock():  # never unlink what another job is about to map
            clean_stale_streaming_shm()
    if dist_info.world_size > 1:
        import torch.distributed as torch_dist

        torch_dist.barrier(group=group)


class _DropRaisedUserErrors(logging.Filter):
    """streaming re-raises a shard failure in a future's done-callback, which concurrent.futures logs with a
    traceback; our UserError for it is raised on the reading thread already, so that copy is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


class BoundsSpanner:
    """Global sample index -> (shard, index in shard), by binary search over the shard bounds.

    streaming's `Spanner` builds it from an int64 array of every sample's shard (8 bytes a sample) and a list of
    one small array per 1,024 samples: at the 2T mixture (~2e9 samples) about 16 GB and minutes on every rank
    before its first batch (bench/RESULTS.md 2026-12-02). This one holds the shard bounds only (O(shards)) and
    answers every index the same (tests/data/test_coverage.py)."""

    def __init__(self, shard_sizes, span_size: int = 1 << 10) -> None:
        self.shard_sizes = shard_sizes
        self.span_size = span_size
        self.shard_bounds = np.concatenate([np.zeros(1, np.int64), np.asarray(shard_sizes, np.int64).cumsum()])
        self.num_samples = int(self.shard_bounds[-1])

    def __getitem__(self, index: int) -> tuple[int, int]:
        if not (0 <= index < self.num_samples):
            raise IndexError(f"Invalid sample index `{index}`: 0 <= {index} < {self.num_samples}")
        # The last bound <= index: past empty shards (equal bounds) to the one that holds the sample.
        shard = int(np.searchsorted(self.shard_bounds, index, side="right")) - 1
        return shard, int(index - self.shard_bounds[shard])


def _make_dataset_class():
    import streaming.base.dataset as streaming_dataset
    from streaming import StreamingDataset
    from streaming.base.dataset import _ShardState

    # streaming.base.dataset builds its Spanner by this module-level name; same answers, O(shards) memory.
    streaming_dataset.Spanner = BoundsSpanner

    _PREPARING, _REMOTE = _ShardState.PREPARING, _ShardState.REMOTE

    logging.getLogger("concurrent.futures").addFilter(_DropRaisedUserErrors())

    class IndexedStreamingDataset(StreamingDataset):
        """StreamingDataset whose samples carry their global index (the masking key and resume handle), and
        whose shard failures name the shard and its source instead of ending an epoch early in silence."""

        source_names: list[str] = []
        token_id_limit: int | None = None  # the tokenizer's vocabulary: a larger id is refused, named
        _shard_failure: str | None = None
        # Epochs that read every sample once per pass (data/coverage.py) instead of a fresh random choice.
        coverage_sampling: bool = False

        def resample_streams(self, epoch: int, stream_id: int | None = None):
            if not self.coverage_sampling or stream_id is not None:
                return super().resample_streams(epoch, stream_id)
            from modernbert_train.data.coverage import coverage_resample

            return coverage_resample(self, epoch, super().resample_streams)

        def _describe_shard(self, shard_id: int) -> str:
            stream_id = int(self.stream_per_shard[shard_id])
            stream = self.streams[stream_id]
            info = self.shards[shard_id].file_pairs[0][1] or self.shards[shard_id].file_pairs[0][0]
            folder = stream.remote or stream.local
            name = self.source_names[stream_id] if stream_id < len(self.source_names) else str(stream_id)
            return f"shard {os.path.join(folder, info.basename)} of source {name!r}"

        def _fail(self, shard_id: int, err: BaseException) -> UserError:
            # streaming's background threads swallow errors and end the epoch early: remember it for __iter__.
            stream = self.streams[int(self.stream_per_shard[shard_id])]
            cached_here = os.path.abspath(stream.local).startswith(os.path.abspath(shard_cache_root()))
            first = str(err).splitlines()[0] if str(err) else ""
            if stream.remote is not None and not cached_here and "Checksum" not in first:
                message = (f"could not download {self._describe_shard(shard_id)} after the retry budget "
                           f"({type(err).__name__}: {first}); the checkpoints are intact: re-run the same command "
                           f"to resume once the store is reachable")
            else:
                message = f"{self._describe_shard(shard_id)} is corrupt or unreadable ({type(err).__name__}: {first})"
            self._shard_failure = message
            if hasattr(self, "_event"):
                self._event.set()
            return UserError(message)

        def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
            if self._shard_failure is not None:
                raise UserError(self._shard_failure)
            if blocking and self._shard_states[shard_id] == _PREPARING:
                # Another thread downloads it: wait, but not for a download that already failed.
                while self._shard_states[shard_id] == _PREPARING and self._shard_failure is None:
                    time.sleep(0.007)
                if self._shard_failure is not None:
                    raise UserError(self._shard_failure)
            try:
                super().prepare_shard(shard_id, blocking)
            except Exception as err:  # noqa: BLE001 - checksum, decompression, copy: all name the shard
                self._drop_cached_copies(shard_id)
                # streaming leaves a failed download PREPARING: whoever waits for it would wait forever.
                if self._shard_states[shard_id] == _PREPARING:
                    self._shard_states[shard_id] = _REMOTE
                raise self._fail(shard_id, err) from err

        # streaming counts the exits of its download and ready threads to end an epoch (`_Iterator.exit()`),
        # but a thread that raises never reports one: with both dead of a lost store, the epoch's end waited
        # for them forever. A thread that dies reports its exit too.
        def _prepare_thread(self, it) -> None:
            try:
                super()._prepare_thread(it)
            except BaseException:
                it.on_exit()
                raise

        def _ready_thread(self, it) -> None:
            try:
                super()._ready_thread(it)
            except BaseException:
                it.on_exit()
                raise

        def _drop_cached_copies(self, shard_id: int) -> None:
            """A failed shard's copies in the cache go: the next run fetches the (restored) original again."""
            stream = self.streams[int(self.stream_per_shard[shard_id])]
            if stream.remote is None:
                return  # local is the prepared folder itself: never delete from it
            for raw_info, zip_info in self.shards[shard_id].file_pairs:
                for info in (raw_info, zip_info):
                    if info is not None:
                        folder = Path(stream.local, stream.split or "")
                        confined_path(folder, info.basename, folder / INDEX_FILE).unlink(missing_ok=True)

        def get_item(self, sample_id: int, retry: int = 7) -> Any:
            if self._shard_failure is not None:
                raise UserError(self._shard_failure)
            try:
                sample = super().get_item(sample_id, retry)
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - a raw shard that does not decode
                if self._shard_failure is not None:
                    raise UserError(self._shard_failure) from err
                raise self._fail(int(self.spanner[sample_id][0]), err) from err
            ids = sample["input_ids"]
            if self.token_id_limit is not None and ids.size and int(ids.max()) >= self.token_id_limit:
                # The pre-training scan reads a sample of each source; this catches what it missed, on the
                # host, before an embedding lookup turns it into a device-side assert.
                raise UserError(f"{self._describe_shard(int(self.spanner[sample_id][0]))}: sample {sample_id} "
                                f"holds token id {int(ids.max())}, outside the tokenizer's {self.token_id_limit} "
                                f"ids (prepared with another tokenizer?)")
            return {"input_ids": ids, "sample_id": int(sample_id)}

        def __iter__(self):
            yield from super().__iter__()
            if self._shard_failure is not None:
                raise UserError(self._shard_failure)
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


def shard_cache_root() -> str:
    return os.environ.get(SHARD_CACHE_ENV) or os.path.join(tempfile.gettempdir(), f"modernbert-shard-cache-{os.getuid()}")


def shard_cache_dir(source: SourceSpec, dataset_ordinal: int = 0) -> str:
    """The cache folder a prepared local source is decompressed into: one per folder, content and job.

    Keyed by the folder's absolute path and its index.json (which holds every shard's size and hash), so
    re-preparing a folder never reads an older preparation's decompressed shards; and by the job and the
    dataset's ordinal in this process, because streaming lets one live dataset at a time use a cache folder
    on a host: two runs side by side on the same data, or a train and an eval loader over one source, each
    get their own. A normal exit removes the job's folders; a killed job's stay under the root, safe to delete.
    """
    root = shard_cache_root()
    digest = hashlib.blake2s(os.path.abspath(source.local).encode(), digest_size=8)
    digest.update((Path(source.local) / INDEX_FILE).read_bytes())
    source_root = Path(root) / f"{Path(source.local).name}-{digest.hexdigest()}"
    job = _job_key()
    if job.startswith("pid-"):
        _remove_caches_of_dead_processes(source_root)
    folder = source_root / f"{job}-{dataset_ordinal}"
    if _env_int("LOCAL_RANK", 0) == 0:
        _CACHES_TO_REMOVE_AT_EXIT.add(str(folder))
    return str(folder)


_CACHES_TO_REMOVE_AT_EXIT: set[str] = set()
_datasets_built = 0


@atexit.register
def remove_own_shard_caches() -> None:
    for folder in _CACHES_TO_REMOVE_AT_EXIT:
        remove_shard_cache(folder)


def release_shard_caches(dataset) -> list[str]:
    """Remove the cache folders this process made for `dataset`'s prepared local sources (a rollback's old
    dataset: its bytes would otherwise count as free space for the next one's cache limit). Remote sources'
    `local` folders are the user's and stay. Returns the folders removed."""
    removed = []
    for stream in getattr(dataset, "streams", []):
        folder = str(stream.local)
        if folder in _CACHES_TO_REMOVE_AT_EXIT:
            remove_shard_cache(folder)
            _CACHES_TO_REMOVE_AT_EXIT.discard(folder)
            removed.append(folder)
    return removed


def _job_key() -> str:
    """The same on every rank of one node of one job; different for jobs running side by side, and for two
    "nodes" of one job on one host (a rehearsal: streaming refuses one cache folder for two node leaders)."""
    if _env_int("WORLD_SIZE", 1) > 1:
        rendezvous = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
        node = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or "0"
        return f"job-{hashlib.blake2s(rendezvous.encode(), digest_size=6).hexdigest()}-n{node}"
    return f"pid-{os.getpid()}"


def _remove_caches_of_dead_processes(source_root: Path) -> None:
    """Single-process runs key their caches by pid: those of pids no longer alive on this host are stale."""
    if not source_root.is_dir():
        return
    for folder in source_root.iterdir():
        match = re.fullmatch(r"pid-(\d+)-\d+", folder.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            remove_shard_cache(folder)


def _stream_for(source: SourceSpec, download_timeout: float, download_retry: int, dataset_ordinal: int = 0):
    from streaming import Stream

    weights = source.stream_weight_kwargs()
    if source.remote is not None:
        return Stream(remote=source.remote, local=source.local, download_timeout=download_timeout,
                      download_retry=download_retry, **weights)
    check_column_safety(source.local, load_index(source.local))  # named refusal of pickle columns
    validate = SHARD_HASH if has_shard_hashes(source.local) else None
    if validate is None:
        log.warning("source %r: %s has no shard hashes (prepared by an older version); corrupt shards are not "
                    "detected until re-prepared", source.name, source.local)
    return Stream(remote=os.path.abspath(source.local), local=shard_cache_dir(source, dataset_ordinal),
                  validate_hash=validate, download_timeout=download_timeout, download_retry=download_retry, **weights)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def default_cache_limit(manifest: Manifest) -> int:
    """Bound on the local shard cache: DEFAULT_CACHE_DISK_FRACTION of (free space + what the caches hold already)
    on the fullest filesystem among the sources' caches (a remote source's `local` folder; for a prepared local
    folder, the shard cache it is decompressed into). The recipe's data.cache_limit (bytes or "200gb") replaces it.
    """
    limits = []
    for source in manifest.sources:
        folder = Path(source.local if source.remote else shard_cache_root()).resolve()
        existing = folder
        while not existing.exists():
            existing = existing.parent
        limits.append(shutil.disk_usage(existing).free + _folder_bytes(folder))
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
    global _datasets_built
    # Every rank builds its datasets in the same order, so this ordinal names the same cache on each of them.
    ordinal, _datasets_built = _datasets_built, _datasets_built + 1
    if cache_limit is None:
        cache_limit = default_cache_limit(manifest)
    streams = [_stream_for(source, download_timeout, download_retry, ordinal) for source in manifest.sources]
    try:
        from modernbert_train.data.shm_prefix import release_when_dropped, shm_prefix_registration

        with shm_prefix_registration(host_shm_lock):  # the host-wide lock, never across streaming's barriers
            dataset = dataset_class()(
                streams=streams, batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed,
                shuffle_algo=shuffle_algo, num_canonical_nodes=num_canonical_nodes,
                shuffle_block_size=shuffle_block_size, predownload=predownload, cache_limit=cache_limit,
                epoch_size=manifest.epoch_size, sampling_method=sampling_method, partition_algo="relaxed",
                batching_method="random", replication=replication)
        release_when_dropped(dataset)
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
    check_stream_shard_names(dataset)  # names from (remote) index.json files stay inside their folders
    _verify_remote_shard_hashes(dataset, manifest)
    dataset.source_names = manifest.source_names()
    vocabularies = [meta["vocab_size"] for meta in map(SourceSpec.prep_meta, manifest.sources)
                    if meta is not None and isinstance(meta.get("vocab_size"), int)]
    dataset.token_id_limit = min(vocabularies) if vocabularies else None
    return dataset


def _verify_remote_shard_hashes(dataset, manifest: Manifest) -> None:
    """A remote source's index.json is known only once streaming has fetched it: if `prepare` wrote the shards'
    hashes there, every download is checked against them from now on, as a local source's shards are."""
    for stream_id, (source, stream) in enumerate(zip(manifest.sources, dataset.streams)):
        if source.remote is None:
            continue
        pairs = [dataset.shards[i].file_pairs[0] for i in np.flatnonzero(dataset.stream_per_shard == stream_id)]
        if pairs and all(SHARD_HASH in (zip_info or raw_info).hashes for raw_info, zip_info in pairs):
            stream.validate_hash = SHARD_HASH
        else:
            log.warning("source %r: %s has no shard hashes (prepared by an older version or another tool); "
                        "corrupt downloads are not detected", source.name, source.remote)


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
    import torch
    from torch.utils.data import DataLoader

    # Its own generator: starting an iterator draws a seed, which must not move the global torch RNG
    # (dropout) from the loader's prefetch thread.
    kwargs: dict[str, Any] = {"generator": torch.Generator()}
    if num_workers > 0:
        kwargs["persistent_workers"] = True
        kwargs["prefetch_factor"] = prefetch_factor or 2
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_raw,
                      drop_last=False, **kwargs)

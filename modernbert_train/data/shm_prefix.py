"""streaming's shared memory: its prefix, registered under the host-wide lock with no collective inside it; and
its release when a dataset is done with before the process ends.

mosaicml-streaming 0.13.0 (`streaming.base.shared.prefix.get_shm_prefix`) lets every rank look for the first free
prefix, waits in a global barrier, lets each node's leader create `<prefix>_locals`, and waits in a second
global barrier. Two jobs on one host can pick the same prefix, so our leader takes a host-wide lock
(`dataset.host_shm_lock`); but held around that function, the lock spans both barriers. Where two nodes of one
job share a host's /dev/shm (a test cluster; a node running two launchers), node 0's leader then waits in the
barrier holding the lock while node 1's leader waits for the lock: a deadlock until the lock's timeout.

Here each node's leader finds the free prefix and creates its `_locals` under the lock, with nothing
collective in between; only after releasing it does it tell the other ranks, with one all-gather. The layout of
the shared memory is streaming's own (same names, same packed contents), so streaming reads it as usual.
"""
from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager


@contextmanager
def shm_prefix_registration(host_lock):
    """While a StreamingDataset is built, streaming registers its prefix through `register_shm_prefix`, under
    `host_lock()` (a context manager: the host-wide lock, `dataset.host_shm_lock`)."""
    import streaming.base.dataset as streaming_dataset

    original = streaming_dataset.get_shm_prefix
    streaming_dataset.get_shm_prefix = functools.partial(register_shm_prefix, host_lock=host_lock)
    try:
        yield
    finally:
        streaming_dataset.get_shm_prefix = original


def _leader_registers(streams_local, streams_remote, retry: int, host_lock):
    """(prefix, its `_locals` shared memory): the first prefix free of every kind of shared memory."""
    import streaming.base.shared.prefix as prefix
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN

    with host_lock():
        prefix_int = max(prefix._check_and_find_retrying(streams_local, streams_remote, shm_name=name, retry=retry)
                         for name in SHM_TO_CLEAN)
        packed = prefix._pack_locals(streams_local, prefix_int)
        shm = prefix.SharedMemory(prefix._get_path(prefix_int, LOCALS), True, len(packed))
        shm.buf[:len(packed)] = packed
    return prefix_int, shm


def register_shm_prefix(streams_local, streams_remote, world, retry: int = 100, *, host_lock):
    """Drop-in for streaming's `get_shm_prefix` (same arguments and result, plus the lock to register under)."""
    import streaming.base.shared.prefix as prefix
    import torch.distributed as torch_dist
    from streaming.base.constant import LOCALS

    prefix._check_self(streams_local)
    failure: Exception | None = None
    answer: int | str | None = None
    shm = None
    if world.is_local_leader:
        try:
            answer, shm = _leader_registers(streams_local, streams_remote, retry, host_lock)
        except Exception as err:  # noqa: BLE001 - the other ranks must hear of it, or they wait forever
            failure, answer = err, f"{type(err).__name__}: {err}"
    answers = [answer]
    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        answers = [None] * torch_dist.get_world_size()
        torch_dist.all_gather_object(answers, answer)  # the lock is released: no host-wide wait in here
    if failure is not None:
        raise failure
    failed = [(rank, text) for rank, text in enumerate(answers) if isinstance(text, str)]
    if failed:
        rank, text = failed[0]
        # ValueError, as streaming raises for a reused local folder, so the caller explains it the same way.
        raise ValueError(f"rank {rank} could not register the datasets' shared memory: {text}")
    if world.is_local_leader:
        return answer, shm
    prefix_int = answers[world.rank - world.rank_of_node]  # this node's leader
    name = prefix._get_path(prefix_int, LOCALS)
    try:
        shm = prefix.SharedMemory(name, False)
    except FileNotFoundError:
        raise RuntimeError(f"this node's leader registered shared memory {name}, but it is not in /dev/shm: do "
                           f"the ranks of one node see different /dev/shm (separate mount namespaces)?") from None
    their_locals, their_prefix = prefix._unpack_locals(bytes(shm.buf))
    if their_locals != streams_local or their_prefix != prefix_int:
        raise RuntimeError(f"shared memory {name} holds datasets {their_locals}, not this rank's {streams_local}: "
                           f"every rank of a node must build the same datasets in the same order")
    return prefix_int, shm


def release_when_dropped(dataset) -> None:
    """Release `dataset`'s shared memory (below) when it is garbage-collected, if nothing released it before."""
    prefix = getattr(dataset, "_shm_prefix_int", None)
    if prefix is not None:
        dataset._modernbert_release = weakref.finalize(dataset, _release_blocks, prefix)


def release_streaming_dataset(dataset) -> None:
    """Stop the threads of `dataset` (a StreamingDataset) and close its shared memory, unlinking the blocks this
    process created and dropping streaming's atexit hooks for them.

    streaming does neither before the process exits. An iteration left unfinished keeps its two threads polling
    (and the dataset alive); every block it opens is registered with `atexit` and stays open even after the
    dataset is gone, also the blocks it opens in passing (reading a resume state in `__iter__`) and holds nowhere
    else: 14 or more file descriptors a dataset. A run that rolls back rebuilds its loaders in-process, and a
    test session builds hundreds: at the usual limit of 1,024 open files that ends in EMFILE.
    """
    iterator = getattr(dataset, "_iterator", None)
    if iterator is not None:
        iterator.exit()  # its threads stop at their next poll; a shard download in flight finishes first
    executor = getattr(dataset, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=False)
    release = getattr(dataset, "_modernbert_release", None)
    if release is not None:
        release()  # once: a finalizer runs at most once, so a later collection cannot touch a reused prefix
    elif getattr(dataset, "_shm_prefix_int", None) is not None:
        _release_blocks(dataset._shm_prefix_int)


def _release_blocks(prefix: int) -> int:
    """Close every live streaming block of `prefix` in this process (found among all objects: no object lists
    them), as streaming does at exit. Returns how many."""
    import atexit
    import gc

    from streaming.base.shared.memory import SharedMemory

    mine = f"{prefix:06}_"  # streaming's block names: <prefix>_<what>
    released = 0
    for block in [obj for obj in gc.get_objects() if type(obj) is SharedMemory]:
        shm = getattr(block, "shm", None)
        if shm is None or not shm.name.lstrip("/").startswith(mine):
            continue
        try:
            block.cleanup()  # close, and unlink what this process created
        except BufferError:  # a view of it is still alive somewhere: it stays open until the process exits
            continue
        atexit.unregister(block.cleanup)
        # Once released, never again: the prefix may belong to another dataset by the time this object goes.
        block.created_shms, block.opened_shms = [], []
        released += 1
    return released


__all__ = ["shm_prefix_registration", "register_shm_prefix", "release_when_dropped", "release_streaming_dataset"]

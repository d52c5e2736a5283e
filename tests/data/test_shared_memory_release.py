"""A released loader gives back streaming's shared memory: no descriptor and no /dev/shm block outlives it.

streaming closes its blocks only at process exit; CI's limit of 1,024 open files was reached by a test session
whose runs rolled back and rebuilt their loaders in-process (issue: EMFILE in tests/train).
"""
import os
from pathlib import Path

from modernbert_train.data import build_mlm_loader
from tests.data.conftest import write_manifest
from tests.data.test_loader import _config


def _open_files() -> dict[str, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return found


def _blocks_of(prefix: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"{prefix:06}_*"))


def _resumed_pair(corpus_copy):
    """A loader that took two steps, and a second one resumed from its state (streaming opens a block in passing
    for that) that took one."""
    manifest = write_manifest(corpus_copy["tmp"] / "mix.yaml", corpus_copy["shards"])
    first = build_mlm_loader(_config(corpus_copy, manifest))
    steps = iter(first)
    next(steps), next(steps)
    state = first.state_dict()
    first.release()
    second = build_mlm_loader(_config(corpus_copy, manifest))
    second.load_state_dict(state)
    next(iter(second))
    return first, second


def test_released_loaders_hold_no_descriptor_or_block(corpus_copy):
    before = _open_files()
    first, second = _resumed_pair(corpus_copy)
    prefixes = {first.dataset._shm_prefix_int, second.dataset._shm_prefix_int}
    held = [target for fd, target in _open_files().items() if fd not in before and "/dev/shm/" in target]
    assert len(held) >= 14, held  # what streaming keeps open: the leak this guards against is real
    second.release()
    left = [target for fd, target in _open_files().items() if fd not in before and "/dev/shm/" in target]
    assert left == []
    assert [name for prefix in prefixes for name in _blocks_of(prefix)] == []


def test_an_unfinished_iteration_is_stopped_and_its_blocks_closed(corpus_copy):
    """streaming's two threads of an iteration left mid-epoch poll until the process ends, and keep the dataset
    alive: release stops them."""
    import threading

    manifest = write_manifest(corpus_copy["tmp"] / "mix.yaml", corpus_copy["shards"])
    threads_before = threading.active_count()
    loader = build_mlm_loader(_config(corpus_copy, manifest))
    next(iter(loader))
    assert threading.active_count() > threads_before
    loader.release()
    for _ in range(100):
        if threading.active_count() == threads_before:
            break
        threading.Event().wait(0.05)
    assert threading.active_count() == threads_before


def test_a_loader_dropped_after_its_epoch_leaves_nothing_open(corpus_copy):
    """No release: once the dataset is garbage (its epoch done, so streaming's threads ended), its blocks close."""
    import gc

    from modernbert_train.data import build_eval_loader

    manifest = write_manifest(corpus_copy["tmp"] / "mix.yaml", corpus_copy["shards"])
    before = _open_files()
    loader = build_eval_loader(_config(corpus_copy, manifest))
    assert list(loader)
    prefix = loader.dataset._shm_prefix_int
    del loader
    gc.collect()
    assert [t for fd, t in _open_files().items() if fd not in before and "/dev/shm/" in t] == []
    assert _blocks_of(prefix) == []

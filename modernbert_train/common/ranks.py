"""Failures that reach every rank: set-up checkpoints where the ranks agree that all went well, and loading a
file on one rank for all of them.

A rank that fails alone during set-up used to raise and exit while the others went on into the next collective,
where they waited for it until the collective timeout (NCCL, another node) or ended with a line about a closed
connection. Here each set-up stage ends in one small exchange on a gloo group: a failure on any rank raises on
every rank the same one-line UserError naming the failed rank, and the job ends at once.

A block guarded by `all_ranks_agree` must hold no collective of its own (else a rank that failed before it sits
in the exchange while the others sit in that collective); `load_on_one_rank` is itself such an exchange.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Callable

from modernbert_train.common.errors import UserError

# Seconds a collective waits for a missing rank before the job fails (composer's default: 300).
DIST_TIMEOUT_ENV = "MODERNBERT_DIST_TIMEOUT"
_group = None  # one gloo group for these exchanges, made the first time every rank comes to one


def dist_timeout_s() -> float:
    """How long any collective of ours waits for a rank that does not come (a stalled or lost rank): the
    environment's DIST_TIMEOUT_ENV, else composer's 300 s. Every group we make gets it (torch's own default
    for a new gloo group is 30 minutes)."""
    value = os.environ.get(DIST_TIMEOUT_ENV)
    try:
        seconds = float(value) if value not in (None, "") else 300.0
    except ValueError as err:
        raise UserError(f"environment variable {DIST_TIMEOUT_ENV}={value!r} is not a number of seconds") from err
    if seconds <= 0:
        raise UserError(f"environment variable {DIST_TIMEOUT_ENV}={value!r} must be positive")
    return seconds


def new_gloo_group():
    """A gloo group over all ranks with our collective timeout (call on every rank, in the same order)."""
    from datetime import timedelta

    import torch.distributed as torch_dist

    return torch_dist.new_group(backend="gloo", timeout=timedelta(seconds=dist_timeout_s()))


def die_with_launcher() -> None:
    """Ask Linux to kill this rank when its launcher dies: a rank orphaned by a killed launcher (composer -n,
    torchrun) would otherwise train on alone, holding the run folder's lock against the relaunch."""
    if not os.environ.get("LOCAL_WORLD_SIZE") or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _world():
    """(rank, world size, group) when torch.distributed runs with more than one rank, else None."""
    import torch.distributed as torch_dist

    global _group
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return None
    if _group is None:
        _group = torch_dist.group.WORLD if torch_dist.get_backend() == "gloo" else new_gloo_group()
    return torch_dist.get_rank(), torch_dist.get_world_size(), _group


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"


def _failure(rank: int, world: int, stage: str, message: str) -> UserError:
    return UserError(f"rank {rank} of {world} failed while {stage}: {message}")


@contextmanager
def all_ranks_agree(stage: str):
    """Run the block on every rank; then all ranks learn whether it failed anywhere. If it did, every rank
    raises UserError 'rank R of W failed while <stage>: <its error>' (R: the lowest failed rank); the failed
    rank chains its own error. Single-process: the block's error propagates unchanged."""
    world = _world()
    if world is None:
        yield
        return
    rank, size, group = world
    error: BaseException | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - told to every rank below, then raised
        error = err
    import torch.distributed as torch_dist

    reports: list[Any] = [None] * size
    torch_dist.all_gather_object(reports, None if error is None else _one_line(error), group=group)
    failed = [(r, message) for r, message in enumerate(reports) if message is not None]
    if not failed:
        return
    first, message = failed[0]
    raise _failure(first, size, stage, message) from error


def load_on_one_rank(stage: str, load: Callable[[], Any]) -> Any:
    """`load()` on rank 0 only, its result broadcast to every rank (one read of a checkpoint instead of one per
    rank; the broadcast pickles it, so rank 0 briefly holds it twice). A failure of `load()` raises on every
    rank, named as in `all_ranks_agree`."""
    world = _world()
    if world is None:
        return load()
    rank, size, group = world
    import torch.distributed as torch_dist

    payload: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            payload = [("ok", load())]
        except Exception as err:  # noqa: BLE001 - told to every rank
            error = err
            payload = [("error", _one_line(err))]
    torch_dist.broadcast_object_list(payload, src=0, group=group)
    status, value = payload[0]
    if status == "error":
        raise _failure(0, size, stage, value) from error
    return value


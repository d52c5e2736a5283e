"""The checkpoint a run resumes from: chosen once by rank 0 and broadcast, then loaded as composer's load_path.

composer 0.32.1's own autoresume (`Trainer(autoresume=True)`) cannot resume a multi-node run whose nodes share
one save_folder (what launch/README.md asks for): it writes a per-node signal file into save_folder, but the
file name is broadcast from rank 0, so every node writes and then deletes "._signal_file_node0_...", and the
second delete raises FileNotFoundError (the same as llm-foundry#1736). A requeued multi-node job never came
back. Here rank 0 alone makes the run folder resumable and names the checkpoint; every rank then loads that
path, with composer's autoresume off.
"""
from __future__ import annotations

from pathlib import Path

from modernbert_train.checkpoint.files import recover_interrupted_save
from modernbert_train.common.errors import UserError


def resume_checkpoint(run_dir: Path, rank: int) -> str | None:
    """On every rank: the newest complete checkpoint of `run_dir` (file or sharded folder), or None to start fresh.

    Rank 0 moves half-written checkpoints aside and repoints `latest-rank0.pt` (`recover_interrupted_save`);
    its answer, or its error, reaches every rank, so no rank waits for a rank 0 that failed.
    """
    from composer.utils import dist as composer_dist

    failure: Exception | None = None
    answer: tuple[str, str | None] = ("ok", None)
    if rank == 0:
        try:
            newest = recover_interrupted_save(run_dir)
            answer = ("ok", str(newest.resolve()) if newest is not None else None)
        except Exception as err:  # noqa: BLE001 - sent to every rank first, then raised here as it was
            failure, answer = err, ("error", f"{type(err).__name__}: {err}")
    if composer_dist.get_world_size() > 1:
        box = [answer]
        composer_dist.broadcast_object_list(box, src=0)
        answer = box[0]
    if failure is not None:
        raise failure
    kind, value = answer
    if kind == "error":
        raise UserError(f"rank 0 could not choose the checkpoint of {run_dir} to resume from: {value}")
    return value


__all__ = ["resume_checkpoint"]

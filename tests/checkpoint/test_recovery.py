"""A kill during a checkpoint save must not block the relaunch (issue 12, item 2): unit checks on run
directories shaped like composer's. The SIGKILL-three-times run is in test_exact_resume.py."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from composer.core import Timestamp
from composer.utils.file_helpers import ensure_folder_has_no_conflicting_files

from modernbert_train.checkpoint import (has_checkpoints, is_complete_checkpoint, latest_checkpoint,
                                          recover_interrupted_save)
from modernbert_train.checkpoint.files import CHECKPOINT_NAME

LATEST = "latest-rank0.pt"


def write_checkpoint(run_dir: Path, step: int, *, truncate_to: float | None = None) -> Path:
    path = run_dir / f"ep0-ba{step}-rank0.pt"
    torch.save({"state": {"model": {"w": torch.randn(256, 256)}, "timestamp": {"batch": step}}}, path)
    if truncate_to is not None:  # what a SIGKILL in the middle of torch.save leaves behind
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * truncate_to)])
    return path


def point_latest(run_dir: Path, target: str) -> None:
    (run_dir / LATEST).unlink(missing_ok=True)
    os.symlink(target, run_dir / LATEST)


def composer_would_refuse(run_dir: Path, resume_step: int) -> bool:
    try:
        ensure_folder_has_no_conflicting_files(run_dir, CHECKPOINT_NAME, Timestamp(batch=resume_step))
    except FileExistsError:
        return True
    return False


def test_truncated_newer_file_is_moved_aside_and_the_run_resumes_from_latest(tmp_path, caplog):
    write_checkpoint(tmp_path, 4)
    point_latest(tmp_path, "ep0-ba4-rank0.pt")
    write_checkpoint(tmp_path, 8, truncate_to=0.4)  # killed while saving step 8: latest still says step 4
    assert composer_would_refuse(tmp_path, 4)  # the defect: every relaunch failed with FileExistsError
    with caplog.at_level(logging.WARNING, logger="modernbert_train"):
        assert recover_interrupted_save(tmp_path) == tmp_path / "ep0-ba4-rank0.pt"
    assert "ep0-ba8-rank0.pt" in caplog.text and "ep0-ba8-rank0.pt.incomplete" in caplog.text
    assert (tmp_path / "ep0-ba8-rank0.pt.incomplete").stat().st_size > 0  # kept, not deleted
    assert not (tmp_path / "ep0-ba8-rank0.pt").exists()
    assert (tmp_path / LATEST).resolve() == (tmp_path / "ep0-ba4-rank0.pt").resolve()
    assert not composer_would_refuse(tmp_path, 4)


def test_truncated_target_of_latest_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    write_checkpoint(tmp_path, 4)
    write_checkpoint(tmp_path, 8, truncate_to=0.7)
    point_latest(tmp_path, "ep0-ba8-rank0.pt")
    assert latest_checkpoint(tmp_path) == tmp_path / "ep0-ba4-rank0.pt"  # read-only readers (export) skip it too
    with caplog.at_level(logging.WARNING, logger="modernbert_train"):
        assert recover_interrupted_save(tmp_path) == tmp_path / "ep0-ba4-rank0.pt"
    assert "renamed to ep0-ba8-rank0.pt.incomplete" in caplog.text
    assert os.readlink(tmp_path / LATEST) == "ep0-ba4-rank0.pt"
    assert torch.load(tmp_path / LATEST, weights_only=False)["state"]["timestamp"]["batch"] == 4


def test_kill_between_save_and_link_resumes_from_the_complete_new_file(tmp_path):
    write_checkpoint(tmp_path, 4)
    write_checkpoint(tmp_path, 8)  # complete, but the kill came after composer removed the old link
    assert recover_interrupted_save(tmp_path) == tmp_path / "ep0-ba8-rank0.pt"
    assert os.readlink(tmp_path / LATEST) == "ep0-ba8-rank0.pt"


def test_only_an_incomplete_checkpoint_means_a_fresh_start(tmp_path):
    write_checkpoint(tmp_path, 4, truncate_to=0.1)
    point_latest(tmp_path, "ep0-ba4-rank0.pt")
    (tmp_path / "ep0-ba4-rank0.pt.incomplete").write_bytes(b"from an earlier kill")
    assert recover_interrupted_save(tmp_path) is None
    assert not (tmp_path / LATEST).is_symlink() and not has_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep0-ba4-rank0.pt.incomplete",
                                                          "ep0-ba4-rank0.pt.incomplete-1"]


def test_sharded_folder_without_metadata_is_incomplete(tmp_path):
    done, cut = tmp_path / "ep0-ba3", tmp_path / "ep0-ba6"
    for folder in (done, cut):
        folder.mkdir()
        (folder / "__0_0.distcp").write_bytes(b"shard")
    (done / ".metadata").write_bytes(b"written last")
    assert is_complete_checkpoint(done) and not is_complete_checkpoint(cut)
    assert recover_interrupted_save(tmp_path) == done
    assert (tmp_path / "ep0-ba6.incomplete").is_dir() and os.readlink(tmp_path / LATEST) == "ep0-ba3"


def test_empty_or_missing_run_directory_is_left_alone(tmp_path):
    assert recover_interrupted_save(tmp_path / "none") is None
    assert recover_interrupted_save(tmp_path) is None and list(tmp_path.iterdir()) == []
    with pytest.raises(Exception, match="no complete checkpoint"):
        latest_checkpoint(tmp_path)

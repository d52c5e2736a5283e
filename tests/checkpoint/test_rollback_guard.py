"""Issue 24: a rollback moves newer checkpoints into `rolled_back/` and replaces same-named ones there. A run
folder synced from elsewhere could bring `rolled_back` as a link to another folder (or a user could keep files
in it): nothing outside the run's own checkpoints is replaced or deleted."""
from __future__ import annotations

import pytest

from modernbert_train.checkpoint.files import set_aside_checkpoints_after
from modernbert_train.common.errors import UserError


def _run_with_checkpoints(root):
    run = root / "run"
    run.mkdir()
    for step in (4, 8):
        (run / f"ep0-ba{step}-rank0.pt").write_bytes(f"checkpoint {step}".encode())
    (run / "latest-rank0.pt").symlink_to("ep0-ba8-rank0.pt")
    return run


def test_a_rolled_back_link_to_another_folder_is_refused_and_nothing_moves(tmp_path):
    run = _run_with_checkpoints(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "ep0-ba8-rank0.pt").write_text("someone else's file of that name")
    (run / "rolled_back").symlink_to(elsewhere)
    with pytest.raises(UserError, match="rollback folder .*rolled_back is a symbolic link"):
        set_aside_checkpoints_after(run, 4, run / "rolled_back")
    assert (elsewhere / "ep0-ba8-rank0.pt").read_text() == "someone else's file of that name"
    assert (run / "ep0-ba8-rank0.pt").read_bytes() == b"checkpoint 8"


def test_a_rolled_back_folder_holding_other_files_is_refused(tmp_path):
    run = _run_with_checkpoints(tmp_path)
    (run / "rolled_back").mkdir()
    (run / "rolled_back" / "notes.md").write_text("mine")
    with pytest.raises(UserError, match="holds notes.md, which a rollback does not write"):
        set_aside_checkpoints_after(run, 4, run / "rolled_back")
    assert (run / "rolled_back" / "notes.md").read_text() == "mine" and (run / "ep0-ba8-rank0.pt").exists()


def test_a_second_rollback_replaces_its_own_earlier_copy(tmp_path):
    run = _run_with_checkpoints(tmp_path)
    (run / "rolled_back").mkdir()
    (run / "rolled_back" / "ep0-ba8-rank0.pt").write_bytes(b"older copy")
    set_aside_checkpoints_after(run, 4, run / "rolled_back")
    assert (run / "rolled_back" / "ep0-ba8-rank0.pt").read_bytes() == b"checkpoint 8"
    assert (run / "latest-rank0.pt").resolve().name == "ep0-ba4-rank0.pt"

"""Issue 17, findings 1 and 3: `export --overwrite` replaces only a previous export; checkpoints from elsewhere
are read without running the code a pickle can hold."""
import datetime
import fractions
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modernbert_train.checkpoint import convert_sharded_checkpoint, load_composer_state
from modernbert_train.common.errors import UserError
from modernbert_train.run.export import export_to_hf
from modernbert_train.run.folder import write_config, write_run_artifacts
from modernbert_train.common.safety import check_safe_to_replace
from tests.run.test_export import composer_checkpoint, tokenizer_file, trained_like_model  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def workdir(tmp_path, tokenizer_file, monkeypatch):  # noqa: F811
    """A user's working directory: notes, data and runs/phase1 (a trained run) inside it; the CWD."""
    work = tmp_path / "work"
    run = work / "runs" / "phase1"
    model = trained_like_model(tokenizer_file)
    write_run_artifacts(run, model.config, tokenizer_file)
    composer_checkpoint(model, run / "ep0-ba7-rank0.pt")
    (work / "notes.md").write_text("three weeks of notes")
    (work / "data").mkdir()
    (work / "data" / "corpus.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.chdir(work)
    return work


def _all_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _export_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "modernbert_train.cli.main", "export", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_overwrite_of_the_current_directory_is_refused_and_deletes_nothing(workdir):
    before = _all_files(workdir)
    result = _export_cli("runs/phase1", "--out", ".", "--overwrite", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --out . is the current directory; refusing to replace it — choose a new folder"]
    assert _all_files(workdir) == before


def test_overwrite_of_a_folder_holding_the_source_run_is_refused(workdir):
    before = _all_files(workdir)
    with pytest.raises(UserError, match=r"--out runs holds runs/phase1, which this command reads"):
        export_to_hf("runs/phase1", "runs", overwrite=True)
    with pytest.raises(UserError, match=r"--out runs/phase1 is runs/phase1"):
        export_to_hf("runs/phase1", "runs/phase1", overwrite=True)
    assert _all_files(workdir) == before


def test_overwrite_of_home_root_and_foreign_folders_is_refused(workdir, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(UserError, match="your home directory"):
        export_to_hf("runs/phase1", home, overwrite=True)
    with pytest.raises(UserError, match="a folder holding the current directory"):
        export_to_hf("runs/phase1", tmp_path, overwrite=True)
    with pytest.raises(UserError, match="filesystem root"):
        check_safe_to_replace("/", label="--out")
    # Looks like an export, but holds something an export never writes.
    foreign = workdir / "hf-with-notes"
    foreign.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        (foreign / name).write_text("{}")
    with pytest.raises(UserError, match="holds README.md, which an export does not write"):
        export_to_hf("runs/phase1", foreign, overwrite=True)
    data_only = workdir / "data"
    with pytest.raises(UserError, match="holds corpus.jsonl"):
        export_to_hf("runs/phase1", data_only, overwrite=True)
    link = workdir / "link"
    link.symlink_to(workdir / "data")
    with pytest.raises(UserError, match="symbolic link"):
        export_to_hf("runs/phase1", link, overwrite=True)
    assert (home / "photos").is_dir() and (foreign / "README.md").exists() and (data_only / "corpus.jsonl").exists()


def test_overwrite_replaces_a_previous_export(workdir):
    export_to_hf("runs/phase1", "hf", sentence_transformers=True)
    (workdir / "hf" / "config.json").write_text("{}")  # a stale or broken earlier export
    export_to_hf("runs/phase1", "hf", overwrite=True)
    assert '"model_type": "modernbert"' in (workdir / "hf" / "config.json").read_text()
    assert not (workdir / "hf" / "modules.json").exists()


# -- finding 3: pickles ------------------------------------------------------------------------------------------
class Payload:
    """What an attacker hides in a checkpoint: unpickling it creates a file (stands for any command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _planted_checkpoint(model, path: Path, marker: Path) -> Path:
    weights = {f"model.{key}": value for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": {"model": weights, "callbacks": {"x": Payload(marker)}}, "rng": []}, path)
    return path


def test_a_planted_payload_in_a_checkpoint_from_elsewhere_does_not_run(tmp_path, tokenizer_file):  # noqa: F811
    model = trained_like_model(tokenizer_file)
    marker = tmp_path / "payload-ran"
    downloaded = _planted_checkpoint(model, tmp_path / "downloads" / "ep0-ba7-rank0.pt", marker)
    write_run_artifacts(tmp_path / "cfg", model.config, None)
    config = tmp_path / "cfg" / "model_config.json"
    with pytest.raises(UserError, match=r"holds pickled objects \(io.open\).*--trust-checkpoint"):
        export_to_hf(downloaded, tmp_path / "hf", model_config=config, tokenizer=tokenizer_file)
    assert not marker.exists()
    from modernbert_train.checkpoint import load_model_weights_from_checkpoint  # model.init_from's path

    with pytest.raises(UserError, match="model.trust_checkpoint=true"):
        load_model_weights_from_checkpoint(model, downloaded)
    assert not marker.exists() and not (tmp_path / "hf").exists()
    # The same file with the explicit flag is fully unpickled: the payload runs (what the refusal prevents).
    export_to_hf(downloaded, tmp_path / "hf", model_config=config, tokenizer=tokenizer_file, trust_checkpoint=True)
    assert marker.exists()


def test_composer_data_types_load_safely_from_anywhere(tmp_path, tokenizer_file):  # noqa: F811
    """What composer really stores beside tensors (numpy RNG state, timedelta in the timestamp)."""
    model = trained_like_model(tokenizer_file)
    weights = {f"model.{key}": value for key, value in model.state_dict().items()}
    state = {"state": {"model": weights, "timestamp": {"Timestamp": {"batch": 7,
                                                                     "total_wct": datetime.timedelta(seconds=3)}},
                       "rng": [{"numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                                "version": torch.__version__}]}}
    path = tmp_path / "elsewhere" / "ckpt.pt"
    path.parent.mkdir()
    torch.save(state, path)
    loaded = load_composer_state(path)
    assert loaded["state"]["timestamp"]["Timestamp"]["total_wct"] == datetime.timedelta(seconds=3)
    assert np.array_equal(loaded["state"]["rng"][0]["numpy"][1], np.random.get_state()[1])


def test_full_unpickling_only_for_our_own_run_folder(tmp_path, tokenizer_file):  # noqa: F811
    model = trained_like_model(tokenizer_file)
    weights = {f"model.{key}": value for key, value in model.state_dict().items()}
    for folder in ("ours", "elsewhere"):
        (tmp_path / folder).mkdir()
        torch.save({"state": {"model": weights, "extra": fractions.Fraction(1, 3)}}, tmp_path / folder / "c.pt")
    write_run_artifacts(tmp_path / "ours", model.config, tokenizer_file)
    write_config(tmp_path / "ours", "run_name: ours\n")
    assert load_composer_state(tmp_path / "ours" / "c.pt")["state"]["extra"] == fractions.Fraction(1, 3)
    with pytest.raises(UserError, match=r"fractions.Fraction"):
        load_composer_state(tmp_path / "elsewhere" / "c.pt")


def test_a_sharded_checkpoint_from_elsewhere_is_not_unpickled(tmp_path):
    marker = tmp_path / "payload-ran"
    sharded = tmp_path / "downloads" / "ep0-ba7"
    sharded.mkdir(parents=True)
    (sharded / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (sharded / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(UserError, match=r"sharded checkpoint \(its .metadata is a pickle\)"):
        load_composer_state(sharded)
    with pytest.raises(UserError, match="--trust-checkpoint"):
        convert_sharded_checkpoint(sharded, tmp_path / "merged.pt")
    assert not marker.exists()

"""Issue 17, findings 1 and 3: `export --overwrite` replaces only a previous export; checkpoints from elsewhere
are read without running the code a pickle can hold. Issue 24: nor from folders that look like our own runs."""
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


def _looks_like_our_run(folder: Path, model, tokenizer_file) -> Path:
    """What a run folder synced from a bucket looks like: config.yaml + model_config.json, owned by this user."""
    write_run_artifacts(folder, model.config, tokenizer_file)
    write_config(folder, "run_name: synced\n")
    return folder


def test_a_run_folder_that_looks_like_ours_gets_no_full_unpickling(tmp_path, tokenizer_file):  # noqa: F811
    """Issue 24: a folder synced from a bucket passed the old 'own run folder' test, and a .pt that failed the
    safe load on purpose was then fully unpickled. Now only the explicit per-command opt-in unpickles."""
    model = trained_like_model(tokenizer_file)
    marker = tmp_path / "payload-ran"
    synced = _looks_like_our_run(tmp_path / "synced", model, tokenizer_file)
    planted = _planted_checkpoint(model, synced / "ep0-ba7-rank0.pt", marker)
    with pytest.raises(UserError, match=r"holds pickled objects \(io.open\).*our run folders included"):
        load_composer_state(planted)
    with pytest.raises(UserError, match="--trust-checkpoint"):
        export_to_hf(synced, tmp_path / "hf")
    assert not marker.exists() and not (tmp_path / "hf").exists()
    weights = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state": {"model": weights, "extra": fractions.Fraction(1, 3)}}, synced / "c.pt")
    with pytest.raises(UserError, match=r"fractions.Fraction"):
        load_composer_state(synced / "c.pt")
    assert load_composer_state(synced / "c.pt", trust=True)["state"]["extra"] == fractions.Fraction(1, 3)


def test_a_sharded_checkpoint_with_a_payload_is_not_unpickled_even_in_a_run_folder(tmp_path, tokenizer_file):  # noqa: F811
    marker = tmp_path / "payload-ran"
    model = trained_like_model(tokenizer_file)
    sharded = _looks_like_our_run(tmp_path / "synced", model, tokenizer_file) / "ep0-ba7"
    sharded.mkdir(parents=True)
    (sharded / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (sharded / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(UserError, match=r"sharded checkpoint whose .metadata names io.open"):
        load_composer_state(sharded)
    with pytest.raises(UserError, match="--trust-checkpoint"):
        convert_sharded_checkpoint(sharded, tmp_path / "merged.pt")
    with pytest.raises(UserError, match="--trust-checkpoint"):
        export_to_hf(sharded.parent, tmp_path / "hf")
    assert not marker.exists() and not (tmp_path / "merged.pt").exists()


def test_a_sharded_checkpoint_as_composer_writes_it_loads_safely_from_anywhere(tmp_path, tokenizer_file):  # noqa: F811
    """What composer's sharded save holds (model, optimizer, timestamp with timedelta, numpy RNG state) is read
    without the opt-in: .metadata by the restricted unpickler, the non-tensor entries by torch's weights-only."""
    import torch.distributed.checkpoint as dcp

    model = trained_like_model(tokenizer_file)
    weights = {f"model.{key}": value for key, value in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 5, 7, 2]])).logits.sum().backward()
    optimizer.step()
    state = {"state": {"model": weights, "optimizers": {"AdamW": optimizer.state_dict()},
                       "timestamp": {"Timestamp": {"batch": 7, "total_wct": datetime.timedelta(seconds=3)}},
                       "callbacks": {"SpikeGuard": {"streak": [1.5, 2.0]}}},
             "rng": [{"numpy": np.random.get_state(), "torch": torch.get_rng_state(), "version": torch.__version__}]}
    sharded = tmp_path / "downloads" / "ep0-ba7"
    dcp.save(state, checkpoint_id=str(sharded), no_dist=True)
    loaded = load_composer_state(sharded)
    assert loaded["state"]["timestamp"]["Timestamp"]["total_wct"] == datetime.timedelta(seconds=3)
    assert all(torch.equal(loaded["state"]["model"][k], v) for k, v in weights.items())
    assert np.array_equal(loaded["rng"][0]["numpy"][1], np.random.get_state()[1])
    assert loaded["state"]["callbacks"]["SpikeGuard"]["streak"] == [1.5, 2.0]
    merged = convert_sharded_checkpoint(sharded, tmp_path / "merged.pt")
    assert torch.load(merged, weights_only=False)["state"]["timestamp"]["Timestamp"]["batch"] == 7


def test_checkpoints_our_trainer_writes_load_safely(trained_tiny_run):
    """Every checkpoint of a real run (model, optimizer, schedulers, loader and callback state, RNG) passes
    the safe readers, so a resume of our own run never needs the opt-in."""
    from modernbert_train.checkpoint.trust import check_loads_safely, check_resume_is_safe

    for path in sorted(trained_tiny_run.glob("ep*-ba*-rank0.pt")):
        check_loads_safely(path)
        state = load_composer_state(path)
        assert state["state"]["timestamp"]["Timestamp"]["batch"] > 0 and state["state"]["callbacks"]
    check_resume_is_safe(trained_tiny_run)


def test_a_resume_from_a_planted_checkpoint_stops_before_composer_unpickles_it(tmp_path, tokenizer_file, monkeypatch):  # noqa: F811
    """composer loads the resume checkpoint with torch.load(weights_only=False): prepare_run_folder runs the safe
    check first, so a synced run folder with a payload stops with one line and the payload never runs."""
    from types import SimpleNamespace

    from modernbert_train.train.trainer import prepare_run_folder

    model = trained_like_model(tokenizer_file)
    marker = tmp_path / "payload-ran"
    run = _looks_like_our_run(tmp_path / "runs" / "phase1", model, tokenizer_file)
    _planted_checkpoint(model, run / "ep0-ba7-rank0.pt", marker)
    (run / "latest-rank0.pt").symlink_to("ep0-ba7-rank0.pt")
    recipe = SimpleNamespace(save_folder=str(run), checkpoint=SimpleNamespace(autoresume=True),
                             model=SimpleNamespace(trust_checkpoint=False))
    with pytest.raises(UserError, match=r"save_folder .*ep0-ba7-rank0.pt holds pickled objects \(io.open\).*"
                                        r"model.trust_checkpoint=true"):
        prepare_run_folder(recipe, SimpleNamespace(rank=0))
    assert not marker.exists()
    recipe.model.trust_checkpoint = True  # the user's explicit opt-in for this run
    assert prepare_run_folder(recipe, SimpleNamespace(rank=0)) == (run, str(run / "ep0-ba7-rank0.pt"))


def test_our_loader_state_with_an_empty_array_loads_safely(tmp_path):
    """The elastic loader state holds arrays that are often empty (no positions to skip); pickle protocol 2
    writes an empty array's data as a call of builtins.bytes, which the safe reader must accept."""
    import numpy as np
    import torch

    from modernbert_train.checkpoint.trust import load_composer_state

    path = tmp_path / "ep0-ba1-rank0.pt"
    torch.save({"state": {"callbacks": {"ExactResumeState": {"loader": {"skip": np.asarray([], dtype=np.int64)}}},
                          "model": {"model.w": torch.ones(2)}}}, path)
    state = load_composer_state(path)
    assert state["state"]["callbacks"]["ExactResumeState"]["loader"]["skip"].shape == (0,)

"""Issue 17, findings 10 (run folders) and 11: one writer per run folder, no silent architecture change on
resume, no secret from the environment in any file of a run folder."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modernbert_train.common.errors import UserError
from modernbert_train.run.folder import (LOCK_FILE, STALE_AFTER_S, check_resume_keeps_architecture, lock_run_dir,
                                      release_run_dir)
from modernbert_train.train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
TINY1 = REPO / "yamls/tiny/phase1.yaml"
HOLD = """
import sys, time
from pathlib import Path
from modernbert_train.run.folder import lock_run_dir
lock_run_dir(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture()
def other_holder(tmp_path):
    """Another process (this host) that holds the lock of tmp_path/run, killed -9 on request (no clean-up)."""
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    proc.kill()
    proc.wait()


def _write_lock(run: Path, age_s: float = 0.0, **holder) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    values = {"host": "gpu-z99", "pid": 4321, "started": "2026-01-01 00:00:00 UTC", "slurm_job_id": None,
              "process_start": None, **holder}
    path = run / LOCK_FILE
    path.write_text(json.dumps(values))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_a_second_writer_is_refused_with_the_holder_named_and_a_dead_holder_is_taken_over(other_holder):
    run, proc = other_holder
    holder = json.loads((run / LOCK_FILE).read_text())
    with pytest.raises(UserError) as err:
        lock_run_dir(run)
    message = str(err.value)
    assert f"is in use by pid {proc.pid} on {socket.gethostname()}, since {holder['started']}" in message
    assert "\n" not in message
    proc.send_signal(signal.SIGKILL)  # killed: its lock stays behind
    proc.wait()
    assert (run / LOCK_FILE).exists()
    lock_run_dir(run)  # the pid is dead on this host: taken over
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock_run_dir(run)  # this process again: fine
    release_run_dir(run)
    assert not (run / LOCK_FILE).exists()


def test_locks_of_other_hosts_requeued_jobs_and_silent_holders(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    fresh = tmp_path / "fresh"
    _write_lock(fresh, slurm_job_id="776")  # a manual resubmission (another job) while this one runs
    with pytest.raises(UserError, match=r"in use by pid 4321 on gpu-z99, SLURM job 776, since 2026-01-01"):
        lock_run_dir(fresh)
    requeued = tmp_path / "requeued"
    _write_lock(requeued, slurm_job_id="777")  # this job's earlier incarnation: SLURM ended it before requeue
    lock_run_dir(requeued)
    silent = tmp_path / "silent"
    _write_lock(silent, age_s=STALE_AFTER_S + 60)  # no heartbeat for longer than STALE_AFTER_S
    lock_run_dir(silent)
    for run in (requeued, silent):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
        release_run_dir(run)
    assert json.loads((fresh / LOCK_FILE).read_text())["pid"] == 4321  # untouched


def test_architecture_check_allows_training_only_fields(tmp_path):
    (tmp_path / "model_config.json").write_text(json.dumps({"hidden_size": 64, "attention_dropout": 0.0}))
    check_resume_keeps_architecture(tmp_path, {"hidden_size": 64, "attention_dropout": 0.1})
    with pytest.raises(UserError, match="hidden_size is 64 in .* but 128 now"):
        check_resume_keeps_architecture(tmp_path, {"hidden_size": 128, "attention_dropout": 0.0})


def _recipe(tiny_data, data_overrides, run: Path, *extra: str):
    return load_recipe(TINY1, [*data_overrides(), f"save_folder={run}", "max_duration=2ba", *extra])


def test_trainer_refuses_a_locked_run_folder_and_writes_nothing(tiny_data, data_overrides, other_holder):
    from modernbert_train.train.trainer import build_trainer

    run, proc = other_holder
    with pytest.raises(UserError, match=f"is in use by pid {proc.pid}"):
        build_trainer(_recipe(tiny_data, data_overrides, run))
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]


def test_trainer_resume_keeps_model_config(tiny_data, data_overrides, tmp_path):
    from modernbert_train.train.trainer import build_trainer

    run = tmp_path / "run"
    trainer, _ = build_trainer(_recipe(tiny_data, data_overrides, run))
    trainer.close()
    # The run has a (complete: a whole zip) checkpoint now, so the next build resumes it.
    torch.save({"state": {}}, run / "ep0-ba2-rank0.pt")
    before = {name: (run / name).read_text() for name in ("model_config.json", "config.yaml")}
    with pytest.raises(UserError, match=r"^override 'model.config.num_hidden_layers=2': resuming .* would change "
                                        r"the architecture: num_hidden_layers is 6 in .*model_config.json but 2 now"):
        build_trainer(_recipe(tiny_data, data_overrides, run, "model.config.num_hidden_layers=2"))
    assert {name: (run / name).read_text() for name in before} == before
    release_run_dir(run)


def test_env_interpolations_stay_unresolved_in_config_yaml_and_wandb_config(tmp_path, monkeypatch):
    """Finding 11, the written forms: config.yaml and the wandb config are both recipe.to_yaml()."""
    secret = "sk-live-7f3a9c1e5b2d4f60"
    monkeypatch.setenv("H3_WANDB_SECRET", secret)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(TINY1.read_text() + "\n".join([
        "", "logging:", "  wandb:", "    entity: ${oc.env:H3_WANDB_SECRET}",
        "    tags: [tiny, 'key-${oc.env:H3_WANDB_SECRET}']", ""]))
    recipe = load_recipe(recipe_file, ["run_name=r-${logging.wandb.entity}", "optimizer.lr=${oc.env:H3_LR,0.002}"])
    assert recipe.logging.wandb.entity == secret and recipe.logging.wandb.tags[1] == f"key-{secret}"
    assert recipe.save_folder == f"runs/r-{secret}" and recipe.optimizer.lr == 0.002  # the run sees the values
    written = recipe.to_yaml()
    assert secret not in written
    for line in ("entity: ${oc.env:H3_WANDB_SECRET}", "- key-${oc.env:H3_WANDB_SECRET}",
                 "run_name: r-${logging.wandb.entity}", "save_folder: runs/${run_name}",
                 "lr: ${oc.env:H3_LR,0.002}"):
        assert line in written
    reloaded = tmp_path / "config.yaml"
    reloaded.write_text(written)
    assert load_recipe(reloaded).logging.wandb.tags[1] == f"key-{secret}"  # config.yaml still loads as a recipe


def test_a_secret_in_the_environment_never_lands_in_the_run_folder(tiny_data, data_overrides, tmp_path,
                                                                   monkeypatch):
    """Finding 11: ${oc.env:VAR} was resolved into config.yaml and the wandb config. Here the environment holds
    a private data root; a two-step run with wandb (offline) writes every file it writes, none holds it."""
    from modernbert_train.train.trainer import train

    secret = "sk-live-7f3a9c1e5b2d4f60"
    private_root = tmp_path / secret
    private_root.mkdir()
    (private_root / "tokenizer.json").write_bytes((Path(tiny_data["tokenizer"]) / "tokenizer.json").read_bytes())
    monkeypatch.setenv("H3_PRIVATE_ROOT", str(private_root))
    run = tmp_path / "run"
    recipe = load_recipe(TINY1, [*data_overrides(), f"save_folder={run}", "max_duration=2ba",
                                 "data.tokenizer=${oc.env:H3_PRIVATE_ROOT}/tokenizer.json",
                                 "logging.wandb.enabled=true", "logging.wandb.mode=offline"])
    train(recipe)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".wandb") for p in files) and (run / "latest-rank0.pt").exists()
    assert [str(p.relative_to(run)) for p in files if secret.encode() in p.read_bytes()] == []
    assert "tokenizer: ${oc.env:H3_PRIVATE_ROOT}/tokenizer.json" in (run / "config.yaml").read_text()

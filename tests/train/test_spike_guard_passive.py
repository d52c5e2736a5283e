"""A healthy run is bit-identical with the spike guard on (its defaults) and off, on every shipped tiny recipe.

Phase 1 from scratch, then phases 2 and 3 each from the previous phase's unguarded run, 100 steps each with
few tokens per step (2 rows of 128 tokens in phase 1, 1 row of 512 after). The unguarded runs also record each
step's gradient norm, so the test prints how close healthy steps came to the guard's limits: the margin the
defaults keep (issue 28: a grad-norm limit of 5x the running mean fired on 4 healthy steps of phase 1)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from composer.core import Callback

import modernbert_train.train.trainer as trainer_module
from modernbert_train.train.recipe import load_recipe
from modernbert_train.train.recipe_schema import SpikeGuardConfig

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
STEPS = 100
PHASES = {
    "phase1": ("mix", ["data.micro_batch_size=2", "data.global_batch_size=2", "batch_warmup.start_batch_size=null"]),
    "phase2": ("mix", ["data.global_batch_size=1"]),
    "phase3": ("decay", ["data.global_batch_size=1"]),
}


class GradNorms(Callback):
    """Each step's mean masked loss and gradient norm, as the guard computes them (one process)."""

    def __init__(self):
        self.rows: list[tuple[float, float]] = []
        self._loss = self._masked = 0.0

    def before_train_batch(self, state, logger) -> None:
        self._loss = self._masked = 0.0

    def after_loss(self, state, logger) -> None:
        self._loss += float(state.loss) * int(state.batch["num_masked"])
        self._masked += int(state.batch["num_masked"])

    def after_train_batch(self, state, logger) -> None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in state.model.parameters() if p.grad is not None])
        self.rows.append((self._loss / max(1.0, self._masked), float(norm)))


def train_phase(data_overrides, phase: str, folder: Path, init_from: Path | None, guard: bool, monkeypatch):
    manifest, small = PHASES[phase]
    overrides = data_overrides(manifest) + small + [
        f"save_folder={folder}", f"max_duration={STEPS}ba", f"checkpoint.interval={STEPS}ba", "checkpoint.keep_last=1",
        f"spike_guard.enabled={str(guard).lower()}", f"model.init_from={init_from}" if init_from else "model.init_from=null"]
    if phase != "phase1":
        overrides.append("model.init_optimizer=true")
    recipe = load_recipe(REPO / f"yamls/tiny/{phase}.yaml", overrides)
    norms = GradNorms()
    build = trainer_module.build_trainer

    def build_recording(recipe):
        trainer, run_dir = build(recipe)
        if not guard:
            trainer.state.callbacks.append(norms)
        return trainer, run_dir

    monkeypatch.setattr(trainer_module, "build_trainer", build_recording)
    trainer_module.train(recipe)
    monkeypatch.setattr(trainer_module, "build_trainer", build)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return records, norms.rows


@pytest.fixture(scope="module")
def phase_runs(tiny_data, data_overrides, tmp_path_factory):
    root = tmp_path_factory.mktemp("guard_passive")
    runs = {}
    previous = None
    with pytest.MonkeyPatch.context() as monkeypatch:
        for phase in PHASES:
            off = train_phase(data_overrides, phase, root / f"{phase}-off", previous, False, monkeypatch)
            on = train_phase(data_overrides, phase, root / f"{phase}-on", previous, True, monkeypatch)
            runs[phase] = (off, on)
            previous = root / f"{phase}-off"
    return runs


def closest_approach(rows: list[tuple[float, float]], cfg: SpikeGuardConfig) -> tuple[float, float]:
    """Over the judged steps of a healthy run: the largest loss / loss limit and grad norm / grad-norm limit."""
    from modernbert_train.train.spike_guard import RunningStats

    loss_stats, grad_stats = RunningStats(), RunningStats()
    worst_loss = worst_grad = 0.0
    for loss, norm in rows:
        if loss_stats.count >= cfg.warmup_steps:
            worst_loss = max(worst_loss, loss / loss_stats.limit(cfg.z_threshold, cfg.min_rise))
            worst_grad = max(worst_grad, norm / grad_stats.limit(cfg.z_threshold, cfg.grad_min_rise))
        loss_stats.update(loss, cfg.ema)
        grad_stats.update(norm, cfg.ema)
    return worst_loss, worst_grad


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_healthy_run_is_bit_identical_with_the_guard_on(phase_runs, phase):
    (off, rows), (on, _) = phase_runs[phase]
    assert [r.get("event") for r in on if r.get("event")] == []  # nothing judged a spike
    assert [r["step"] for r in on] == list(range(1, STEPS + 1))
    for key in ("train/loss", "train/masked_accuracy", "lr", "tokens"):
        assert [r[key] for r in on] == [r[key] for r in off], key
    worst_loss, worst_grad = closest_approach(rows, SpikeGuardConfig())
    norms = [norm for _, norm in rows]
    print(f"{phase}: grad norm {min(norms):.3g}-{max(norms):.3g}; closest healthy approach to the limits: "
          f"loss {worst_loss:.2f}, grad norm {worst_grad:.2f} of the limit")
    assert worst_loss < 1.0 and worst_grad < 1.0 and all(math.isfinite(n) for n in norms)

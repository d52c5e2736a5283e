"""Continuing from earlier work: the optimizer state carried into a new phase, the recipe's optimizer settings
on resume (restart_override), a stepped peak lr, and mask-rate schedules that are exact under resume."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from modernbert_train.data.masking import MaskRateSchedule
from modernbert_train.common.errors import UserError
from modernbert_train.train.recipe import load_recipe
from modernbert_train.train.schedule import LRSchedule, WarmupStableDecay

REPO = Path(__file__).resolve().parents[2]


def tiny(data_overrides, *extra, name="phase1"):
    return load_recipe(REPO / f"yamls/tiny/{name}.yaml", data_overrides() + list(extra))


# -- stepped peak lr ------------------------------------------------------------------------------------------
def test_stepped_peak_lr_follows_the_last_step_reached():
    schedule = LRSchedule(WarmupStableDecay(total=1000, warmup=100, decay=200), "tok", 5e-4, [(600, 5e-5)])
    assert schedule.lr_at(50) == pytest.approx(2.5e-4) and schedule.lr_at(599) == pytest.approx(5e-4)
    assert schedule.lr_at(600) == pytest.approx(5e-5) and schedule.lr_at(900) == pytest.approx(5e-5 * (1 - 0.5 ** 0.5))
    schedule.scale = 0.5  # the spike guard's lowering multiplies whatever the peak is
    assert schedule.lr_at(700) == pytest.approx(2.5e-5)


def test_large_phase1_recipe_is_the_authors_run(capsys):
    from modernbert_train.cli.main import main

    recipe = load_recipe(REPO / "yamls/large/phase1.yaml")
    assert recipe.model.init_from == "tile:runs/modernbert-base-phase1"
    assert recipe.optimizer.lr == 5e-4 and [(s.at, s.lr) for s in recipe.scheduler.lr_steps] == [("900_000_000_000tok", 5e-5)]
    assert recipe.spike_guard.enabled
    assert main(["train", str(REPO / "yamls/large/phase1.yaml"), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "init_from: tile:runs/modernbert-base-phase1" in printed and "lr_steps:\n  - at: 900_000_000_000tok" in printed
    assert "spike_guard:\n  enabled: true" in printed
    for phase in ("phase2", "phase3"):
        for folder in ("yamls", "yamls/large"):
            assert load_recipe(REPO / folder / f"{phase}.yaml").model.init_optimizer


@pytest.mark.parametrize("override, message", [
    ("scheduler.lr_steps=[{at: 70ba, lr: 1e-4}]", "scheduler.lr_steps.0.at"),
    ("scheduler.lr_steps=[{at: 10ba, lr: 0}]", "scheduler.lr_steps.0.lr"),
    ("data.mask_schedule={kind: linear, tokens: [1000], rates: []}", "data.mask_schedule.tokens"),
    ("data.mask_schedule={kind: steps}", "data.mask_schedule.kind"),
    ("model.init_optimizer=true", "model.init_optimizer"),
    ("spike_guard={enabled: true, max_consecutive: 0}", "spike_guard.max_consecutive"),
    ("spike_guard={enabled: true, lr_factor: 2}", "spike_guard.lr_factor"),
])
def test_bad_continuation_keys_name_the_key(data_overrides, override, message):
    with pytest.raises(UserError, match=message):
        tiny(data_overrides, override)


# -- optimizer state across phases, settings on resume --------------------------------------------------------
def checkpoint_optimizer(path: Path) -> dict:
    return next(iter(torch.load(path, map_location="cpu", weights_only=False)["state"]["optimizers"].values()))


def test_next_phase_carries_the_optimizer_state_with_this_recipes_settings(trained_tiny_run, data_overrides, tmp_path):
    from modernbert_train.train.trainer import build_trainer

    saved = checkpoint_optimizer(trained_tiny_run / "ep0-ba16-rank0.pt")
    common = [f"model.init_from={trained_tiny_run}", "optimizer.weight_decay=2e-5", "max_duration=4ba"]
    trainer, _ = build_trainer(tiny(data_overrides, *common, "model.init_optimizer=true",
                                    f"save_folder={tmp_path}/carry", name="phase2"))
    optimizer = trainer.state.optimizers[0]
    names = dict(trainer.state.model.named_parameters())
    assert saved["state"].keys() <= names.keys()
    for name, saved_state in saved["state"].items():
        for key, value in saved_state.items():
            carried = optimizer.state[names[name]][key]
            assert carried is None if value is None else torch.equal(carried, value), (name, key)
    # The moments are phase 1's; the settings are phase 2's (weight decay 2e-5, peak lr 2e-3).
    assert saved["param_groups"][0]["weight_decay"] == 1e-5
    assert optimizer.param_groups[0]["weight_decay"] == 2e-5 and optimizer.param_groups[0]["max_lr"] == 2e-3
    trainer.close()
    fresh, _ = build_trainer(tiny(data_overrides, *common, "model.init_optimizer=false",
                                  f"save_folder={tmp_path}/fresh", name="phase2"))
    assert not fresh.state.optimizers[0].state  # weights only: fresh moments
    fresh.close()


@pytest.mark.parametrize("restart_override, expected_decay", [(False, 1e-5), (True, 3e-5)])
def test_restart_override_applies_the_recipes_optimizer_settings_on_resume(trained_tiny_run, data_overrides,
                                                                           tmp_path, restart_override, expected_decay):
    from modernbert_train.train.trainer import build_trainer

    run_dir = tmp_path / "run"
    shutil.copytree(trained_tiny_run, run_dir, symlinks=True)
    trainer, _ = build_trainer(tiny(data_overrides, f"save_folder={run_dir}", "max_duration=20ba",
                                    "batch_warmup.tokens=2000", "optimizer.weight_decay=3e-5",
                                    f"checkpoint.restart_override={str(restart_override).lower()}"))
    assert int(trainer.state.timestamp.batch) == 16  # resumed
    assert trainer.state.optimizers[0].param_groups[0]["weight_decay"] == expected_decay
    assert trainer.state.optimizers[0].state  # the moments are the checkpoint's either way
    trainer.close()


# -- mask-rate schedules --------------------------------------------------------------------------------------
def test_mask_rate_schedules():
    stepped = MaskRateSchedule(0.3, "stepped", (1000.0, 2000.0), (0.15, 0.05))
    assert [stepped(t) for t in (0, 999, 1000, 1999, 5000)] == [0.3, 0.3, 0.15, 0.15, 0.05]
    linear = MaskRateSchedule(0.3, "linear", (1000.0,), (0.1,))
    assert [linear(t) for t in (0, 500, 1000, 9000)] == pytest.approx([0.3, 0.2, 0.1, 0.1])
    assert MaskRateSchedule(0.3)(1e12) == 0.3


def test_loader_masks_at_the_scheduled_rate_and_resumes_exactly(data_overrides):
    from modernbert_train.data.dataset import initialize_distributed
    from modernbert_train.data.manifest import load_manifest
    from modernbert_train.train.builders import build_loader, mask_rate_schedule

    recipe = tiny(data_overrides, "data.mlm_probability=0.3",
                  "data.mask_schedule={kind: stepped, tokens: [3000], rates: [0.05]}", "data.seed=5")
    loader = build_loader(recipe, load_manifest(recipe.data.manifest), initialize_distributed(), infinite=True)
    loader.mask_rate_schedule = mask_rate_schedule(recipe)
    steps, states = [], []
    for _ in range(10):
        states.append(loader.state_dict())
        steps.append(next(loader))

    def masked_fraction(step):
        return sum(mb["num_masked"] for mb in step["micro_batches"]) / sum(mb["num_tokens"] for mb in step["micro_batches"])

    before = [masked_fraction(s) for s in steps if s["tokens_seen_before"] < 3000]
    after = [masked_fraction(s) for s in steps if s["tokens_seen_before"] >= 3000]
    assert before and after
    assert all(0.2 < f < 0.36 for f in before) and all(0.01 < f < 0.1 for f in after), (before, after)
    # Resume from the state before step 4 (inside the 30% part) and before step 8: the same masks.
    for index in (4, 8):
        loader.load_state_dict(states[index])
        for expected in steps[index:]:
            got = next(loader)
            for a, b in zip(got["micro_batches"], expected["micro_batches"]):
                assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_spike_guard_needs_autoresume_to_roll_back(data_overrides):
    with pytest.raises(UserError, match="spike_guard.enabled: .*checkpoint.autoresume=true"):
        tiny(data_overrides, "spike_guard.enabled=true", "checkpoint.autoresume=false")


def test_heldout_evaluation_masks_at_15_percent_with_the_same_masks_for_every_recipe(data_overrides):
    """The paper evaluates at 15% whatever the training rate: two phases with other training rates and seeds
    score the same held-out tokens."""
    from modernbert_train.data.dataset import initialize_distributed
    from modernbert_train.data.manifest import load_manifest
    from modernbert_train.train.builders import build_loader

    def first_micro_batches(*overrides):
        recipe = tiny(data_overrides, *overrides)
        loader = build_loader(recipe, load_manifest(recipe.data.manifest), initialize_distributed(), infinite=False)
        return [micro_batch for _, micro_batch in zip(range(6), loader)]

    phase_a = first_micro_batches("data.mlm_probability=0.3", "seed=17")
    phase_b = first_micro_batches("data.mlm_probability=0.4", "seed=99")
    assert len(phase_a) == len(phase_b) == 6
    for x, y in zip(phase_a, phase_b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    masked, tokens = sum(int(x["num_masked"]) for x in phase_a), sum(int(x["num_tokens"]) for x in phase_a)
    assert 0.12 < masked / tokens < 0.18, masked / tokens
    other_rate = first_micro_batches("eval.mlm_probability=0.3")
    assert sum(int(x["num_masked"]) for x in other_rate) > 1.5 * masked

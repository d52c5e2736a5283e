"""The loss-spike guard on real tiny runs.

A test hook multiplies the lr by 300 for the step that reads a known data window (the poisoned batch): its
update wrecks the weights, so the next steps spike. With the guard, three spikes in a row roll the run back to
the newest good checkpoint, skip that data window, halve the lr and the run ends where a clean run does;
without it the run ends far worse. A run without spikes is bit-identical with the guard on and off.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from composer.core import Callback

import modernbert_train.train.trainer as trainer_module
from modernbert_train.train.recipe import load_recipe
from modernbert_train.train.spike_guard import RunningStats, SpikeGuard, read_rollbacks

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
POISONED_STEP = 14
GUARD = ["spike_guard.enabled=true", "spike_guard.warmup_steps=8", "spike_guard.lr_factor=0.5"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps_of(records: list[dict]) -> list[dict]:
    return [r for r in records if "event" not in r]


class PoisonLr(Callback):
    """After the schedule set the lr, multiply it for any step whose data starts inside [start, end) tokens."""

    def __init__(self, start: int, end: int, factor: float = 300.0):
        self.start, self.end, self.factor = start, end, factor

    def batch_start(self, state, logger) -> None:
        if self.start <= state.batch["tokens_seen_before"] < self.end:
            for group in state.optimizers[0].param_groups:
                group["lr"] *= self.factor


class CrashAt(Callback):
    """Kills the run (once) at the start of step `step` + 1, like a preemption after checkpoint `step`."""

    def __init__(self, step: int):
        self.step, self.fired = step, False

    def batch_start(self, state, logger) -> None:
        if int(state.timestamp.batch) == self.step and not self.fired:
            self.fired = True
            raise KeyboardInterrupt("simulated preemption")


def run(data_overrides, save_folder: Path, extra: list[str], poison: tuple[int, int] | None, monkeypatch,
        hooks: list[Callback] = ()):
    recipe = load_recipe(REPO / "yamls/tiny/phase1.yaml", data_overrides() + [
        f"save_folder={save_folder}", "checkpoint.interval=4ba", "checkpoint.keep_last=-1",
        "batch_warmup.tokens=2000", "scheduler.warmup=4ba", *extra])
    build = trainer_module.build_trainer

    def build_with_poison(recipe):
        trainer, run_dir = build(recipe)
        if poison is not None:
            trainer.state.callbacks.append(PoisonLr(*poison))
        trainer.state.callbacks.extend(hooks)
        return trainer, run_dir

    monkeypatch.setattr(trainer_module, "build_trainer", build_with_poison)
    try:
        trainer_module.train(recipe)
    except KeyboardInterrupt:
        monkeypatch.setattr(trainer_module, "build_trainer", build)
        return run(data_overrides, save_folder, extra, poison, monkeypatch)  # relaunch: autoresume
    return read_metrics(save_folder)


@pytest.fixture(scope="module")
def clean_runs(tiny_data, data_overrides, tmp_path_factory):
    root = tmp_path_factory.mktemp("spike_clean")
    with pytest.MonkeyPatch.context() as monkeypatch:
        off = run(data_overrides, root / "off", ["max_duration=28ba"], None, monkeypatch)
        on = run(data_overrides, root / "on", ["max_duration=28ba", *GUARD], None, monkeypatch)
    return off, on


def test_a_run_without_spikes_is_bit_identical_with_the_guard_on(clean_runs):
    off, on = clean_runs
    assert [r["step"] for r in on] == list(range(1, 29))  # no event lines: nothing was judged a spike
    for key in ("train/loss", "train/masked_accuracy", "lr", "tokens"):
        assert [r[key] for r in on] == [r[key] for r in off], key


@pytest.fixture(scope="module")
def poisoned_runs(clean_runs, data_overrides, tmp_path_factory):
    clean, _ = clean_runs
    root = tmp_path_factory.mktemp("spike_poisoned")
    window = (clean[POISONED_STEP - 2]["tokens"], clean[POISONED_STEP - 1]["tokens"])  # step 14's data
    with pytest.MonkeyPatch.context() as monkeypatch:
        unguarded = run(data_overrides, root / "unguarded", ["max_duration=28ba"], window, monkeypatch)
        guarded = run(data_overrides, root / "guarded", ["max_duration=28ba", *GUARD], window, monkeypatch)
    return window, unguarded, guarded, root


def test_a_poisoned_batch_is_rolled_back_with_the_guard_and_degrades_the_run_without(clean_runs, poisoned_runs):
    clean, _ = clean_runs
    _, unguarded, guarded, root = poisoned_runs

    # The poisoned update shows as a loss spike on the next step.
    assert unguarded[POISONED_STEP]["train/loss"] > clean[POISONED_STEP]["train/loss"] + 2
    # With the guard: spikes at 15, 16, 17 skipped, then a rollback to the checkpoint of step 12 (13 and later
    # were written after the bad update), the data of steps 13..17 skipped and the lr halved from then on.
    rollbacks = [r for r in guarded if r.get("event") == "rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0]["step"] == 12 and rollbacks[0]["spike_steps"] == [15, 16, 17]
    assert rollbacks[0]["skipped_steps"] == 5 and rollbacks[0]["lr_scale"] == 0.5
    assert read_rollbacks(root / "guarded")[0].to_step == 12
    assert (root / "guarded" / "rolled_back" / "ep0-ba16-rank0.pt").exists()
    steps = steps_of(guarded)
    assert [r["step"] for r in steps] == list(range(1, 29))
    assert steps[12]["lr"] == pytest.approx(clean[12]["lr"] * 0.5)
    # The data after the skipped window: step 13 now reads what step 18 read in the clean run.
    assert steps[12]["tokens"] - steps[11]["tokens"] == clean[17]["tokens"] - clean[16]["tokens"]

    def tail(records):
        return sum(r["train/loss"] for r in records[-4:]) / 4

    print(f"last-4 mean loss: clean {tail(clean):.3f}, guarded {tail(steps):.3f}, unguarded {tail(unguarded):.3f}")
    assert tail(steps) < tail(clean) + 0.25
    assert tail(unguarded) > tail(clean) + 0.5

    # The report lists the rollback.
    from modernbert_train.run.report import write_report
    report = write_report([root / "guarded"], root / "report").read_text()
    assert "## Loss-spike guard" in report
    assert "| rollback | after spikes at steps 15, 16, 17: restarted from step 12, skipped the data of 5 steps" in report


def test_a_preempted_guarded_run_decides_exactly_as_an_uninterrupted_one(poisoned_runs, data_overrides, tmp_path,
                                                                         monkeypatch):
    """Preempted after the checkpoint of step 16, with two spikes (15, 16) already counted: the resumed run must
    remember them (the guard's state is in the checkpoint) and roll back at step 17, as the uninterrupted one."""
    window, _, guarded, _ = poisoned_runs
    resumed = run(data_overrides, tmp_path / "preempted", ["max_duration=28ba", *GUARD], window, monkeypatch,
                  hooks=[CrashAt(16)])
    assert [r.get("event") for r in resumed] == [r.get("event") for r in guarded]
    for key in ("step", "train/loss", "lr", "tokens", "spike_steps"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in guarded], key


def test_guard_statistics_are_checkpointed():
    stats = RunningStats()
    for value in (5.0, 4.8, 4.9, 4.7):
        stats.update(value, 0.9)
    guard = SpikeGuard.__new__(SpikeGuard)
    guard.loss_stats, guard.grad_stats, guard.streak = stats, RunningStats(2.0, 0.1, 4), [7]
    restored = SpikeGuard.__new__(SpikeGuard)
    restored.load_state_dict(guard.state_dict())
    assert (restored.loss_stats, restored.grad_stats, restored.streak) == (stats, RunningStats(2.0, 0.1, 4), [7])
    # 6 sigma or +20% of the mean, whichever is larger.
    assert stats.limit(6.0, 0.2) == pytest.approx(stats.mean + max(6 * stats.var ** 0.5, 0.2 * stats.mean))

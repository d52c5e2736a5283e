"""The loss-spike guard on real tiny runs.

A test hook multiplies the lr by 300 for the step that reads a known data window (the poisoned batch): its
update wrecks the weights, so the next steps spike. With the guard, three spikes in a row roll the run back to
the newest good checkpoint, skip that data window, halve the lr and the run ends where a clean run does;
without it the run ends far worse. Also here: the guard judges the gradient norm before clipping, adds no
host read to a step, and picks a restart step that the guard had judged. Nested rollbacks: test_rollback_loop.
"""
from __future__ import annotations

import contextlib
import re
import json
from pathlib import Path

import pytest
from composer.core import Callback
import torch

import modernbert_train.train.trainer as trainer_module
from modernbert_train.train.recipe import load_recipe
from modernbert_train.train.recipe_schema import SpikeGuardConfig
from modernbert_train.train.spike_guard import RunningStats, SpikeGuard, choose_restart, read_rollbacks

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
    # The host learns of the streak at step 18, so the window runs through loader step 18 (never read again).
    assert rollbacks[0]["skipped_loader_steps"] == [13, 18]
    assert "loss rule: loss" in rollbacks[0]["reason"]
    assert read_rollbacks(root / "guarded")[0].to_step == 12
    assert (root / "guarded" / "rolled_back" / "ep0-ba16-rank0.pt").exists()
    steps = steps_of(guarded)
    assert [r["step"] for r in steps] == list(range(1, 29))
    assert steps[12]["lr"] == pytest.approx(clean[12]["lr"] * 0.5)
    # The data after the skipped window: step 13 now reads what step 19 read in the clean run.
    assert steps[12]["tokens"] - steps[11]["tokens"] == clean[18]["tokens"] - clean[17]["tokens"]

    def tail(records):
        return sum(r["train/loss"] for r in records[-4:]) / 4

    print(f"last-4 mean loss: clean {tail(clean):.3f}, guarded {tail(steps):.3f}, unguarded {tail(unguarded):.3f}")
    assert tail(steps) < tail(clean) + 0.25
    assert tail(unguarded) > tail(clean) + 0.5

    # The report lists the rollback.
    from modernbert_train.run.report import write_report
    report = write_report([root / "guarded"], root / "report").read_text()
    assert "## Loss-spike guard" in report
    row = next(line for line in report.splitlines() if "| rollback 1 |" in line)
    assert ("| rollback 1 | after spikes at steps 15, 16, 17: restarted from step 12, skipped loader steps 13-18, "
            "lr x 0.5 (step 15 ") in row
    # The rule that fired and the figures it compared (which rule depends on how the poison lands in the data).
    assert re.search(r"step 15 (non-finite \(loss|loss rule: loss [0-9.]+ > limit [0-9.]+|grad-norm rule)", row), row


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


def test_guard_statistics_are_checkpointed(tmp_path):
    from modernbert_train.train.metrics_file import MetricsFile

    stats = RunningStats()
    for value in (5.0, 4.8, 4.9, 4.7):
        stats.update(value, 0.9)
    guard = SpikeGuard(SpikeGuardConfig(), tmp_path, MetricsFile(tmp_path / "m.jsonl"), None, None)
    guard.loss_stats, guard.grad_stats, guard.streak, guard.judged_from = stats, RunningStats(2.0, 0.1, 4), [7], 5
    restored = SpikeGuard(SpikeGuardConfig(), tmp_path, MetricsFile(tmp_path / "m.jsonl"), None, None)
    restored.load_state_dict(guard.state_dict())
    assert (restored.loss_stats, restored.grad_stats, restored.streak) == (stats, RunningStats(2.0, 0.1, 4), [7])
    assert restored.judged_from == 5
    # 6 sigma or +20% of the mean, whichever is larger.
    assert stats.limit(6.0, 0.2) == pytest.approx(stats.mean + max(6 * stats.var ** 0.5, 0.2 * stats.mean))


def test_a_rollback_restarts_from_a_judged_checkpoint_or_the_initial_weights():
    # The newest checkpoint two steps before the first spike, at or after the first judged step.
    assert choose_restart([4, 8, 12, 16], first_spike=15, judged_from=9, warmup_steps=8) == 12
    assert choose_restart([4, 8, 12, 16], first_spike=14, judged_from=9, warmup_steps=8) == 12
    # Checkpoints only inside the unjudged warm-up (issue 28: junk there went unjudged): the initial weights.
    assert choose_restart([4, 8], first_spike=11, judged_from=9, warmup_steps=8) == 0
    assert choose_restart([4, 8], first_spike=6, judged_from=None, warmup_steps=8) == 0  # a NaN in the warm-up
    # Judging had long begun and no checkpoint is left before the streak: nothing safe to go back to.
    assert choose_restart([40, 48], first_spike=41, judged_from=9, warmup_steps=8) is None


class GradientSpike(Callback):
    """Multiplies every gradient by `factor` after the backward pass of step `step` (loss unchanged)."""

    def __init__(self, step: int, factor: float = 1e4):
        self.step, self.factor = step, factor

    def after_backward(self, state, logger) -> None:
        if int(state.timestamp.batch) + 1 == self.step:
            for param in state.model.parameters():
                if param.grad is not None:
                    param.grad.mul_(self.factor)


def test_the_guard_judges_the_gradient_norm_before_clipping(data_overrides, tmp_path, monkeypatch):
    """With GradientClipping on, the guard still sees a gradient spike: it runs before clipping on
    AFTER_TRAIN_BATCH (composer runs algorithms in reverse list order on "after" events)."""
    from modernbert_train.train.builders import ALGORITHM_ORDER

    assert ALGORITHM_ORDER.index("SpikeGuard") > ALGORITHM_ORDER.index("GradientClipping")
    records = run(data_overrides, tmp_path / "clipped", [
        "max_duration=7ba", "checkpoint.interval=7ba", "optimizer.grad_clip_norm=1.0", "spike_guard.enabled=true",
        "spike_guard.warmup_steps=3", "data.max_seq_len=64", "data.micro_batch_size=2", "data.global_batch_size=2",
        "batch_warmup.start_batch_size=null"], None, monkeypatch, hooks=[GradientSpike(6)])
    events = [r for r in records if r.get("event") == "spike_skipped"]
    assert [r["step"] for r in events] == [6], events
    assert events[0]["rule"] == "grad-norm"
    # The norm judged is the unclipped one: thousands of times the clipping threshold.
    assert events[0]["spike/grad_norm"] > 1000 * 1.0 and events[0]["spike/grad_norm_limit"] < 1000


def _fake_step(guard, model, step: int, loss_scale: float, guarded):
    """One step's events as composer calls them, on a real model's real gradients; the guard's own work runs
    inside `guarded()`."""
    from types import SimpleNamespace

    from composer.core import Event

    from tests.train.test_composer_model import packed_micro_batch

    batch = packed_micro_batch([40, 30, 20], 128, 0.3, seed=step)
    state = SimpleNamespace(model=model, timestamp=SimpleNamespace(batch=step - 1, token=100 * (step - 1)),
                            batch={"loader_step": step}, loss=None)
    with guarded():
        guard.apply(Event.BATCH_START, state, None)
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], cu_seqlens=batch["cu_seqlens"], max_seqlen=batch["max_seqlen"],
                labels=batch["labels"])
    state.batch, state.loss = batch, out.loss * loss_scale
    with guarded():
        guard.apply(Event.AFTER_LOSS, state, None)
    state.loss.backward()
    with guarded():
        guard.apply(Event.AFTER_TRAIN_BATCH, state, None)


def test_a_guarded_step_reads_no_device_value_on_the_host(tmp_path, monkeypatch):
    """The guard's decision stays on the device: during a step it reads back only its own host copy of the
    previous step's figures (a non-blocking copy on a GPU). Every other Tensor read on the host raises."""
    from tests.train.test_composer_model import make_model
    from tests.train.test_metrics_sync_free import HostRead, no_host_reads

    from modernbert_train.train.metrics_file import MetricsFile

    model = make_model()
    cfg = SpikeGuardConfig(enabled=True, warmup_steps=3)
    guard = SpikeGuard(cfg, tmp_path, MetricsFile(tmp_path / "metrics.jsonl"), None, None)
    copies: list[torch.Tensor] = []
    to_host = guard._to_host

    def recording_to_host(*args):
        pending = to_host(*args)
        copies.append(pending.host)
        return pending

    monkeypatch.setattr(guard, "_to_host", recording_to_host)
    reads = []
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "__bool__", "__float__")}

    def allow_copies(name):
        def method(self, *args, **kwargs):
            if not any(self is copy for copy in copies):
                raise HostRead(f"host read of a tensor: {name}")
            reads.append(name)
            return originals[name](self, *args, **kwargs)
        return method

    @contextlib.contextmanager
    def guarded():
        with no_host_reads():
            for name in originals:
                setattr(torch.Tensor, name, allow_copies(name))
            yield

    for step in range(1, 7):
        _fake_step(guard, model, step, 50.0 if step == 6 else 1.0, guarded)
    assert reads == ["tolist"] * 5  # steps 2..6 each read the step before's copy, nothing else
    # Step 6's huge loss was judged a spike on the device: its gradients are zero, before any host read.
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.grad is not None)
    guard.state_dict()  # at a checkpoint the host reads the last step: the spike is counted
    assert guard.streak == [6]


def test_the_healthy_gradient_norms_of_issue_28_are_not_spikes_under_the_defaults():
    """Issue 28: on the shipped tiny recipe the unguarded loss never rose more than 5%, yet the defaults of its
    filing skipped 4 updates on the gradient-norm rule alone (norms 69, 40, 85 and 12 against a limit of about
    8.8, i.e. a running mean near 1.76). The same figures, fed through the guard's statistics, stay below the
    limit of today's defaults (the loss rule still judges such steps)."""
    from modernbert_train.train.recipe_schema import SpikeGuardConfig
    from modernbert_train.train.spike_guard import RunningStats

    cfg = SpikeGuardConfig()
    stats = RunningStats()
    fired = []
    norms = [1.76] * cfg.warmup_steps + [69.0, 1.8, 40.0, 1.7, 85.0, 1.75, 12.0, 1.76]
    for step, norm in enumerate(norms, start=1):
        if stats.count >= cfg.warmup_steps and norm > stats.limit(cfg.z_threshold, cfg.grad_min_rise):
            fired.append((step, norm))
            continue  # a spike is not accepted into the statistics
        stats.update(norm, cfg.ema)
    assert fired == []
    # The filing's rule (a 4.0 minimum rise) fired on exactly these steps.
    old = RunningStats()
    old_fired = []
    for step, norm in enumerate(norms, start=1):
        if old.count >= cfg.warmup_steps and norm > old.limit(cfg.z_threshold, 4.0):
            old_fired.append(norm)
            continue
        old.update(norm, cfg.ema)
    assert old_fired == [69.0, 40.0, 85.0, 12.0]

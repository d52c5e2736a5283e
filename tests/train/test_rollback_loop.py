"""Rollbacks that compose, over a poisoned stream, through the real train() loop (tiny preset, 64-token rows).

Junk sits at known loader steps (positions in the data stream): a test algorithm multiplies the loss of any
step reading them by 30, as documents of garbage would. Three junk blocks of three steps each make three
rollbacks; the second and third restart from a checkpoint EARLIER than the first rollback's, so only windows
kept in stream positions (not counted from the restarted run) keep the first block unread. The test counts
every (sample id, piece, epoch) each attempt reads: no junk piece is read twice, the lr ends at the product
of the factors, metrics.jsonl and the report keep every rollback, and every attempt's trainer is gone (no
live reference, its shard cache folder removed) before the next one trains.
"""
from __future__ import annotations

import gc
import json
import weakref
from collections import Counter
from pathlib import Path

import pytest
from composer.core import Algorithm, Callback, Event

import modernbert_train.data.dataset as dataset_module
import modernbert_train.train.trainer as trainer_module
from modernbert_train.train.recipe import load_recipe
from modernbert_train.train.spike_guard import read_rollbacks

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
# Loader steps of the junk blocks. Checkpoints every 2 steps, judging from step 5 (warmup_steps=4):
#   attempt 1 reads 1..14 (spikes 11-13, the host sees the streak at 14): back to step 8, skip 9-14;
#   attempt 2 reads 15.. at steps 9..: spikes 9-11, back to step 6 (< 8), skip 7-18;
#   attempt 3 reads 19.. at steps 7..: spikes 9-11 (21-23), back to step 6, skip 7-24; attempt 4 ends clean.
JUNK = ((11, 12, 13), (15, 16, 17), (21, 22, 23))
RECIPE = ["max_duration=14ba", "checkpoint.interval=2ba", "checkpoint.keep_last=-1", "data.max_seq_len=64",
          "data.micro_batch_size=2", "data.global_batch_size=2", "batch_warmup.start_batch_size=null",
          "scheduler.warmup=2ba", "data.loader_options.return_provenance=true", "spike_guard.enabled=true",
          "spike_guard.warmup_steps=4", "spike_guard.lr_factor=0.5", "spike_guard.max_rollbacks=3"]


class JunkLoss(Algorithm):
    """Listed after the guard, so on AFTER_LOSS (an "after" event, run in reverse) it acts before the guard reads."""

    def __init__(self, junk: set[int]):
        self.junk, self.loader_step = junk, None

    def match(self, event, state) -> bool:
        return event in (Event.BATCH_START, Event.AFTER_LOSS)

    def apply(self, event, state, logger) -> None:
        if event == Event.BATCH_START:
            self.loader_step = state.batch["loader_step"]
        elif self.loader_step in self.junk:
            state.loss = state.loss * 30.0


class Reads(Callback):
    """Every piece each trained step reads, per attempt."""

    def __init__(self, attempt: int, log: list):
        self.attempt, self.log = attempt, log

    def batch_start(self, state, logger) -> None:
        pieces = [(int(s), int(p), int(e)) for mb in state.batch["micro_batches"]
                  for s, p, e in zip(mb["sample_ids"], mb["piece_indices"], mb["epochs"])]
        self.log.append((self.attempt, int(state.timestamp.batch) + 1, int(state.batch["loader_step"]), pieces))


def run_poisoned(data_overrides, save_folder: Path, blocks, monkeypatch) -> dict:
    junk = {step for block in blocks for step in block}
    recipe = load_recipe(REPO / "yamls/tiny/phase1.yaml", data_overrides() + [f"save_folder={save_folder}", *RECIPE])
    build = trainer_module.build_trainer
    reads: list = []
    trainers: list[weakref.ref] = []
    states: list[weakref.ref] = []
    caches: list[list[str]] = []
    release = dataset_module.release_shard_caches

    def build_poisoned(recipe):
        trainer, run_dir = build(recipe)
        trainer.state.algorithms.append(JunkLoss(junk))
        trainer.state.callbacks.append(Reads(len(trainers) + 1, reads))
        trainers.append(weakref.ref(trainer))
        states.append(weakref.ref(trainer.state.model))
        return trainer, run_dir

    def release_recorded(dataset):
        removed = release(dataset)
        caches.append(list(removed))
        # The attempt that just ended is the newest; every earlier trainer must be gone by now.
        gc.collect()
        alive.append([ref() is not None for ref in trainers[:-1] + states[:-1]])
        return removed

    alive: list[list[bool]] = []
    monkeypatch.setattr(trainer_module, "build_trainer", build_poisoned)
    monkeypatch.setattr(dataset_module, "release_shard_caches", release_recorded)
    trainer_module.train(recipe)
    gc.collect()
    lines = [json.loads(line) for line in (save_folder / "metrics.jsonl").read_text().splitlines()]
    return {"run_dir": save_folder, "reads": reads, "trainers": trainers, "states": states, "caches": caches, "alive": alive, "metrics": lines,
            "junk_steps": junk}


def junk_pieces(result) -> set:
    return {piece for _, _, loader_step, pieces in result["reads"] if loader_step in result["junk_steps"]
            for piece in pieces}


@pytest.fixture(scope="module")
def three(data_overrides, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_poisoned(data_overrides, tmp_path_factory.mktemp("rollbacks3") / "run", JUNK, monkeypatch)


@pytest.fixture(scope="module")
def two(data_overrides, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_poisoned(data_overrides, tmp_path_factory.mktemp("rollbacks2") / "run", JUNK[:2], monkeypatch)


@pytest.mark.parametrize("name, restarts, lr_scale", [("two", [8, 6], 0.25), ("three", [8, 6, 6], 0.125)])
def test_nested_rollbacks_never_reread_junk_and_multiply_the_lr(name, restarts, lr_scale, request):
    result = request.getfixturevalue(name)
    rollbacks = [r for r in result["metrics"] if r.get("event") == "rollback"]
    print(name, [(r["step"], r["spike_steps"], r["skipped_loader_steps"], r["lr_scale"]) for r in rollbacks])
    assert [r["step"] for r in rollbacks] == restarts
    # Every junk piece was read by exactly one step of one attempt: no rollback returned to data before a
    # window it had already skipped.
    counts = Counter(piece for _, _, loader_step, pieces in result["reads"] for piece in pieces
                     if piece in junk_pieces(result))
    assert counts and max(counts.values()) == 1, counts.most_common(3)
    # No loader step inside any window was read after the rollback that skipped it.
    for number, rollback in enumerate(rollbacks, start=1):
        first, last = rollback["skipped_loader_steps"]
        later = [step for attempt, _, step, _ in result["reads"] if attempt > number and first <= step <= last]
        assert later == [], (number, later)
    # The lr of the last attempt is the recipe's (constant after warmup) times every factor.
    steps = [r for r in result["metrics"] if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 15))
    assert steps[-1]["lr"] == pytest.approx(3.0e-3 * lr_scale, rel=1e-9)
    assert [r["lr_scale"] for r in rollbacks] == pytest.approx([0.5 ** n for n in range(1, len(restarts) + 1)])


def test_every_rollback_is_in_metrics_and_the_report(three, tmp_path):
    from modernbert_train.run.report import write_report

    events = [r for r in three["metrics"] if r.get("event")]
    assert [r["rollback"] for r in events if r["event"] == "rollback"] == [1, 2, 3]
    assert len([r for r in events if r["event"] == "spike_skipped"]) == 9  # 3 streaks of 3, none dropped
    assert all("loss" in r["rule"] for r in events if r["event"] == "spike_skipped")
    report = write_report([three["run_dir"]], tmp_path / "report").read_text()
    rows = [line for line in report.splitlines() if "| rollback " in line]
    assert len(rows) == 3, rows
    assert "restarted from step 8" in rows[0] and "restarted from step 6" in rows[2]
    assert "loss rule: loss" in rows[0]
    assert len([line for line in report.splitlines() if "update skipped" in line]) == 9
    assert len(read_rollbacks(three["run_dir"])) == 3


def test_each_rollback_releases_the_attempts_trainer(three):
    """Issue 22: the loop keeps no reference to an ended attempt's trainer, and removes its shard caches."""
    assert len(three["trainers"]) == 4  # three rollbacks, four attempts
    assert all(ref() is None for ref in three["trainers"] + three["states"])  # the trainer and its model
    # At each release, every earlier attempt's trainer was already collected.
    assert all(not any(flags) for flags in three["alive"])
    removed = [folder for batch in three["caches"] for folder in batch]
    assert removed and all(not Path(folder).exists() for folder in removed)

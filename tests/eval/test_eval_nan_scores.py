"""Issue 24: a diverged fine-tuning run scores NaN, and `max` / `>` never replace a NaN once held, so it could be
kept as the best epoch, the best grid point and the models a later task starts from. A number beats NaN now."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from modernbert_train.eval import classify
from modernbert_train.eval.runner import _ChosenModels, run_suite
from modernbert_train.eval.suite import load_suite

NAN = float("nan")


def test_a_number_always_beats_nan_and_nan_never_wins():
    from modernbert_train.eval.metrics import beats, rank_key

    assert beats(0.1, None) and beats(0.1, NAN) and beats(-5.0, NAN)
    assert not beats(NAN, 0.1) and not beats(NAN, NAN) and not beats(0.1, 0.2)
    assert max([NAN, 0.3, 0.7], key=rank_key) == 0.7 and rank_key(NAN) == -math.inf


def test_the_models_a_later_task_starts_from_are_never_a_nan_points():
    chosen = _ChosenModels(enabled=True)
    for score, model in ((NAN, "diverged"), (0.4, "fine"), (NAN, "diverged again")):
        chosen.add(0, score, model)
        chosen.end_point()
    assert chosen.models == {0: "fine"} and chosen.best == 0.4


def test_a_diverged_epoch_and_grid_point_are_not_chosen(tmp_path, toy_tasks, hf_folder, monkeypatch):
    """Two grid points x 2 epochs on the toy task; the dev scores are scripted: the first point diverges
    (NaN both epochs), the second's first epoch too. Before: epoch 1 of point 1 was chosen, reported NaN."""
    spec = {"name": "nan", "tasks": [{
        "name": "topic", "type": "classification", "max_length": 32, "metrics": ["accuracy"],
        "data": {"train": f"{toy_tasks}/cls/train.jsonl", "dev": f"{toy_tasks}/cls/dev.jsonl",
                 "columns": {"text": "sentence", "label": "topic"}},
        "sweep": {"lr": [3e-3, 1e-3], "epochs": [2], "batch_size": 32, "seeds": [0]}}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(spec))
    scripted = iter([NAN, NAN, NAN, 0.7])
    monkeypatch.setattr(classify, "score", lambda task, logits, labels: {"accuracy": next(scripted)})
    [summary] = run_suite(load_suite(path), [str(hf_folder)], tmp_path / "out", device="cpu", progress_mode="none")
    assert summary.chosen["lr"] == 1e-3 and summary.metric_means["accuracy"] == pytest.approx(0.7)
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [(r["lr"], r["best_epoch"]) for r in runs] == [(3e-3, 1), (1e-3, 2)]

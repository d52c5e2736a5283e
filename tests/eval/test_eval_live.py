"""Live evaluation during pretraining: scores land in metrics.jsonl, the report shows them, and training's
losses are the same as without it (the evaluation never touches training's random state)."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from modernbert_train.errors import UserError
from modernbert_train.report import write_report
from modernbert_train.train.recipe import load_recipe
from modernbert_train.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _live_suite(tmp_path, toy_tasks):
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump({"name": "live", "tasks": [
        {"name": "topic", "type": "classification", "max_length": 32,
         "data": {"train": f"{toy_tasks}/cls/train.jsonl", "dev": f"{toy_tasks}/cls/dev.jsonl",
                  "columns": {"text": "sentence", "label": "topic"}},
         "sweep": {"lr": [3e-3], "epochs": [1], "batch_size": 32, "seeds": [0]}},
        {"name": "mlm", "type": "mlm", "data": {"train": f"{toy_tasks}/heldout.jsonl"}}]}))
    return path


def test_live_evaluation_logs_scores_and_leaves_training_unchanged(tmp_path, toy_tasks, data_overrides):
    def run(name, *extra):
        recipe = load_recipe(REPO / "yamls/tiny/phase1.yaml", data_overrides() + [
            f"save_folder={tmp_path / name}", "max_duration=4ba", "checkpoint.interval=4ba", *extra])
        train(recipe)
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    suite = _live_suite(tmp_path, toy_tasks)
    live = run("live", f"eval.suite={suite}", "eval.suite_interval=2ba")
    plain = run("plain")
    scores = [r for r in live if "live_eval/mlm/loss" in r]
    assert [r["step"] for r in scores] == [2, 4]
    assert all(0 <= r["live_eval/topic/accuracy"] <= 1 and r["live_eval/mlm/loss"] > 0 for r in scores)
    assert [r["train/loss"] for r in live if "train/loss" in r] == [r["train/loss"] for r in plain]

    # --model accepts the run directory (newest checkpoint) and a checkpoint file alike.
    from modernbert_train.checkpoints import latest_checkpoint
    from modernbert_train.eval.models import load_eval_model

    by_dir = load_eval_model(str(tmp_path / "live"))
    by_file = load_eval_model(str(latest_checkpoint(tmp_path / "live")))
    assert by_dir.step == by_file.step == 4 and by_dir.tokenizer_file.name == "tokenizer.json"
    assert all(torch.equal(by_dir.weights[k], by_file.weights[k]) for k in by_dir.weights)

    report = write_report([tmp_path / "live"], tmp_path / "report")
    assert (tmp_path / "report" / "live_eval.png").stat().st_size > 5000
    assert "Downstream evaluation" in report.read_text() and "mlm/loss" in report.read_text()


def test_bad_live_suite_fails_before_training(tmp_path, data_overrides):
    recipe = load_recipe(REPO / "yamls/tiny/phase1.yaml", data_overrides() + [
        f"save_folder={tmp_path / 'r'}", "max_duration=2ba", f"eval.suite={tmp_path / 'missing.yaml'}"])
    with pytest.raises(UserError, match=r"eval.suite: suite file .*missing.yaml does not exist"):
        train(recipe)

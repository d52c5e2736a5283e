"""Live evaluation during pretraining: scores land in metrics.jsonl, the report shows them, and training's
losses are the same as without it (the evaluation never touches training's random state)."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from modernbert_train.common.errors import UserError
from modernbert_train.run.report import write_report
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
    # At every checkpoint (every 2 steps here; checkpoints change nothing in training).
    live = run("live", f"eval.suite={suite}", "eval.suite_interval=checkpoint", "checkpoint.interval=2ba")
    plain = run("plain")
    scores = [r for r in live if "live_eval/mlm/loss" in r]
    assert [r["step"] for r in scores] == [2, 4]
    assert all(0 <= r["live_eval/topic/accuracy"] <= 1 and r["live_eval/mlm/loss"] > 0 for r in scores)
    assert [r["train/loss"] for r in live if "train/loss" in r] == [r["train/loss"] for r in plain]

    # --model accepts the run directory (newest checkpoint) and a checkpoint file alike.
    from modernbert_train.checkpoint import latest_checkpoint
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


def test_report_plots_a_real_eval_run_as_grouped_bars(tmp_path, toy_tasks, hf_folder):
    """`modernbert-train eval` on two models (pretrained-ish and random init), then `report --eval`: eval.png's
    bars are the results.json means, with std error bars where there are several seeds."""
    import math

    import matplotlib.image
    import matplotlib.pyplot as plt

    from modernbert_train.cli.main import main
    from modernbert_train.run.plots import eval_figure, eval_tick_label
    from tests.run.test_report import EXPECTED_PNG_SHAPE, drawn_eval_bars

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "plot", "tasks": [
        {"name": "topic", "type": "classification", "max_length": 32, "metrics": ["accuracy", "matthews"],
         "data": {"train": f"{toy_tasks}/cls/train.jsonl", "dev": f"{toy_tasks}/cls/dev.jsonl",
                  "test": f"{toy_tasks}/cls/test.jsonl", "columns": {"text": "sentence", "label": "topic"}},
         "sweep": {"lr": [3e-3], "epochs": [1], "batch_size": 32, "seeds": [0, 1]}},
        {"name": "mlm", "type": "mlm", "data": {"train": f"{toy_tasks}/heldout.jsonl"}}]}))
    assert main(["eval", str(suite), "--model", str(hf_folder), "--model", f"random:{hf_folder}",
                 "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens": 64 * s, "train/loss": 6 - s / 4})
                                                   + "\n" for s in range(1, 5)))
    assert main(["report", str(run_dir), "--eval", str(tmp_path / "eval"), "--out", str(tmp_path / "report")]) == 0

    assert matplotlib.image.imread(tmp_path / "report" / "eval.png").shape[:2] == EXPECTED_PNG_SHAPE
    assert "](eval.png)" in (tmp_path / "report" / "report.md").read_text()
    assert "<img src='eval.png'" in (tmp_path / "report" / "report.html").read_text()
    summary = json.loads((tmp_path / "eval" / "results.json").read_text())["summary"]
    fig = eval_figure(summary, "plot")
    drawn = drawn_eval_bars(fig)
    plt.close(fig)
    expected = {(eval_tick_label(s["task"], m), s["model"]): (mean, s["metric_stds"][m] if s["seeds"] > 1 else None)
                for s in summary for m, mean in s["metric_means"].items() if math.isfinite(mean)}
    assert {model for _, model in expected} == {"micro", "random init (micro)"} and len(expected) == 8
    assert drawn.keys() == expected.keys()
    for key, (mean, std) in expected.items():
        assert drawn[key][0] == mean, key
        # topic: 2 seeds, an error bar of their sample std; mlm: one fixed-mask pass, none.
        assert (std is None) == key[0].startswith("mlm") and (drawn[key][1] is None) == (std is None), key
        if std is not None:
            assert drawn[key][1] == pytest.approx(std, abs=1e-12), key

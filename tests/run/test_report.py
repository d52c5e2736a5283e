"""`modernbert-train report`: plots and summary from synthetic but realistic metrics of a 3-phase chain."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from modernbert_train.cli.main import main as cli_main
from modernbert_train.common.errors import UserError
from modernbert_train.run.report import load_phases, read_metrics, write_report
from modernbert_train.run.plots import FIGURE_DPI, FIGURE_SIZE_INCHES, PLOTS, eval_bars, eval_figure, eval_tick_label

EXPECTED_PNG_SHAPE = (round(FIGURE_SIZE_INCHES[1] * FIGURE_DPI), round(FIGURE_SIZE_INCHES[0] * FIGURE_DPI))

# (run name, steps, seq len, peak lr, first loss, last loss, decay?) - shaped like the paper's three phases.
PHASES = (
    ("phase1", 300, 1024, 8e-4, 10.8, 3.10, False),
    ("phase2", 120, 8192, 3e-4, 3.05, 2.80, False),
    ("phase3", 80, 8192, 3e-4, 2.78, 2.55, True),
)
EVAL_EVERY = 40


def _phase_records(name, steps, seq_len, peak_lr, first_loss, last_loss, decays, seed) -> list[dict]:
    rng = np.random.default_rng(seed)
    records, tokens, time_s = [], 0, 0.0
    for step in range(1, steps + 1):
        # Batch-size warmup from a third of the final batch over the first 40% of phase 1.
        final_batch = max(8, 4_718_592 // seq_len) // 64
        batch = final_batch if name != "phase1" else min(final_batch, final_batch // 3 + int(step * final_batch / 120))
        step_tokens = int(batch * seq_len * 0.993)
        tokens += step_tokens
        tokens_per_s = 2.4e5 * (1 + 0.03 * rng.standard_normal())
        time_s += step_tokens / tokens_per_s
        progress = step / steps
        loss = last_loss + (first_loss - last_loss) * math.exp(-5 * progress) + 0.04 * rng.standard_normal()
        warmup = min(1.0, step / 30) if name == "phase1" else 1.0
        lr = peak_lr * warmup * ((1 - math.sqrt(progress)) if decays else 1.0)
        accuracy = 0.72 - 0.09 * (loss - 2.5)
        records.append({
            "step": step, "tokens": tokens, "time_s": round(time_s, 3), "phase": name,
            "train/loss": loss, "train/masked_accuracy": accuracy, "train/perplexity": math.exp(loss),
            "lr": lr, "throughput/tokens_per_s": tokens_per_s, "throughput/mfu": tokens_per_s * 827e6 / 989e12,
            "batch_size": batch,
        })
        if step % EVAL_EVERY == 0 or step == steps:
            eval_loss = loss + 0.05
            records.append({"step": step, "tokens": tokens, "time_s": round(time_s + 2.0, 3), "phase": name,
                            "eval/loss": eval_loss, "eval/masked_accuracy": accuracy - 0.01,
                            "eval/perplexity": math.exp(eval_loss)})
    return records


def _write_run(run_dir: Path, records: list[dict], config: dict | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    if config is not None:
        import yaml
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return run_dir


@pytest.fixture
def three_phases(tmp_path) -> tuple[list[Path], list[list[dict]]]:
    run_dirs, all_records = [], []
    for seed, (name, steps, seq_len, lr, first, last, decays) in enumerate(PHASES):
        records = _phase_records(name, steps, seq_len, lr, first, last, decays, seed)
        # The shape of the trainer's resolved config.yaml (modernbert_train/train/recipe.py).
        config = {"run_name": name, "seed": 17, "save_folder": f"runs/{name}", "precision": "auto",
                  "max_duration": f"{records[-1]['tokens']}tok",
                  "data": {"manifest": f"yamls/data/{name}.yaml", "max_seq_len": seq_len, "micro_batch_size": 8,
                           "global_batch_size": [r for r in records if "batch_size" in r][-1]["batch_size"], "mlm_probability": 0.3},
                  "model": {"preset": "base", "init_from": None,
                            "config": {"global_rope_theta": 160000.0, "attention_output_dropout": 0.1}},
                  "optimizer": {"name": "stable_adamw", "lr": lr, "betas": [0.9, 0.98], "eps": 1e-6},
                  "logging": {"progress_bar": True}}
        run_dirs.append(_write_run(tmp_path / name, records, config))
        all_records.append(records)
    return run_dirs, all_records


def test_three_phase_report_writes_valid_pngs_and_summary(three_phases, tmp_path):
    run_dirs, all_records = three_phases
    out_dir = tmp_path / "report"
    markdown_path = write_report(run_dirs, out_dir)

    assert markdown_path == out_dir / "report.md"
    for spec in PLOTS:
        png = out_dir / spec.file_name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", spec.file_name
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[:2] == EXPECTED_PNG_SHAPE, spec.file_name
        # Not a blank canvas: a real plot has many distinct colours.
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50, spec.file_name

    summary = markdown_path.read_text()
    last_train = [r for r in all_records[-1] if "train/loss" in r][-1]
    last_eval = [r for r in all_records[-1] if "eval/loss" in r][-1]
    assert f"{last_train['train/loss']:.4f}" in summary
    assert f"{last_eval['eval/loss']:.4f}" in summary
    assert f"{100 * last_eval['eval/masked_accuracy']:.2f}%" in summary
    total_tokens = sum(records[-1]["tokens"] for records in all_records)
    assert f"{total_tokens:,} tokens" in summary or f"({total_tokens:,})" in summary
    total_steps = sum(records[-1]["step"] for records in all_records)
    assert f"{total_steps:,} optimizer steps" in summary
    for name, *_ in PHASES:
        assert f"| {name} |" in summary
    phase1_mfu = [r["throughput/mfu"] for r in all_records[0] if "throughput/mfu" in r]
    assert f" | {100 * np.median(phase1_mfu):.2f}% |" in summary
    # Config highlights pick recipe keys wherever they are nested, and leave internals out.
    assert "| optimizer.lr | 0.0008 |" in summary
    assert "| data.max_seq_len | 8192 |" in summary
    assert "| model.config.global_rope_theta | 160000.0 |" in summary
    assert "| optimizer.betas | [0.9, 0.98] |" in summary
    assert "progress_bar" not in summary and "optimizer.eps" not in summary and "init_from" not in summary
    for spec in PLOTS:
        assert f"]({spec.file_name})" in summary

    page = (out_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert f"{last_train['train/loss']:.4f}" in page
    for spec in PLOTS:
        assert f"<img src='{spec.file_name}'" in page


def test_stitched_token_axis_is_monotonic_and_continues_each_phase(three_phases):
    run_dirs, all_records = three_phases
    phases = load_phases(run_dirs)
    x = np.concatenate([phase.series("train/loss")[0] for phase in phases])
    assert np.all(np.diff(x) > 0)
    phase1_end = all_records[0][-1]["tokens"]
    phase2_end = all_records[1][-1]["tokens"]
    assert phases[1].token_offset == phase1_end
    assert phases[2].token_offset == phase1_end + phase2_end
    # Phase 2's first point is its own first step's tokens, drawn after phase 1's last.
    assert phases[1].series("train/loss")[0][0] == phase1_end + all_records[1][0]["tokens"]
    assert x[-1] == phase1_end + phase2_end + all_records[2][-1]["tokens"]
    eval_x = np.concatenate([phase.series("eval/loss")[0] for phase in phases])
    assert np.all(np.diff(eval_x) > 0)


def test_missing_optional_metrics_skip_plots_with_a_note(tmp_path):
    records = [{"step": s, "tokens": 1000 * s, "time_s": 0.5 * s, "phase": "cpu-smoke", "train/loss": 9.0 - s / 10}
               for s in range(1, 31)]
    run_dir = _write_run(tmp_path / "run", records)  # no config.yaml either
    markdown_path = write_report([run_dir], tmp_path / "out")

    assert (tmp_path / "out" / "loss.png").is_file()
    for skipped in ("lr.png", "throughput.png", "batch_size.png", "masked_accuracy.png"):
        assert not (tmp_path / "out" / skipped).exists()
    summary = markdown_path.read_text()
    assert "lr.png skipped" in summary and "throughput.png skipped" in summary
    assert "loss.png: no 'eval/loss'" in summary
    assert "No config.yaml" in summary
    assert f"{records[-1]['train/loss']:.4f}" in summary
    assert "Total: 30k tokens (30,000), 30 optimizer steps, wall time 0m 15s." in summary


def test_malformed_line_names_file_and_line(tmp_path):
    run_dir = _write_run(tmp_path / "run", [{"step": 1, "tokens": 100, "time_s": 1.0, "train/loss": 5.0}])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "tokens": 200, "train/loss": 4.9\n')
        f.write('{"step": 3, "tokens": 300, "train/loss": 4.8}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: not a JSON object"):
        read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.parametrize("line, message", [
    ('{"tokens": 200}', r"metrics\.jsonl:2: missing required key 'step'"),
    ('{"step": 2, "tokens": 200, "train/loss": "low"}', r"metrics\.jsonl:2: 'train/loss' must be a number"),
    ('[2, 200]', r"metrics\.jsonl:2: expected a JSON object, got list"),
])
def test_bad_records_name_the_line(tmp_path, line, message):
    run_dir = _write_run(tmp_path / "run", [{"step": 1, "tokens": 100}])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(line + "\n")
    with pytest.raises(UserError, match=message):
        read_metrics(run_dir / "metrics.jsonl")


def test_null_metric_from_a_diverged_step_is_a_gap_not_a_crash(tmp_path):
    # The trainer writes a non-finite loss as null.
    records = [{"step": s, "tokens": 500 * s, "time_s": float(s), "train/loss": 6.0 - s / 10,
                "throughput/tokens_per_s": 1000.0 * s} for s in range(1, 25)]
    records[10]["train/loss"] = None
    records[23]["train/loss"] = None
    run_dir = _write_run(tmp_path / "run", records)
    phase = load_phases([run_dir])[0]
    losses = phase.series("train/loss")[1]
    assert np.isnan(losses[10]) and np.isnan(losses[23]) and np.isfinite(losses[:10]).all()
    summary = write_report([run_dir], tmp_path / "out").read_text()
    assert "| train loss | nan | 24 |" in summary
    assert f"| {np.median([1000.0 * s for s in range(1, 25)]) / 1000:.3g}k |" in summary


def test_unfinished_last_line_and_resume_replay_are_tolerated(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [{"step": s, "tokens": 100 * s, "train/loss": 5.0 - s / 100} for s in range(1, 8)]
    # Resumed from a checkpoint at step 4: steps 5..7 are replayed with different values.
    lines += [{"step": s, "tokens": 100 * s, "train/loss": 4.0 - s / 100} for s in range(5, 10)]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 10, "tok'
    (run_dir / "metrics.jsonl").write_text(text)

    records, notes = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 10))
    assert records[5]["train/loss"] == pytest.approx(4.0 - 6 / 100)
    assert any("metrics.jsonl:13: unfinished last line" in n for n in notes)
    assert any("1 resume(s)" in n for n in notes)


def test_missing_run_dir_and_bad_config_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="nowhere: not a run directory"):
        write_report([tmp_path / "nowhere"], tmp_path / "out")
    run_dir = _write_run(tmp_path / "run", [{"step": 1, "tokens": 100}])
    (run_dir / "config.yaml").write_text("model:\n  preset: base\n lr: [1\n")
    with pytest.raises(UserError, match=r"config\.yaml:3: not valid YAML"):
        write_report([run_dir], tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no metric records yet"):
        write_report([empty], tmp_path / "out")


def test_cli_report_default_out_dir_and_bad_line_exit_code(three_phases, tmp_path, capsys):
    run_dirs, _ = three_phases
    assert cli_main(["report", *map(str, run_dirs[:2])]) == 0
    assert (run_dirs[1] / "report" / "loss.png").is_file()
    assert "report.md" in capsys.readouterr().out

    with open(run_dirs[0] / "metrics.jsonl", "a") as f:
        f.write("not json\n")
    assert cli_main(["report", str(run_dirs[0]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.jsonl:" in err and err.count("\n") == 1


def test_cli_report_help_has_an_example():
    result = subprocess.run([sys.executable, "-m", "modernbert_train.cli.main", "report", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "modernbert-train report runs/phase1 runs/phase2" in result.stdout


# ----------------------------------------------------------------------------------------------- evaluation plot

def drawn_eval_bars(fig) -> dict[tuple[str, str], list]:
    """Read eval.png's figure back from its artists: (tick label, model) -> [bar height, error bar half-length
    or None]. The group comes from the tick nearest the bar, the model from the bar container's legend label."""
    from matplotlib.container import BarContainer, ErrorbarContainer

    drawn = {}
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_xticklabels()]
        centres = {}
        for container in ax.containers:
            if isinstance(container, BarContainer):
                for patch in container.patches:
                    centre = patch.get_x() + patch.get_width() / 2
                    key = (labels[round(centre)], container.get_label())
                    assert key not in drawn, key
                    drawn[key] = [patch.get_height(), None]
                    centres[key] = centre
        for container in ax.containers:
            if isinstance(container, ErrorbarContainer):
                for (x0, low), (x1, high) in container.lines[2][0].get_segments():
                    key = min(centres, key=lambda k: abs(centres[k] - x0))
                    assert abs(centres[key] - x0) < 1e-9 and x0 == x1
                    assert drawn[key][0] == pytest.approx((low + high) / 2)  # centred on the mean
                    drawn[key][1] = (high - low) / 2
    return drawn


def _write_eval_results(out_dir: Path, summaries) -> dict:
    """results.json through the runner's own writer (it reads only these attributes of suite and models)."""
    from types import SimpleNamespace

    from modernbert_train.eval.runner import write_results

    models = list(dict.fromkeys(s.model for s in summaries))
    write_results(out_dir, SimpleNamespace(path=Path("yamls/eval/toy.yaml"), name="toy"),
                  [SimpleNamespace(name=m, source=m, step=None) for m in models], [], summaries)
    return json.loads((out_dir / "results.json").read_text())


def test_eval_plot_bars_are_the_means_with_std_error_bars_and_survive_nan_and_one_seed(tmp_path):
    from modernbert_train.eval.runner import TaskSummary

    def summary(task, model, means, stds, seeds):
        return TaskSummary(task=task, type="classification", model=model, metric_means=means, metric_stds=stds,
                           split="test", chosen={"lr": 1e-3}, seeds=seeds)

    summaries = [
        summary("topic", "phase3", {"accuracy": 0.91, "matthews": 0.82}, {"accuracy": 0.02, "matthews": 0.04}, 3),
        summary("topic", "random init (phase3)", {"accuracy": 0.55, "matthews": -0.03},
                {"accuracy": 0.05, "matthews": 0.06}, 3),
        # One seed: the runner writes std 0.0, which must not become a (zero-length) error bar.
        summary("search", "phase3", {"ndcg@10": 0.41}, {"ndcg@10": 0.0}, 1),
        summary("search", "random init (phase3)", {"ndcg@10": 0.12}, {"ndcg@10": 0.0}, 1),
        # Pearson of constant predictions is NaN (json writes NaN): no bar, no crash.
        summary("sts", "phase3", {"pearson": math.nan}, {"pearson": math.nan}, 3),
        summary("sts", "random init (phase3)", {"pearson": 0.3}, {"pearson": 0.1}, 3),
        summary("mlm", "phase3", {"loss": 3.25, "accuracy": 0.31}, {"loss": 0.0, "accuracy": 0.0}, 1),
        summary("mlm", "random init (phase3)", {"loss": 6.6, "accuracy": 0.02}, {"loss": 0.0, "accuracy": 0.0}, 1),
    ]
    results = _write_eval_results(tmp_path / "eval", summaries)
    all_nan = _write_eval_results(tmp_path / "eval_nan", [summary("sts", "phase3", {"pearson": math.nan},
                                                                  {"pearson": math.nan}, 2)])
    run_dir = _write_run(tmp_path / "run", [{"step": s, "tokens": 100 * s, "train/loss": 5.0 - s / 10}
                                            for s in range(1, 6)])
    markdown_path = write_report([run_dir], tmp_path / "out", eval_dirs=[tmp_path / "eval", tmp_path / "eval_nan"])

    png = tmp_path / "out" / "eval.png"
    assert matplotlib.image.imread(png).shape[:2] == EXPECTED_PNG_SHAPE
    assert "](eval.png)" in markdown_path.read_text()
    assert "<img src='eval.png'" in (tmp_path / "out" / "report.html").read_text()
    # No numeric metric at all: no PNG, a line in the report instead.
    assert not (tmp_path / "out" / "eval_2.png").exists()
    assert f"No evaluation plot for {tmp_path / 'eval_nan' / 'results.json'}" in markdown_path.read_text()
    assert eval_figure(all_nan["summary"], "none") is None

    fig = eval_figure(results["summary"], "toy")
    drawn = drawn_eval_bars(fig)
    expected = {}
    for s in results["summary"]:
        for metric, mean in s["metric_means"].items():
            if math.isfinite(mean):
                std = s["metric_stds"][metric] if s["seeds"] > 1 else None
                expected[(eval_tick_label(s["task"], metric), s["model"])] = [mean, std]
    assert len(expected) == 11 and drawn.keys() == expected.keys()
    for key, (mean, std) in expected.items():
        assert drawn[key][0] == mean, key  # the bar is the mean itself, not a rounded copy
        assert (drawn[key][1] is None) if std is None else drawn[key][1] == pytest.approx(std, abs=1e-12), key
    # MLM loss is on another scale: its own panel, so the [-1, 1] scores keep their resolution.
    panel_ticks = [[t.get_text() for t in ax.get_xticklabels()] for ax in fig.axes]
    assert panel_ticks[1] == ["mlm: loss"] and "mlm: accuracy" in panel_ticks[0]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["phase3", "random init (phase3)"]
    import matplotlib.pyplot as plt
    plt.close(fig)

    # A summary without metric_stds at all (hand-made files): bars, no error bars.
    bare = [{"task": "t", "model": "m", "metric_means": {"accuracy": 0.7, "label": "n/a"}, "seeds": 3}]
    assert [(b.mean, b.std) for b in eval_bars(bare)] == [(0.7, None)]


def test_bad_eval_results_file_is_one_line_naming_it(tmp_path):
    run_dir = _write_run(tmp_path / "run", [{"step": 1, "tokens": 100}])
    (tmp_path / "eval").mkdir()
    results_file = tmp_path / "eval" / "results.json"
    results_file.write_text('{"suite": "s",\n "summary": [}\n')
    with pytest.raises(UserError, match=rf"{results_file}:2: not valid JSON"):
        write_report([run_dir], tmp_path / "out", eval_dirs=[tmp_path / "eval"])
    results_file.write_text('{"suite": "s", "runs": []}\n')
    with pytest.raises(UserError, match="with 'suite' and a 'summary' list"):
        write_report([run_dir], tmp_path / "out", eval_dirs=[tmp_path / "eval"])


def test_two_heldout_sets_are_drawn_side_by_side_with_their_change(tmp_path):
    """eval.manifests writes eval_NAME/loss: one plot of every set, and each set's first -> last change."""
    records = []
    for step in range(1, 41):
        record = {"step": step, "tokens": 1000 * step, "train/loss": 5.0 - step / 20}
        if step % 10 == 0:
            record.update({"eval_domain/loss": 4.0 - step / 20, "eval_general/loss": 3.0 + step / 100})
        records.append(record)
    out_dir = tmp_path / "report"
    summary = write_report([_write_run(tmp_path / "continue", records)], out_dir).read_text()
    pixels = matplotlib.image.imread(out_dir / "heldout.png")
    assert pixels.shape[:2] == EXPECTED_PNG_SHAPE
    assert "| domain | 3.5000 | 2.0000 | -1.5000 | 40k |" in summary
    assert "| general | 3.1000 | 3.4000 | +0.3000 | 40k |" in summary
    assert "](heldout.png)" in summary


def test_rollback_records_survive_the_steps_going_back(tmp_path):
    """Issue 28: rolling back to an earlier step dropped the earlier rollbacks' lines from the report."""
    from modernbert_train.run.report import spike_guard_rows

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [{"step": s, "tokens": 10 * s, "train/loss": 5.0} for s in range(1, 13)]
    for number, (to_step, spikes) in enumerate([(8, [11, 12, 13]), (6, [9, 10, 11]), (6, [9, 10, 11])], start=1):
        lines += [{"step": s, "tokens": 10 * s, "event": "spike_skipped", "rule": "loss", "spike/loss": 9.0}
                  for s in spikes]
        lines.append({"step": to_step, "tokens": 10 * to_step, "event": "rollback", "rollback": number,
                      "spike_steps": spikes, "skipped_loader_steps": [to_step + 1, spikes[-1] + 1],
                      "lr_scale": 0.5 ** number})
        lines += [{"step": s, "tokens": 10 * s, "train/loss": 4.0} for s in range(to_step + 1, 12)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    records, notes = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "event" not in r] == list(range(1, 12))
    assert [r["rollback"] for r in records if r.get("event") == "rollback"] == [1, 2, 3]
    rows = spike_guard_rows(load_phases([run_dir]))
    assert [row[2] for row in rows if row[2].startswith("rollback")] == ["rollback 1", "rollback 2", "rollback 3"]
    assert len([row for row in rows if row[2] == "update skipped"]) == 9
    assert "restarted from step 6, skipped loader steps 7-12, lr x 0.125" in rows[-1][3]

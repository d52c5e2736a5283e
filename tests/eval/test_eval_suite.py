"""Suites end to end on a micro model (every task type, every local data format), and the one-line errors."""
import json
import shutil

import numpy as np
import pytest
import yaml

from modernbert_train.cli.main import main
from modernbert_train.common.errors import UserError
from modernbert_train.eval.data import load_split
from modernbert_train.eval.mlm import fixed_masks
from modernbert_train.eval.suite import load_suite


def _suite(tmp_path, toy_tasks, **changes):
    spec = {"name": "toy", "tasks": [
        {"name": "topic", "type": "classification", "max_length": 32, "metrics": ["accuracy", "f1", "matthews"],
         "data": {"train": f"{toy_tasks}/cls/train.jsonl", "dev": f"{toy_tasks}/cls/dev.jsonl",
                  "test": f"{toy_tasks}/cls/test.jsonl", "columns": {"text": "sentence", "label": "topic"}},
         "sweep": {"lr": [3e-3], "weight_decay": [0.0, 1e-5], "epochs": [3], "batch_size": 16, "seeds": [0, 1],
                   "early_stopping": 1}},
        {"name": "pair-regression", "type": "classification", "num_labels": 1, "metrics": ["pearson", "spearman"],
         "max_length": 32, "init_from_task": "topic",
         "data": {"train": f"{toy_tasks}/cls/train.jsonl", "dev": f"{toy_tasks}/cls/dev.jsonl",
                  "columns": {"text": "sentence", "text_pair": "other", "label": "score"}},
         "sweep": {"lr": [3e-3], "epochs": [1], "batch_size": 16, "seeds": [0]}},
        {"name": "search", "type": "retrieval", "max_length": 64,
         "data": {"beir": f"{toy_tasks}/beir", "hard_negatives": f"{toy_tasks}/beir/hard_negatives.jsonl"},
         "sweep": {"lr": [1e-3], "epochs": [1], "batch_size": 8, "seeds": [0, 1]}},
        {"name": "search-zero-shot", "type": "retrieval", "zero_shot": True, "data": {"beir": f"{toy_tasks}/beir"}},
        {"name": "search-again", "type": "retrieval", "zero_shot": True, "init_from_task": "search",
         "max_length": 64, "data": {"beir": f"{toy_tasks}/beir"}},
        {"name": "mlm", "type": "mlm", "data": {"train": f"{toy_tasks}/heldout.jsonl", "columns": {"text": "text"}}},
    ]}
    for key, value in changes.items():
        spec[key] = value
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_suite_runs_every_task_type_for_two_models(tmp_path, toy_tasks, hf_folder, capsys):
    out = tmp_path / "out"
    code = main(["eval", str(_suite(tmp_path, toy_tasks)), "--model", str(hf_folder),
                 "--model", f"random:{hf_folder}", "--out", str(out), "--device", "cpu"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    summary = {(s["task"], s["model"]): s for s in results["summary"]}
    assert len(summary) == 12
    topic = summary[("topic", "micro")]
    # 2 weight decays x 2 seeds; the chosen point's test scores are the mean of its 2 seeds' runs.
    runs = [r for r in results["runs"] if r["task"] == "topic" and r["model"] == "micro"]
    assert len(runs) == 4 and topic["split"] == "test" and topic["seeds"] == 2
    chosen = [r for r in runs if r["weight_decay"] == topic["chosen"]["weight_decay"]]
    assert topic["metric_means"]["accuracy"] == pytest.approx(np.mean([r["test"]["accuracy"] for r in chosen]))
    # The words give the label away: fine-tuning must learn it (a broken loop stays near 0.5).
    assert topic["metric_means"]["accuracy"] > 0.9
    for model in ("micro", "random init (micro)"):
        search = summary[("search", model)]["metric_means"]
        assert set(search) == {"ndcg@10", "mrr@10", "recall@100"}
        assert 0 <= search["ndcg@10"] <= 1 and search["recall@100"] == 1.0  # 40 documents: all retrieved
        assert summary[("mlm", model)]["metric_means"]["loss"] > 0
        # A later task starts each seed from that seed's fine-tuned embedder: it scores exactly what it scored.
        again = summary[("search-again", model)]
        assert again["seeds"] == 2 and again["per_seed"] == summary[("search", model)]["per_seed"]
        assert len(set(again["per_seed"]["ndcg@10"])) == 2  # two different embedders, each in its seed's place
        assert again["metric_means"] == search
    # Zero-shot search: a pretrained model's is the same for every seed (run once), a random init's is drawn
    # by the seed (run on every seed, so its mean and std say how much the draw matters).
    zero_shot = {model: summary[("search-zero-shot", model)] for model in ("micro", "random init (micro)")}
    assert zero_shot["micro"]["seeds"] == 1
    assert zero_shot["random init (micro)"]["seeds"] == 3
    assert len(set(zero_shot["random init (micro)"]["per_seed"]["ndcg@10"])) == 3
    table = (out / "results.md").read_text()
    assert "| topic | accuracy | test |" in table and "random init (micro)" in table
    # Not on a terminal: one plain line per finished run, with its ETA and what it was, on stderr.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval: ")]
    assert lines[0].startswith("eval: 1/") and "ETA" in lines[0] and "seed 0)" in lines[0]
    assert lines[-1].endswith("done")


def test_fixed_masks_are_the_same_for_every_model_and_call(eval_tokenizer):
    sequences = [[1] + list(range(10, 60)) + [2], [1] + list(range(100, 140)) + [2]]
    first = fixed_masks(sequences, eval_tokenizer, 0.15, seed=7)
    assert first == fixed_masks(sequences, eval_tokenizer, 0.15, seed=7)
    labels = np.array([t for _, lab in first for t in lab])
    assert 0.05 < (labels != -100).mean() < 0.3
    assert all(lab[0] == -100 and lab[-1] == -100 for _, lab in first)  # [CLS] / [SEP] never masked


def test_save_to_disk_folder_and_csv_parquet_read_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"sentence": f"text {i}", "label": i % 2} for i in range(5)]
    table = pa.Table.from_pylist(rows)
    split = tmp_path / "saved" / "train"  # the layout of DatasetDict.save_to_disk
    split.mkdir(parents=True)
    with pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    pq.write_table(table, tmp_path / "train.parquet")
    (tmp_path / "train.csv").write_text("sentence,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(5)))
    assert load_split(str(tmp_path / "saved"), None, "train", "w") == rows
    assert load_split(None, None, str(tmp_path / "train.parquet"), "w") == rows
    assert [r["sentence"] for r in load_split(None, None, str(tmp_path / "train.csv"), "w")] == [r["sentence"] for r in rows]


@pytest.mark.parametrize("change, expected", [
    ({"tasks": [{"name": "t", "type": "classification", "data": {"trian": "x.jsonl"}}]},
     "tasks[0] (t).data.trian: unknown key (did you mean: train?)"),
    ({"tasks": [{"name": "t", "type": "clasification", "data": {}}]}, "tasks[0] (t).type: 'clasification'"),
    ({"tasks": [{"name": "t", "type": "retrieval", "data": {"beir": "b"}, "sweep": {"lr": "fast"}}]},
     "tasks[0] (t).sweep.lr: ['fast'] is not a list of numbers"),
    ({"taks": []}, "taks: unknown key (did you mean: tasks?)"),
])
def test_bad_suite_is_one_line_naming_file_and_key(tmp_path, toy_tasks, change, expected):
    path = _suite(tmp_path, toy_tasks, **change)
    with pytest.raises(UserError) as err:
        spec = yaml.safe_load(path.read_text())
        if "taks" in spec:
            spec.pop("tasks")
            path.write_text(yaml.safe_dump(spec))
        load_suite(path)
    assert str(path) in str(err.value) and expected in str(err.value) and "\n" not in str(err.value)


def test_missing_column_and_missing_tokenizer_exit_2_with_one_line(tmp_path, toy_tasks, hf_folder, capsys):
    suite = _suite(tmp_path, toy_tasks)
    spec = yaml.safe_load(suite.read_text())
    spec["tasks"] = spec["tasks"][:1]
    spec["tasks"][0]["data"]["columns"]["label"] = "labl"
    suite.write_text(yaml.safe_dump(spec))
    assert main(["eval", str(suite), "--model", str(hf_folder), "--out", str(tmp_path / "o")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and str(suite) in line and "column 'labl' (key columns.label)" in line
    assert "sentence" in line  # names the columns that exist

    no_tokenizer = tmp_path / "no_tok"
    shutil.copytree(hf_folder, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    assert main(["eval", str(suite), "--model", str(no_tokenizer)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and f"--model {no_tokenizer}" in line and "tokenizer.json" in line


@pytest.mark.parametrize("name", ["local", "local-grid", "glue", "boolq", "beir"])
def test_shipped_suites_are_valid(name):
    from pathlib import Path

    suite = load_suite(Path(__file__).resolve().parents[2] / "yamls" / "eval" / f"{name}.yaml")
    assert suite.tasks and all(t.metrics and t.main_metric in t.metrics for t in suite.tasks)
    if name == "glue":  # the paper's protocol: 4 x 4 x 3 grid, RTE/MRPC/STS-B from MNLI
        rte = next(t for t in suite.tasks if t.name == "rte")
        assert (len(rte.sweep.lr), len(rte.sweep.weight_decay), len(rte.sweep.epochs)) == (4, 4, 3)
        assert {t.name for t in suite.tasks if t.init_from_task == "mnli"} == {"rte", "mrpc", "stsb"}


def test_tasks_flag_runs_the_named_tasks_and_what_they_start_from(tmp_path, toy_tasks, hf_folder, capsys):
    from pathlib import Path

    from modernbert_train.eval.suite import select_tasks

    beir = load_suite(Path(__file__).resolve().parents[2] / "yamls" / "eval" / "beir.yaml")
    assert [t.name for t in select_tasks(beir, ["fiqa", "scifact"]).tasks] == ["msmarco", "scifact", "fiqa"]
    with pytest.raises(UserError, match=r"--tasks: 'scifakt' is not a task of .*beir.yaml \(did you mean: scifact"):
        select_tasks(beir, ["scifakt"])
    out = tmp_path / "out"
    assert main(["eval", str(_suite(tmp_path, toy_tasks)), "--model", str(hf_folder), "--out", str(out),
                 "--device", "cpu", "--tasks", "search-again,mlm"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [s["task"] for s in results["summary"]] == ["search", "search-again", "mlm"]


@pytest.mark.parametrize("flag,lines", [("lines", 3), ("none", 0)])
def test_eval_progress_follows_the_progress_flag(flag, lines, capsys, monkeypatch):
    """`--progress` (MODERNBERT_PROGRESS, set by the CLI for every command) decides for eval as for the others."""
    from modernbert_train.common import progress
    from modernbert_train.eval.runner import Progress

    monkeypatch.setenv(progress.MODE_ENV, flag)
    bar = Progress(3)
    for seed in range(3):
        bar.finished(f"micro topic seed {seed}")
    bar.close()
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval: ")]
    assert len(printed) == lines + (1 if lines else 0)  # one per run, then the closing "done" line
    if lines:
        assert printed[1].startswith("eval: 2/3 run (67%)") and printed[1].endswith("(micro topic seed 1)")

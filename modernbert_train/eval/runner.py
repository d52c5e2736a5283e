"""Run a suite over one or more models: every (task, grid point, seed) is one run; results side by side.

Output folder: `results.json` (every run, its hyperparameters and scores, and the summary) and
`results.md` (per task and model: metric mean +- std over seeds at the grid point chosen on dev).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from modernbert_train.common import progress
from modernbert_train.eval.metrics import beats, rank_key
from modernbert_train.eval.models import EvalModel, load_eval_model
from modernbert_train.eval.suite import Suite, TaskSpec


@dataclass
class TaskSummary:
    task: str
    type: str
    model: str
    metric_means: dict[str, float]
    metric_stds: dict[str, float]
    split: str  # where the reported scores come from: test, dev or eval_split
    chosen: dict  # hyperparameters chosen on dev
    seeds: int
    per_seed: dict[str, list[float]] = field(default_factory=dict)


def _grid(task: TaskSpec) -> list[dict]:
    if task.type == "mlm" or (task.type == "retrieval" and task.zero_shot):
        return [{}]
    s = task.sweep
    return [dict(lr=lr, weight_decay=wd, epochs=ep) for lr, wd, ep in itertools.product(s.lr, s.weight_decay, s.epochs)]


def _seeds(task: TaskSpec, model: EvalModel, suite: Suite | None = None) -> list[int]:
    """Every seed where the seed changes the result: fine-tuning, zero-shot search with a random init (the
    seed draws its weights) and zero-shot search of an earlier task's fine-tuned models (one per seed of
    that task); a pretrained model's own zero-shot search is the same for every seed."""
    parent = next((t for t in suite.tasks if t.name == task.init_from_task), None) if suite else None
    if parent is not None and task.type == "retrieval" and task.zero_shot:
        return _seeds(parent, model, suite)
    fixed = task.type == "mlm" or (task.type == "retrieval" and task.zero_shot and model.weights is not None)
    return task.sweep.seeds[:1] if fixed else task.sweep.seeds


class Progress:
    """One unit per finished run of the sweep, through the project's reporter: a bar with ETA on a terminal,
    one line per run in a log file (`--progress` and MODERNBERT_PROGRESS choose, as for every command)."""

    def __init__(self, total: int, mode: str | None = None):
        # A run takes seconds to hours: every one is worth its line, so the line clock never holds one back.
        self.reporter = progress.Progress("eval", total, "run", mode=mode, min_interval_s=float("inf"))

    def finished(self, label: str) -> None:
        self.reporter.update(1)
        if self.reporter.bar is not None:
            self.reporter.bar.set_postfix_str(label[:60])
        elif self.reporter.mode == "lines":
            progress.emit(f"{self.reporter.line()} ({label})")

    def close(self) -> None:
        self.reporter.close()


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_suite(suite: Suite, model_sources: list[str], out_dir: str | Path, device=None,
              progress_mode: str | None = None) -> list[TaskSummary]:
    device = torch.device(device) if device else _default_device()
    models = [load_eval_model(source) for source in model_sources]
    bar = Progress(sum(runs_per_model(suite, model) for model in models), progress_mode)
    runs, summaries = [], []
    with bar.reporter:  # closes the bar; after an error, the error is the last line
        for model in models:
            for task_runs, summary in evaluate_model(suite, model, device, bar):
                runs.extend(task_runs)
                summaries.append(summary)
                write_results(out_dir, suite, models, runs, summaries)  # finished tasks survive an interruption
    return summaries


def runs_per_model(suite: Suite, model: EvalModel) -> int:
    return sum(len(_grid(t)) * len(_seeds(t, model, suite)) for t in suite.tasks)


def evaluate_model(suite: Suite, model: EvalModel, device, bar: Progress):
    """Yields (runs, summary) per task of the suite, in order."""
    finetuned: dict[str, dict[int, object]] = {}  # task name -> seed -> fine-tuned model at the chosen point
    for task in suite.tasks:
        task_runs = _run_task(suite, task, model, device, bar, finetuned)
        yield task_runs, _summarise(task, model, task_runs)


def _start_from(finetuned: dict, task: TaskSpec, seed: int):
    """The fine-tuned model a task starts from: the earlier task's model of the same seed (of its first seed
    when that task ran fewer), or None without init_from_task."""
    models = finetuned.get(task.init_from_task)
    return None if not models else models.get(seed, models[min(models)])


class _ChosenModels:
    """Keeps the per-seed models of the grid point with the best mean score so far (the point `_summarise`
    reports), so that a later task can start each seed from its own fine-tuned model; at most two points'
    models are held at a time. Keeps nothing when no later task starts from this one (`enabled` False)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.best, self.models, self.point_scores, self.point_models = None, {}, [], {}

    def add(self, seed: int, score: float, model) -> None:
        if self.enabled:
            self.point_scores.append(score)
            self.point_models[seed] = model

    def end_point(self) -> None:
        if not self.enabled:
            return
        mean = float(np.mean(self.point_scores))
        if beats(mean, self.best):
            self.best, self.models = mean, self.point_models
        self.point_scores, self.point_models = [], {}


def _run_task(suite: Suite, task: TaskSpec, model: EvalModel, device, bar: Progress, finetuned: dict) -> list[dict]:
    where = f"{suite.path}: task {task.name}"
    keep = any(t.init_from_task == task.name for t in suite.tasks)
    chosen = _ChosenModels(keep)
    records = []
    if task.type == "classification":
        from modernbert_train.eval.classify import finetune_classifier, load_classification_data
        from modernbert_train.eval.encoder import TextEncoder

        data = load_classification_data(
            task, TextEncoder(model.tokenizer_file, task.max_length or model.config.max_position_embeddings), where)
        for point in _grid(task):
            for seed in _seeds(task, model, suite):
                result = finetune_classifier(task, data, model, seed=seed, device=device, keep_model=keep,
                                             start_from=_start_from(finetuned, task, seed), **point)
                records.append(dict(task=task.name, type=task.type, model=model.name, seed=seed, **point,
                                    dev=result.dev, test=result.test, best_epoch=result.best_epoch,
                                    epochs_run=result.epochs_run))
                chosen.add(seed, result.dev[task.main_metric], result.classifier)
                bar.finished(f"{model.name} {task.name} seed {seed}")
            chosen.end_point()
    elif task.type == "retrieval":
        from modernbert_train.eval.retrieval import run_retrieval

        for point in _grid(task):
            for seed in _seeds(task, model, suite):
                settings = point or dict(lr=0.0, weight_decay=0.0, epochs=0)
                scores, dev_scores, embedder = run_retrieval(task, model, seed=seed, device=device, where=where,
                                                 start_from=_start_from(finetuned, task, seed), **settings)
                records.append(dict(task=task.name, type=task.type, model=model.name, seed=seed, **point,
                                    zero_shot=task.zero_shot, eval=scores, dev=dev_scores))
                chosen.add(seed, (dev_scores or scores)[task.main_metric], embedder)
                bar.finished(f"{model.name} {task.name} seed {seed}")
            chosen.end_point()
    else:
        from modernbert_train.eval.mlm import evaluate_mlm

        scores = evaluate_mlm(task, model, device, where)
        records.append(dict(task=task.name, type=task.type, model=model.name, seed=task.mask_seed, eval=scores))
        bar.finished(f"{model.name} {task.name}")
    if chosen.enabled:
        finetuned[task.name] = chosen.models
    return records


def _summarise(task: TaskSpec, model: EvalModel, records: list[dict]) -> TaskSummary:
    """Choose the grid point with the best mean dev main metric over seeds; report its scores.

    Classification reports test when the task has a test split, else dev (as GLUE dev numbers are
    reported). Retrieval chooses on its dev_split when the task has one; without, with more than one grid
    point, the choice and the reported score come from the same eval split."""
    keys = ("lr", "weight_decay", "epochs")
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(tuple(record.get(k) for k in keys), []).append(record)
    if task.type == "classification":
        select = lambda rs: np.mean([r["dev"][task.main_metric] for r in rs])  # noqa: E731
        report_split = "test" if records[0]["test"] is not None else "dev"
    elif task.type == "retrieval" and records[0].get("dev") is not None:
        select = lambda rs: np.mean([r["dev"][task.main_metric] for r in rs])  # noqa: E731
        report_split = task.data.eval_split
    else:
        lower_better = task.type == "mlm" and task.main_metric == "loss"
        select = lambda rs: (-1 if lower_better else 1) * np.mean([r["eval"][task.main_metric] for r in rs])  # noqa: E731
        report_split = "eval" if task.type == "mlm" else task.data.eval_split
    point, chosen = max(groups.items(), key=lambda kv: rank_key(select(kv[1])))  # a NaN point never wins
    field_name = report_split if task.type == "classification" else "eval"
    per_seed = {m: [r[field_name][m] for r in chosen] for m in task.metrics}
    return TaskSummary(
        task=task.name, type=task.type, model=model.name,
        metric_means={m: float(np.mean(v)) for m, v in per_seed.items()},
        metric_stds={m: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in per_seed.items()},
        split=report_split, chosen={k: v for k, v in zip(keys, point) if v is not None}, seeds=len(chosen),
        per_seed=per_seed)


def table_rows(summaries: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per (task, metric), one column per model with mean +- std over seeds and the
    chosen grid point. `summaries`: TaskSummary dicts (as results.json stores them)."""
    models = list(dict.fromkeys(s["model"] for s in summaries))
    by_key = {(s["task"], s["model"]): s for s in summaries}
    rows = []
    for task in dict.fromkeys(s["task"] for s in summaries):
        first = by_key[(task, models[0])]
        for metric in first["metric_means"]:
            cells = []
            for model in models:
                s = by_key.get((task, model))
                if s is None:
                    cells.append("")
                    continue
                spread = f" +- {s['metric_stds'][metric]:.3f}" if s["seeds"] > 1 else ""
                chosen = ", ".join(f"{k} {v:g}" for k, v in s["chosen"].items())
                cells.append(f"{s['metric_means'][metric]:.3f}{spread}" + (f" ({chosen})" if chosen else ""))
            rows.append([task, metric, first["split"], *cells])
    return ["task", "metric", "split", *models], rows


def markdown_table(summaries: list[dict]) -> str:
    header, rows = table_rows(summaries)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(out_dir, suite: Suite, models: list[EvalModel], runs: list[dict], summaries) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "suite": str(suite.path), "suite_name": suite.name,
        "models": [{"name": m.name, "source": m.source, "step": m.step} for m in models],
        "summary": [asdict(s) for s in summaries], "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    header = (f"# Evaluation: {suite.name}\n\nSuite `{suite.path}`; mean +- sample std over seeds at the grid point "
              f"chosen on dev (in brackets).\n\n")
    (out / "results.md").write_text(header + markdown_table([asdict(s) for s in summaries]))

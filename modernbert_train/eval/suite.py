"""Evaluation suite files (yamls/eval/*.yaml): every choice of the paper's protocol is written down here.

A suite is a list of tasks of three types: `classification` (also regression, num_labels: 1),
`retrieval` (BEIR folder, DPR-style fine-tuning or zero-shot) and `mlm` (masked-token loss at a fixed rate
with fixed masks). Values may use omegaconf interpolation (`${data_root}/...`) and be overridden from the
command line (`data_root=/data`). Unknown or mistyped keys are errors naming the file and the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from modernbert_train.common.errors import UserError, did_you_mean
from modernbert_train.eval.metrics import CLASSIFICATION_METRICS, RETRIEVAL_METRICS


@dataclass
class Sweep:
    """The grid (lr x weight_decay x epochs) and the settings shared by its runs; every grid point runs
    once per seed, and the point with the best mean dev score over seeds is reported."""
    lr: list[float] = field(default_factory=lambda: [5e-5])
    weight_decay: list[float] = field(default_factory=lambda: [1e-6])
    epochs: list[int] = field(default_factory=lambda: [3])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 32
    warmup_ratio: float = 0.06  # linear warmup over this share of steps, then linear decay to 0
    early_stopping: int | None = None  # stop after this many epochs without a better dev score
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    dropout: float = 0.0  # classifier dropout (transformers' classifier_dropout)
    temperature: float = 0.05  # retrieval: softmax temperature of the in-batch contrastive loss


@dataclass
class DataSpec:
    dataset: str | None = None  # a datasets hub name or a save_to_disk folder (then splits are split names)
    config: str | None = None  # datasets config name, e.g. glue's "mnli"
    train: str | None = None  # a split name or a local file
    dev: str | None = None
    test: str | None = None
    columns: dict = field(default_factory=dict)  # role -> column: text, text_pair, label
    label_names: list | None = None  # label values in order (strings or ints); default: sorted values seen
    beir: str | None = None  # retrieval: BEIR folder scored (eval_split) and, unless train_beir, trained on
    train_beir: str | None = None  # retrieval: BEIR folder of the training pairs (e.g. MS MARCO)
    train_split: str = "train"  # retrieval qrels splits
    eval_split: str = "test"
    dev_split: str | None = None  # retrieval: qrels split (same corpus) that chooses the grid point
    hard_negatives: str | None = None  # retrieval: jsonl {"query_id": ..., "negative_ids": [...]}
    manifest: str | None = None  # mlm: a mixture manifest of prepared shards (instead of train), `limit` samples


@dataclass
class TaskSpec:
    name: str
    type: str  # classification | retrieval | mlm
    data: DataSpec
    metrics: list[str] = field(default_factory=list)
    main_metric: str | None = None  # selects hyperparameters on dev (default: the first metric)
    num_labels: int | None = None  # 1 = regression; default: number of label values in train
    pooling: str = "mean"
    max_length: int | None = None  # tokens per input; default: the model's max_position_embeddings
    query_max_length: int = 64
    sweep: Sweep = field(default_factory=Sweep)
    init_from_task: str | None = None  # start from this earlier task's fine-tuned model (RTE from MNLI;
    # BEIR sets from the MS MARCO embedder); it must be an earlier task of the same type
    zero_shot: bool = False  # retrieval: score without fine-tuning
    mlm_probability: float = 0.15  # mlm: the rate every model is scored at, whatever rate it was trained at
    mask_seed: int = 1234  # mlm: the same masks for every model sharing a tokenizer
    limit: int | None = None  # use at most this many training rows (quick suites); mlm: rows or manifest samples


@dataclass
class Suite:
    name: str
    path: Path
    tasks: list[TaskSpec]


TASK_TYPES = ("classification", "retrieval", "mlm")
TOP_LEVEL_KEYS = ("name", "tasks", "data_root", "description")


def _check_keys(values: dict, cls, where: str) -> None:
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            raise UserError(f"{where}.{key}: unknown key{did_you_mean(key, known)} (known: {', '.join(sorted(known))})")


def _build(cls, values, where: str):
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping, got {type(values).__name__}")
    _check_keys(values, cls, where)
    return cls(**values)


def _coerce_lists(sweep: Sweep, where: str) -> None:
    for name in ("lr", "weight_decay", "epochs", "seeds"):
        value = getattr(sweep, name)
        if not isinstance(value, list):
            value = [value]
        if not value:
            raise UserError(f"{where}.sweep.{name}: needs at least one value")
        try:
            value = [int(v) if name in ("epochs", "seeds") else float(v) for v in value]
        except (TypeError, ValueError):
            raise UserError(f"{where}.sweep.{name}: {value!r} is not a list of numbers") from None
        setattr(sweep, name, value)
    if sweep.batch_size < 1:
        raise UserError(f"{where}.sweep.batch_size: must be >= 1")


def _validate_task(task: TaskSpec, where: str, earlier: dict[str, str]) -> None:
    if task.type not in TASK_TYPES:
        raise UserError(f"{where}.type: {task.type!r} is not one of {', '.join(TASK_TYPES)}{did_you_mean(task.type, TASK_TYPES)}")
    allowed = {"classification": CLASSIFICATION_METRICS, "retrieval": None, "mlm": ("loss", "accuracy")}[task.type]
    if not task.metrics:
        task.metrics = {"classification": ["accuracy"], "retrieval": list(RETRIEVAL_METRICS),
                        "mlm": ["loss", "accuracy"]}[task.type]
    for metric in task.metrics:
        valid = (metric.partition("@")[0] in ("ndcg", "mrr", "recall") and metric.partition("@")[2].isdigit()
                 if allowed is None else metric in allowed)
        if not valid:
            names = allowed or ("ndcg@K", "mrr@K", "recall@K")
            raise UserError(f"{where}.metrics: {metric!r} is not one of {', '.join(names)}")
    task.main_metric = task.main_metric or task.metrics[0]
    if task.main_metric not in task.metrics:
        raise UserError(f"{where}.main_metric: {task.main_metric!r} is not among metrics {task.metrics}")
    _coerce_lists(task.sweep, where)
    if task.type == "classification":
        if not task.data.train or not task.data.dev:
            raise UserError(f"{where}.data: a classification task needs data.train and data.dev")
        if "text" not in task.data.columns or "label" not in task.data.columns:
            raise UserError(f"{where}.data.columns: map at least `text` and `label` to column names")
        unknown = set(task.data.columns) - {"text", "text_pair", "label"}
        if unknown:
            raise UserError(f"{where}.data.columns.{sorted(unknown)[0]}: roles are text, text_pair, label")
    elif task.type == "retrieval":
        if not task.data.beir:
            raise UserError(f"{where}.data.beir: a retrieval task needs a BEIR folder")
    elif bool(task.data.train) == bool(task.data.manifest):
        raise UserError(f"{where}.data: an mlm task needs held-out data: either data.train (a text file or a split) "
                        f"or data.manifest (a mixture manifest of prepared shards)")
    if task.type == "mlm" and not 0.0 < task.mlm_probability < 1.0:
        raise UserError(f"{where}.mlm_probability: must be in (0, 1), got {task.mlm_probability}")
    if task.init_from_task is not None and earlier.get(task.init_from_task) != task.type:
        same_type = [name for name, kind in earlier.items() if kind == task.type]
        raise UserError(f"{where}.init_from_task: {task.init_from_task!r} is not an earlier {task.type} task of "
                        f"this suite (those are: {same_type})")


def suite_config(path: Path, overrides: list[str] | None = None):
    """The suite file as an omegaconf node with `key.path=value` overrides applied (list indices allowed:
    `tasks.0.sweep.seeds=[0]`)."""
    import yaml
    from omegaconf import OmegaConf

    if not Path(path).is_file():
        raise UserError(f"suite file {path} does not exist")
    conf = OmegaConf.load(path)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r}: expected key=value")
        OmegaConf.update(conf, key, yaml.safe_load(value), merge=True)
    return conf


def load_suite(path: str | Path, overrides: list[str] | None = None) -> Suite:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    try:
        raw = OmegaConf.to_container(suite_config(path, overrides), resolve=True)
    except (OmegaConfBaseException, ValueError) as err:
        message = str(err).splitlines()[0]
        raise UserError(f"{path}: cannot read the suite ({message})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a suite is a mapping with `name` and `tasks`")
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise UserError(f"{path}: {key}: unknown key{did_you_mean(key, TOP_LEVEL_KEYS)} (known: {', '.join(TOP_LEVEL_KEYS)})")
    if not raw.get("tasks"):
        raise UserError(f"{path}: tasks: the suite lists no tasks")
    tasks: list[TaskSpec] = []
    for index, values in enumerate(raw["tasks"]):
        where = f"{path}: tasks[{index}]"
        if not isinstance(values, dict):
            raise UserError(f"{where}: expected a mapping with name, type and data")
        values = dict(values)
        for required in ("name", "type", "data"):
            if required not in values:
                raise UserError(f"{where}.{required}: missing")
        where = f"{path}: tasks[{index}] ({values['name']})"
        values["data"] = _build(DataSpec, values["data"], f"{where}.data")
        values["sweep"] = _build(Sweep, values.get("sweep") or {}, f"{where}.sweep")
        task = _build(TaskSpec, values, where)
        _validate_task(task, where, {t.name: t.type for t in tasks})
        if task.name in (t.name for t in tasks):
            raise UserError(f"{where}.name: {task.name!r} appears twice")
        tasks.append(task)
    return Suite(name=str(raw.get("name") or path.stem), path=path, tasks=tasks)


def select_tasks(suite: Suite, names: list[str]) -> Suite:
    """The suite cut to the named tasks, in the suite's order, with every earlier task a kept one starts from
    (init_from_task) kept too: its fine-tuned models are where that task begins."""
    known = [t.name for t in suite.tasks]
    for name in names:
        if name not in known:
            raise UserError(f"--tasks: {name!r} is not a task of {suite.path}{did_you_mean(name, known)}")
    by_name = {t.name: t for t in suite.tasks}
    kept = set()
    for name in names:
        while name is not None and name not in kept:
            kept.add(name)
            name = by_name[name].init_from_task
    return Suite(name=suite.name, path=suite.path, tasks=[t for t in suite.tasks if t.name in kept])

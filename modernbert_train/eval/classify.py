"""Classification / regression fine-tuning (GLUE-style): one run = one (lr, weight decay, epochs, seed).

AdamW with linear warmup and decay, evaluation on dev after every epoch, early stopping on the task's main
metric, and the test split (when given) scored at the best dev epoch. Plain torch on our packed model:
no padding, any attention backend, CPU or GPU.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from modernbert_train.common.errors import UserError
from modernbert_train.eval.data import load_split, select_columns
from modernbert_train.eval.encoder import PackedBatch, SequenceClassifier, TextEncoder
from modernbert_train.eval.metrics import beats, classification_metric
from modernbert_train.eval.models import EvalModel
from modernbert_train.eval.suite import TaskSpec


@dataclass
class EncodedSplit:
    sequences: list[list[int]]
    labels: np.ndarray  # int64 classes, or float32 targets for regression


@dataclass
class ClassificationData:
    train: EncodedSplit
    dev: EncodedSplit
    test: EncodedSplit | None
    num_labels: int
    label_names: list


def load_classification_data(task: TaskSpec, encoder: TextEncoder, where: str) -> ClassificationData:
    splits = {}
    for split in ("train", "dev", "test"):
        name = getattr(task.data, split)
        if name is None:
            continue
        rows = load_split(task.data.dataset, task.data.config, name, f"{where}.data.{split}")
        if split == "train" and task.limit:
            rows = rows[: task.limit]
        splits[split] = select_columns(rows, task.data.columns, f"{where}.data.{split} ({name})")
    regression = task.num_labels == 1
    label_names = task.data.label_names
    if label_names is None and not regression:
        label_names = sorted({v for part in splits.values() for v in part["label"]}, key=str)
    encoded = {}
    for split, columns in splits.items():
        if regression:
            labels = np.asarray(columns["label"], dtype=np.float32)
        else:
            index = {str(name): i for i, name in enumerate(label_names)}
            unknown = [v for v in columns["label"] if str(v) not in index]
            if unknown:
                raise UserError(f"{where}.data.label_names: label {unknown[0]!r} of split {split} is not in "
                                f"{label_names}")
            labels = np.asarray([index[str(v)] for v in columns["label"]], dtype=np.int64)
        encoded[split] = EncodedSplit(encoder.encode(columns["text"], columns.get("text_pair")), labels)
    num_labels = 1 if regression else (task.num_labels or len(label_names))
    return ClassificationData(encoded["train"], encoded["dev"], encoded.get("test"), num_labels, label_names or [])


@dataclass
class RunResult:
    dev: dict[str, float]
    test: dict[str, float] | None
    best_epoch: int
    epochs_run: int
    classifier: SequenceClassifier | None = None  # kept only when a later task starts from it


def _batches(n: int, batch_size: int, rng: np.random.Generator | None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def predict(classifier: SequenceClassifier, split: EncodedSplit, batch_size: int, device) -> np.ndarray:
    classifier.eval()
    outputs = []
    for index in _batches(len(split.sequences), batch_size, None):
        batch = PackedBatch.of([split.sequences[i] for i in index], device)
        outputs.append(classifier(batch).float().cpu())
    return torch.cat(outputs).numpy()


def score(task: TaskSpec, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    regression = logits.shape[1] == 1
    predictions = logits[:, 0] if regression else logits.argmax(axis=1)
    return {m: classification_metric(m, labels, predictions) for m in task.metrics}


def finetune_classifier(task: TaskSpec, data: ClassificationData, model: EvalModel, *, lr: float,
                        weight_decay: float, epochs: int, seed: int, device, start_from=None,
                        keep_model: bool = False) -> RunResult:
    sweep = task.sweep
    mlm = model.build(seed)
    classifier = SequenceClassifier(mlm, data.num_labels, pooling=task.pooling, dropout=sweep.dropout)
    if start_from is not None:  # another task's fine-tuned encoder (+ head when the label count matches)
        state = {k: v for k, v in start_from.state_dict().items()
                 if not k.startswith("classifier.") or start_from.classifier.out_features == data.num_labels}
        classifier.load_state_dict(state, strict=False)
    classifier.to(device)
    no_decay = [p for n, p in classifier.named_parameters() if p.ndim < 2]
    decay = [p for n, p in classifier.named_parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=tuple(sweep.betas), eps=sweep.eps)
    steps_per_epoch = math.ceil(len(data.train.sequences) / sweep.batch_size)
    total = max(1, steps_per_epoch * epochs)
    warmup = int(sweep.warmup_ratio * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / (warmup + 1) if step < warmup else max(0.0, (total - step) / (total - warmup)))
    rng = np.random.default_rng(seed)
    regression = data.num_labels == 1
    best, best_state, best_epoch, stale, epoch = None, None, 0, 0, 0
    for epoch in range(1, epochs + 1):
        classifier.train()
        for index in _batches(len(data.train.sequences), sweep.batch_size, rng):
            batch = PackedBatch.of([data.train.sequences[i] for i in index], device)
            logits = classifier(batch).float()
            targets = torch.as_tensor(data.train.labels[index], device=device)
            loss = F.mse_loss(logits[:, 0], targets) if regression else F.cross_entropy(logits, targets)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        dev = score(task, predict(classifier, data.dev, sweep.batch_size * 2, device), data.dev.labels)
        if best is None or beats(dev[task.main_metric], best[task.main_metric]):
            best, best_epoch, stale = dev, epoch, 0
            best_state = copy.deepcopy(classifier.state_dict()) if (data.test is not None or keep_model) else None
        else:
            stale += 1
            if sweep.early_stopping is not None and stale >= sweep.early_stopping:
                break
    if best_state is not None:
        classifier.load_state_dict(best_state)
    test = None
    if data.test is not None:
        test = score(task, predict(classifier, data.test, sweep.batch_size * 2, device), data.test.labels)
    return RunResult(dev=best, test=test, best_epoch=best_epoch, epochs_run=epoch,
                     classifier=classifier.cpu() if keep_model else None)

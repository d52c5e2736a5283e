"""Callbacks: exact-resume state (data pipeline + RNG) and the run's metrics.jsonl.

Composer checkpoints hold each callback's `state_dict()` (keyed by class name) and hand it back through
`load_state_dict()` while the Trainer is built, before training starts.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from modernbert_train.checkpoint.files import prune_checkpoints
from modernbert_train.train.composer_model import micro_batches_of
from modernbert_train.train.metrics_file import MetricsFile


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for (run seed, rank, optimizer step), well mixed so neighbouring steps are unrelated."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ExactResumeState(Callback):
    """Makes a resumed run continue bit-identically (on the same number of processes; on another, with the
    same data order and no sample lost or repeated): loader position in the checkpoint, step-seeded RNG.

    The loader's state (position, packer buffer, tokens seen, for every rank) goes into composer's
    checkpoint through this callback's state_dict. The torch RNG (dropout) is re-seeded from (seed, rank,
    step) right before every step's forward, so it depends on the step alone: not on whether the process
    was restarted, and not on whether the data pipeline happened to draw from the global generator (torch's
    DataLoader does when it starts an iterator). Composer would neither restore RNG on a mid-epoch resume
    nor avoid replaying batches unless spin_dataloaders=False, which the trainer sets.
    """

    def __init__(self, loader, seed: int):
        self.loader = loader
        self.seed = seed

    def state_dict(self) -> dict[str, Any]:
        # Every rank calls state_dict() while a checkpoint is written (rank 0 writes the file); the loader's
        # state_dict is a collective that hands every rank's position to all of them.
        return {"world_size": dist.get_world_size(), "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # On another number of processes the loader re-partitions the saved positions and packer buffers
        # (data/elastic.py); it names what cannot continue (e.g. a node count that breaks the sample order).
        self.loader.load_state_dict(state["loader"])

    def after_dataloader(self, state: State, logger: Logger) -> None:
        torch.manual_seed(step_seed(self.seed, dist.get_global_rank(), int(state.timestamp.batch)))


# The masked cross-entropy metric is the loss the report tool plots ("train/loss", "eval/loss").
_JSONL_NAMES = {"cross_entropy": "loss"}


class MetricsJsonl(Callback):
    """One JSON line per optimizer step in <run dir>/metrics.jsonl (rank 0), the source for plots.

    Keys: step, tokens (cumulative real tokens), time_s (since the run's first start, across resumes),
    phase, train/loss, train/masked_accuracy, train/perplexity, lr, throughput/tokens_per_s,
    throughput/mfu (when the device's peak is known), batch_size (global rows this step), and after an
    evaluation eval/loss, eval/masked_accuracy, eval/perplexity (eval_NAME/... for each eval.manifests set).
    On resume the file is cut back to the checkpoint's step, so no step appears twice.
    """

    def __init__(self, metrics: MetricsFile, phase: str, micro_batch_size: int, lr_source,
                 peak_flops_per_device: float | None):
        self.metrics = metrics
        self.phase = phase
        self.micro_batch_size = micro_batch_size
        self.lr_source = lr_source
        self.peak_flops_per_device = peak_flops_per_device
        self.time_offset_s = 0.0
        self._started = time.monotonic()
        self._eval_values: dict[str, dict[str, float]] = {}
        self._pending: dict[str, float] | None = None

    # time_s continues across resumes: the checkpoint carries the elapsed time at that step.
    def elapsed_s(self) -> float:
        return self.time_offset_s + (time.monotonic() - self._started)

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed_s()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.time_offset_s = float(state["elapsed_s"])
        self._started = time.monotonic()

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.peak_flops_per_device is None and torch.cuda.is_available():
            from composer.callbacks.speed_monitor import get_gpu_flops_available

            # composer's datasheet table (dense, for this precision); unknown cards give no MFU.
            self.peak_flops_per_device = get_gpu_flops_available(state) or None
        if dist.get_global_rank() != 0:
            return
        self.metrics.truncate_after(int(state.timestamp.batch))

    def eval_end(self, state: State, logger: Logger) -> None:
        # Called once per evaluator, while state.eval_metric_values holds that evaluator's values only.
        self._eval_values[state.dataloader_label or "eval"] = dict(state.eval_metric_values or {})

    def batch_end(self, state: State, logger: Logger) -> None:
        rows = sum(int(mb.get("num_rows", self.micro_batch_size)) for mb in micro_batches_of(state.batch))
        model = getattr(state.model, "module", state.model)  # unwrap DDP
        flops = float(model.flops_per_batch(state.batch)) if hasattr(model, "flops_per_batch") else 0.0
        # Collective on every rank, before the rank-0-only write below.
        totals = dist.all_gather_object((rows, flops))
        self._pending = {
            "batch_size": sum(t[0] for t in totals),
            "flops": sum(t[1] for t in totals),
        }

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        # After BATCH_END the evaluators have run, so eval metrics of this step are known here.
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        record: dict[str, Any] = {
            "step": int(state.timestamp.batch),
            "tokens": int(state.timestamp.token),
            "time_s": round(self.elapsed_s(), 3),
            "phase": self.phase,
            "lr": self.lr_source(),
            "batch_size": pending["batch_size"],
        }
        loss = (state.total_loss_dict or {}).get("loss/train/total")
        if loss is not None:
            record["train/loss"] = float(loss)
        for name, value in (state.train_metric_values or {}).items():
            record.setdefault(f"train/{_JSONL_NAMES.get(name, name)}", float(value))
        seconds = state.timestamp.batch_wct.total_seconds()
        previous = state.previous_timestamp
        step_tokens = int(state.timestamp.token) - (int(previous.token) if previous is not None else 0)
        if seconds > 0:
            record["throughput/tokens_per_s"] = step_tokens / seconds
            peak = self.peak_flops_per_device
            if peak:
                record["throughput/mfu"] = pending["flops"] / (seconds * peak * dist.get_world_size())
        for label, values in self._eval_values.items():
            for name, value in values.items():
                record[f"{label}/{_JSONL_NAMES.get(name, name)}"] = float(value)
        self._eval_values = {}
        # Composer's loggers (wandb, console) already get losses and metrics; add what only we compute.
        logger.log_metrics({k: v for k, v in record.items() if k.startswith(("throughput/", "lr", "batch_size"))})
        if dist.get_global_rank() == 0:
            self.metrics.append(record)


class PruneCheckpoints(Callback):
    """Keeps the newest `keep_last` checkpoints of the run directory across restarts (rank 0, after a save: at
    the next step's start and at the end of training); see checkpoint.files.prune_checkpoints."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int):
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last

    def prune(self) -> None:
        if dist.get_global_rank() == 0:
            prune_checkpoints(self.run_dir, self.keep_last)

    def batch_start(self, state: State, logger: Logger) -> None:
        self.prune()

    def fit_end(self, state: State, logger: Logger) -> None:
        self.prune()


__all__ = ["ExactResumeState", "MetricsJsonl", "PruneCheckpoints"]

"""Live evaluation during pretraining (the authors ran MNLI live): every N optimizer steps, the current
weights are fine-tuned / scored on a small suite and the scores appended to the run's metrics.jsonl as
`live_eval/<task>/<metric>` (mean over the suite's seeds), which `modernbert-train report` plots.

Enabled by the recipe keys `eval.suite` (a suite file) and `eval.suite_interval` (e.g. 500ba). Training's
random state is untouched (the evaluation runs under a forked RNG), so exact resume still holds.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from modernbert_train.common.errors import UserError
from modernbert_train.eval.models import EvalModel
from modernbert_train.eval.runner import Progress, evaluate_model, runs_per_model
from modernbert_train.eval.suite import load_suite

log = logging.getLogger("modernbert_train")
PREFIX = "live_eval/"
# How often the ranks waiting for rank 0's evaluation meet it in a collective: far below any collective timeout.
HEARTBEAT_S = 1.0


def parse_steps(interval: str, key: str = "eval.suite_interval") -> int:
    match = re.fullmatch(r"\s*(\d+)\s*ba\s*", str(interval))
    if not match or int(match.group(1)) < 1:
        raise UserError(f"{key}: {interval!r} must be a number of optimizer steps like 500ba, or checkpoint "
                        f"(then checkpoint.interval, in steps)")
    return int(match.group(1))


class LiveEvaluation(Callback):
    def __init__(self, suite_file: str, interval: str, metrics, phase: str, model_config,
                 tokenizer_file: str | Path, overrides: list[str] | None = None, where: str = "eval.suite"):
        try:  # a bad suite fails before training starts
            self.suite = load_suite(suite_file, overrides)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        self.every = parse_steps(interval)
        self.metrics = metrics  # train.metrics_file.MetricsFile: the file's one writer
        self.phase = phase
        self.model_config = model_config
        self.tokenizer_file = Path(tokenizer_file)
        self._group = None  # a gloo group for the waits, made on first use (every rank reaches it together)

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        if step % self.every:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        inner = getattr(state.model, "module", state.model).model
        # Collective under FSDP: every rank takes part, rank 0 evaluates.
        weights = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        device = next(inner.parameters()).device
        record = self._on_rank_zero(lambda: self.evaluate(weights, step, int(state.timestamp.token), device))
        if record is not None:
            logger.log_metrics({k: v for k, v in record.items() if k.startswith(PREFIX)})

    def _on_rank_zero(self, work):
        """`work()` on rank 0 while the other ranks wait, with no collective held longer than HEARTBEAT_S.

        A suite can take longer than the collective timeout (composer's is 300 s): a barrier held through it
        killed the run. Rank 0 runs the work on a thread; every rank meets in a small all-reduce every
        HEARTBEAT_S until it is done; a failure there reaches every rank, named, instead of a timeout."""
        import torch.distributed as torch_dist

        if dist.get_world_size() == 1:
            return work()
        if self._group is None:
            from modernbert_train.common.ranks import new_gloo_group

            self._group = new_gloo_group()  # the default group may be NCCL
        outcome: list = []
        worker = None
        if dist.get_global_rank() == 0:
            worker = threading.Thread(target=_run_into, args=(work, outcome), name="live-eval", daemon=True)
            worker.start()
        while True:
            status = 0
            if worker is not None:
                worker.join(HEARTBEAT_S)
                status = 0 if worker.is_alive() else (2 if isinstance(outcome[0], BaseException) else 1)
            flag = torch.tensor([status], dtype=torch.int64)
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=self._group)
            if flag.item():
                break
        if flag.item() == 2:
            if worker is not None:
                raise outcome[0]
            raise UserError("live evaluation failed on rank 0 (its log names the error)")
        return outcome[0] if worker is not None else None

    def evaluate(self, weights: dict, step: int, tokens: int, device) -> dict:
        started = time.perf_counter()
        model = EvalModel(name=f"{self.phase}@{step}", source=f"step {step}", config=self.model_config,
                          tokenizer_file=self.tokenizer_file, weights={k: v.float() for k, v in weights.items()})
        record = {"step": step, "tokens": tokens, "phase": self.phase}
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            bar = Progress(runs_per_model(self.suite, model), mode="none")
            for _, summary in evaluate_model(self.suite, model, device, bar):
                for metric, value in summary.metric_means.items():
                    record[f"{PREFIX}{summary.task}/{metric}"] = value
        self.metrics.append(record)
        log.info("live evaluation at step %d (%.0f s): %s", step, time.perf_counter() - started,
                 {k[len(PREFIX):]: round(v, 4) for k, v in record.items() if k.startswith(PREFIX)})
        return record


def _run_into(work, outcome: list) -> None:
    try:
        outcome.append(work())
    except BaseException as err:  # noqa: BLE001 - handed to the waiting main thread, which raises it
        outcome.append(err)

"""Loss-spike guard: skip the update of a spiking step; after several in a row, roll back and skip the data.

Rule. After every step's backward pass (composer's AFTER_TRAIN_BATCH, before the optimizer step) the guard
takes the step's mean masked loss (over all ranks) and the global gradient norm. Each is compared with
exponential moving statistics (decay `ema`) of the accepted steps before it: the value is a spike when it
exceeds the running mean by more than `z_threshold` running standard deviations and by more than
`min_rise` x the mean (`grad_min_rise` for the gradient norm). A non-finite loss or norm is always a spike. No step is judged before
`warmup_steps` accepted steps.

Actions. A spike's update is skipped (its gradients are dropped before the optimizer sees them; the step
still counts). `max_consecutive` spikes in a row raise `SpikeRollback`: `train()` then moves the checkpoints
written after the newest good one aside, points `latest` at the good one, records the rollback in
<run dir>/spike_guard.json and restarts from it. The restarted run skips the data the bad steps read and,
when `lr_factor` < 1, multiplies the peak lr by it from then on. "Good" means written at least one step
before the first spike: a loss spike shows the damage of the update before it.

Every action is a line of metrics.jsonl ({"event": "spike_skipped" | "rollback", ...}); the report lists
them. The guard's statistics are part of the checkpoint, and spike_guard.json keeps the rollbacks across
restarts, so a resumed run decides exactly as an uninterrupted one. A run without spikes is bit-identical
with the guard on or off: the guard only reads losses and gradients.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from modernbert_train.checkpoint.files import checkpoints_by_step, set_aside_checkpoints_after
from modernbert_train.common.errors import UserError
from modernbert_train.train.metrics_file import MetricsFile
from modernbert_train.train.recipe import SpikeGuardConfig

log = logging.getLogger("modernbert_train")
GUARD_FILE = "spike_guard.json"
ROLLED_BACK_DIR = "rolled_back"


@dataclass
class RunningStats:
    """Exponential moving mean and variance of accepted values."""
    mean: float = 0.0
    var: float = 0.0
    count: int = 0

    def limit(self, z_threshold: float, min_rise: float) -> float:
        return self.mean + max(z_threshold * math.sqrt(self.var), min_rise * abs(self.mean))

    def update(self, value: float, ema: float) -> None:
        if self.count == 0:
            self.mean, self.var = value, 0.0
        else:
            delta = value - self.mean
            self.mean += (1.0 - ema) * delta
            self.var = ema * (self.var + (1.0 - ema) * delta * delta)
        self.count += 1


@dataclass(frozen=True)
class Rollback:
    """One rollback, as kept in spike_guard.json."""
    to_step: int          # the good checkpoint's step the run restarts from
    spike_steps: list[int]
    skip_steps: int       # loader steps to drop after the restart (the data of steps to_step+1 .. last spike)
    lr_factor: float


class SpikeRollback(Exception):
    """Raised inside fit() when `max_consecutive` spikes came in a row; `train()` handles it."""

    def __init__(self, spike_steps: list[int]):
        super().__init__(f"{len(spike_steps)} loss spikes in a row at steps {spike_steps}")
        self.spike_steps = spike_steps


def read_rollbacks(run_dir: Path) -> list[Rollback]:
    path = run_dir / GUARD_FILE
    if not path.is_file():
        return []
    return [Rollback(**entry) for entry in json.loads(path.read_text())["rollbacks"]]


def _write_rollbacks(run_dir: Path, rollbacks: list[Rollback]) -> None:
    tmp = run_dir / (GUARD_FILE + ".tmp")
    tmp.write_text(json.dumps({"rollbacks": [asdict(r) for r in rollbacks]}, indent=1) + "\n")
    os.replace(tmp, run_dir / GUARD_FILE)


def prepare_rollback(run_dir: Path, spike_steps: list[int], cfg: SpikeGuardConfig) -> Rollback:
    """Rank 0: set the run directory up so that autoresume restarts from the newest good checkpoint."""
    rollbacks = read_rollbacks(run_dir)
    if len(rollbacks) >= cfg.max_rollbacks:
        raise UserError(f"spike_guard: {len(spike_steps)} loss spikes in a row at steps {spike_steps} after "
                        f"{len(rollbacks)} rollbacks (spike_guard.max_rollbacks); lower optimizer.lr or check "
                        f"the data ({run_dir / GUARD_FILE} lists the rollbacks)")
    by_step = checkpoints_by_step(run_dir)
    good_steps = [step for step in by_step if step <= spike_steps[0] - 2]
    if not good_steps:
        raise UserError(f"spike_guard: {len(spike_steps)} loss spikes in a row at steps {spike_steps} and no "
                        f"checkpoint of {run_dir} before step {spike_steps[0] - 1} to roll back to (save more "
                        f"often: checkpoint.interval, checkpoint.keep_last)")
    good = max(good_steps)
    set_aside_checkpoints_after(run_dir, good, run_dir / ROLLED_BACK_DIR)
    rollback = Rollback(to_step=good, spike_steps=list(spike_steps), skip_steps=spike_steps[-1] - good,
                        lr_factor=cfg.lr_factor)
    _write_rollbacks(run_dir, rollbacks + [rollback])
    log.warning("spike guard: %d spikes in a row at steps %s; rolling back to step %d, skipping the data of %d "
                "steps%s", len(spike_steps), spike_steps, good, rollback.skip_steps,
                f", peak lr x {cfg.lr_factor}" if cfg.lr_factor != 1.0 else "")
    return rollback


def roll_back(run_dir: Path, spike_steps: list[int], cfg: SpikeGuardConfig) -> None:
    """On every rank after the trainer closed: rank 0 prepares the run directory, the others wait for it.
    Every rank saw the same (all-reduced) spikes, so all of them arrive here together."""
    from modernbert_train.common.ranks import all_ranks_agree

    # [i26-faults] the agreement is the barrier: a failed rollback on rank 0 ends every rank at once, named.
    with all_ranks_agree("rolling back to an earlier checkpoint"):
        if dist.get_global_rank() == 0:
            prepare_rollback(Path(run_dir), spike_steps, cfg)


class SpikeGuard(Callback):
    """See the module docstring. `loader` is the training loader; `lr_schedule` the LRSchedule callback."""

    def __init__(self, cfg: SpikeGuardConfig, run_dir: Path, metrics: MetricsFile, loader, lr_schedule):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.metrics = metrics
        self.loader = loader
        self.lr_schedule = lr_schedule
        self.loss_stats = RunningStats()
        self.grad_stats = RunningStats()
        self.streak: list[int] = []
        self._loss_sum: torch.Tensor | None = None
        self._masked = 0

    # -- checkpointed state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"loss": asdict(self.loss_stats), "grad_norm": asdict(self.grad_stats), "streak": list(self.streak)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_stats = RunningStats(**state["loss"])
        self.grad_stats = RunningStats(**state["grad_norm"])
        self.streak = list(state["streak"])

    # -- restart after a rollback ------------------------------------------------------------------------
    def fit_start(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        rollbacks = [r for r in read_rollbacks(self.run_dir) if r.to_step <= step]
        self.lr_schedule.scale = math.prod(r.lr_factor for r in rollbacks)
        here = [r for r in rollbacks if r.to_step == step]
        if not here:
            return
        rollback = here[-1]
        # The checkpoint's loader position is the good step's; drop the data the spiking steps read.
        for _ in range(rollback.skip_steps):
            next(self.loader)
        self._log_event(step, int(state.timestamp.token), {
            "event": "rollback", "spike_steps": rollback.spike_steps, "skipped_steps": rollback.skip_steps,
            "lr_scale": self.lr_schedule.scale}, unique=True)

    # -- per step ----------------------------------------------------------------------------------------
    def before_train_batch(self, state: State, logger: Logger) -> None:
        self._loss_sum, self._masked = None, 0

    def after_loss(self, state: State, logger: Logger) -> None:
        masked = int(state.batch["num_masked"])
        if masked:
            loss = state.loss.detach().float() * masked
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._masked += masked

    def after_train_batch(self, state: State, logger: Logger) -> None:
        loss, grad_norm = self._step_loss_and_grad_norm(state)
        step = int(state.timestamp.batch) + 1  # the step being trained (metrics.jsonl numbering)
        cfg = self.cfg
        judged = self.loss_stats.count >= cfg.warmup_steps
        loss_limit = self.loss_stats.limit(cfg.z_threshold, cfg.min_rise)
        grad_limit = self.grad_stats.limit(cfg.z_threshold, cfg.grad_min_rise)
        spike = (not math.isfinite(loss) or not math.isfinite(grad_norm)
                 or (judged and (loss > loss_limit or grad_norm > grad_limit)))
        if not spike:
            self.loss_stats.update(loss, cfg.ema)
            self.grad_stats.update(grad_norm, cfg.ema)
            self.streak = []
            return
        self.streak.append(step)
        self._log_event(step, int(state.timestamp.token), {
            "event": "spike_skipped", "spike/loss": _finite_or_none(loss), "spike/grad_norm": _finite_or_none(grad_norm),
            "spike/loss_limit": loss_limit, "spike/grad_norm_limit": grad_limit})
        log.warning("spike guard: step %d loss %.4g (limit %.4g), grad norm %.4g (limit %.4g): update skipped",
                    step, loss, loss_limit, grad_norm, grad_limit)
        if len(self.streak) >= cfg.max_consecutive:
            raise SpikeRollback(list(self.streak))
        for optimizer in state.optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None

    def _step_loss_and_grad_norm(self, state: State) -> tuple[float, float]:
        """Mean masked loss of the step over all ranks, and the global gradient norm (one sync)."""
        device = next(iter(state.model.parameters())).device
        loss_sum = self._loss_sum if self._loss_sum is not None else torch.zeros((), device=device)
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor of the shards' norms
            norm = norm.full_tensor()
        # FSDP1 leaves each rank the gradients of its own shard: the global norm is the root of the ranks'
        # summed squares. Every rank must judge the same norm, or a rollback raised on some ranks hangs the rest.
        sharded = getattr(self, "_fsdp1", None)
        if sharded is None:  # the wrapping is fixed once training runs: look once, not every step
            sharded = self._fsdp1 = _has_fsdp1_shards(state.model)
        totals = torch.stack([loss_sum.reshape(()).to(device, torch.float64),
                              torch.tensor(float(self._masked), device=device, dtype=torch.float64),
                              norm.to(device, torch.float64) ** 2 if sharded else torch.zeros((), device=device,
                                                                                              dtype=torch.float64)])
        dist.all_reduce(totals, reduce_operation="SUM")
        loss_sum, masked, squares = totals.tolist()
        return (loss_sum / masked if masked else 0.0), (math.sqrt(squares) if sharded else float(norm))

    def _log_event(self, step: int, tokens: int, fields: dict[str, Any], unique: bool = False) -> None:
        if dist.get_global_rank() != 0:
            return
        self.metrics.append({"step": step, "tokens": tokens, **fields}, unique=unique)


def _has_fsdp1_shards(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return dist.get_world_size() > 1 and any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


__all__ = ["SpikeGuard", "SpikeRollback", "RunningStats", "Rollback", "prepare_rollback", "read_rollbacks",
           "roll_back"]

"""Loss-spike guard: skip the update of a spiking step; after several in a row, roll back and skip the data.

A composer Algorithm, because it changes the training state: the gradients (a spike's are zeroed), the lr
(scaled after rollbacks) and the loader (skip windows). builders.build_algorithms lists it after
GradientClipping; composer runs "after" events in reverse list order, so on AFTER_TRAIN_BATCH the guard sees
the gradient norm before clipping.

Rule. Each step's mean masked loss (over all ranks) and global gradient norm are compared with exponential
moving statistics (decay `ema`) of the accepted steps before it. The loss is a spike when it exceeds the
running mean by `z_threshold` running standard deviations AND by `min_rise` x the mean; the gradient norm when
it exceeds `grad_min_rise` x its running mean AND `z_threshold` deviations (a tiny model's healthy norms jump
40x their mean early in training: the default only calls a norm a spike far beyond that). A non-finite loss
or norm is always a spike. No step is judged before `warmup_steps` accepted steps.

On the device. The decision never leaves the device: the statistics live there, a spike's gradients are
masked to zero (the optimizer then applies only its momentum and decays Adam's moments, as for a zero
gradient), and a healthy step multiplies nothing, so a run without spikes is bit-identical with the guard on
or off. The host learns what happened one step later: each step's figures go to host memory by a
non-blocking copy, read at the next step (the device finished them long before), where the guard writes
the event line and counts the streak.

Rollback. `max_consecutive` spikes in a row raise `SpikeRollback`; `train()` ends the attempt and calls
`roll_back`: rank 0 picks the newest checkpoint at least two steps before the first judged-bad step of the
episode (the streak, and skipped spikes within `warmup_steps` before it) and at a step the guard had judged.
Never one inside the unjudged warm-up: with none, the attempt restarts from the phase's initial weights
when the streak came soon after judging began. Newer checkpoints are set aside, and <run dir>/
spike_guard.json records the loader steps to skip (from the checkpoint's position through the last step the
attempt read, counted since the phase began, so they stay valid whatever step a later rollback restarts
from) and the lr factor. Every attempt skips every window recorded so far and multiplies the peak lr by
every factor. Rank 0's outcome (or error) is broadcast, so no rank waits in a barrier.

Record. Every skip and rollback is an event line of metrics.jsonl; events survive the cut-back of a resume.
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
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from modernbert_train.checkpoint.files import checkpoints_by_step, set_aside_checkpoints_after
from modernbert_train.common.errors import UserError
from modernbert_train.train.metrics_file import METRICS_FILE, MetricsFile
from modernbert_train.train.recipe import SpikeGuardConfig

log = logging.getLogger("modernbert_train")
GUARD_FILE = "spike_guard.json"
ROLLED_BACK_DIR = "rolled_back"
# The figures of one step, in the order of the device record the host reads back.
_FIELDS = ("loss", "grad_norm", "loss_limit", "grad_norm_limit", "judged", "loss_rule", "grad_rule", "non_finite")


@dataclass
class RunningStats:
    """Exponential moving mean and variance of accepted values (the host copy kept in checkpoints)."""
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
    to_step: int          # the checkpoint's step the run restarts from (0: the phase's initial weights)
    spike_steps: list[int]
    skip_steps: int       # optimizer steps discarded: to_step+1 .. the last spike
    lr_factor: float
    # Loader steps (1-based, counted since the phase began, skipped ones included) never read again: from the
    # checkpoint's position through the last step the attempt read.
    skip_from: int = -1
    skip_to: int = -1
    reason: str = ""

    def window(self) -> tuple[int, int]:
        if self.skip_from < 0:  # written before loader positions were recorded: steps = loader steps then
            return self.to_step + 1, self.to_step + self.skip_steps
        return self.skip_from, self.skip_to


class SpikeRollback(Exception):
    """Raised inside fit() when `max_consecutive` spikes came in a row; `train()` handles it."""

    def __init__(self, spike_steps: list[int], reasons: list[str], judged_from: int | None,
                 loader_steps: dict[int, int], first_bad: int | None = None):
        self.spike_steps = list(spike_steps)
        # The first judged-bad step of the episode: skipped spikes shortly before the streak count too.
        self.first_bad = spike_steps[0] if first_bad is None else first_bad
        self.reasons = list(reasons)
        self.judged_from = judged_from
        self.loader_steps = dict(loader_steps)  # optimizer step -> loader step it read, for the window
        super().__init__(f"{len(spike_steps)} spikes in a row at steps {spike_steps}: {'; '.join(reasons)}")


def read_rollbacks(run_dir: Path) -> list[Rollback]:
    path = Path(run_dir) / GUARD_FILE
    if not path.is_file():
        return []
    return [Rollback(**entry) for entry in json.loads(path.read_text())["rollbacks"]]


def _write_rollbacks(run_dir: Path, rollbacks: list[Rollback]) -> None:
    tmp = run_dir / (GUARD_FILE + ".tmp")
    tmp.write_text(json.dumps({"rollbacks": [asdict(r) for r in rollbacks]}, indent=1) + "\n")
    os.replace(tmp, run_dir / GUARD_FILE)


def choose_restart(checkpoint_steps, first_spike: int, judged_from: int | None, warmup_steps: int) -> int | None:
    """The step to restart from: the newest checkpoint at least two steps before the first spike (a loss spike
    shows the damage of the update before it) that the guard had judged. With none, 0 (the initial weights)
    when the streak began within `warmup_steps` of judging (whatever hurt the model may have come unjudged);
    None when there is nothing safe to go back to."""
    limit = first_spike - 2
    if judged_from is not None:
        judged = [step for step in checkpoint_steps if judged_from <= step <= limit]
        if judged:
            return max(judged)
    if judged_from is None or limit < judged_from + warmup_steps:
        return 0
    return None


def prepare_rollback(run_dir: Path, spikes: SpikeRollback, cfg: SpikeGuardConfig) -> Rollback:
    """Rank 0: set the run directory up so that the next attempt restarts from a checkpoint before the spikes."""
    rollbacks = read_rollbacks(run_dir)
    what = f"{len(spikes.spike_steps)} spikes in a row at steps {spikes.spike_steps} ({'; '.join(spikes.reasons)})"
    if len(rollbacks) >= cfg.max_rollbacks:
        raise UserError(f"spike_guard: {what} after {len(rollbacks)} rollbacks (spike_guard.max_rollbacks); lower "
                        f"optimizer.lr or check the data ({run_dir / GUARD_FILE} lists the rollbacks)")
    by_step = checkpoints_by_step(run_dir)
    good = choose_restart(by_step, spikes.first_bad, spikes.judged_from, cfg.warmup_steps)
    if good is None:
        raise UserError(f"spike_guard: {what}, and no checkpoint of {run_dir} between step {spikes.judged_from} "
                        f"(where judging began) and step {spikes.first_bad - 2} to roll back to (save more "
                        f"often: checkpoint.interval, checkpoint.keep_last)")
    last = spikes.spike_steps[-1]
    skip_from = spikes.loader_steps.get(good, good) + 1 if good else 1
    # Through the last step this attempt read: the host learns of a streak one step late, and that step's data
    # must not be read again either.
    skip_to = max(spikes.loader_steps.values())
    set_aside_checkpoints_after(run_dir, good, run_dir / ROLLED_BACK_DIR)
    rollback = Rollback(to_step=good, spike_steps=spikes.spike_steps, skip_steps=last - good,
                        lr_factor=cfg.lr_factor, skip_from=skip_from, skip_to=skip_to, reason="; ".join(spikes.reasons))
    rollbacks.append(rollback)
    _write_rollbacks(run_dir, rollbacks)
    scale = math.prod(r.lr_factor for r in rollbacks)
    metrics = MetricsFile(run_dir / METRICS_FILE)
    metrics.append({
        "step": good, "tokens": _tokens_at(metrics, good), "event": "rollback", "rollback": len(rollbacks), "spike_steps": spikes.spike_steps,
        "reason": rollback.reason, "skipped_steps": rollback.skip_steps, "skipped_loader_steps": [skip_from, skip_to],
        # Step lines after `good` are cut from metrics.jsonl when the next attempt starts: this says which.
        "discarded_steps": [good + 1, max(spikes.loader_steps)], "lr_scale": scale})
    log.warning("spike guard: %s; rolling back to %s, skipping loader steps %d-%d%s", what,
                f"step {good}" if good else "the initial weights", skip_from, skip_to,
                f", peak lr x {scale:g} from now on" if scale != 1.0 else "")
    return rollback


def _tokens_at(metrics: MetricsFile, step: int) -> int:
    """Tokens trained by the end of `step`, from its line of metrics.jsonl (0 when it has none)."""
    tokens = 0
    if metrics.path.is_file():
        for line in metrics.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step") == step and "event" not in record:
                tokens = int(record.get("tokens", 0))
    return tokens


def roll_back(run_dir: Path, spikes: SpikeRollback, cfg: SpikeGuardConfig) -> None:
    """On every rank after the attempt's trainer was released: rank 0 prepares the run directory and
    broadcasts the outcome, so a failure there (no checkpoint, too many rollbacks) stops every rank at once
    instead of leaving the others in a barrier until its timeout."""
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_global_rank() == 0:
        try:
            prepare_rollback(Path(run_dir), spikes, cfg)
        except BaseException as err:  # noqa: BLE001 - every failure must reach the other ranks
            error = err
            outcome[0] = f"{type(err).__name__}: {err}"
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise UserError(f"spike guard: the rollback failed on rank 0: {outcome[0]}")


def _loader_step_at(offsets: list[list[int]], step: int) -> int:
    """Loader step read by optimizer step `step`, from the (first step, loader step - step) change points."""
    offset = 0
    for first, value in offsets:
        if first > step:
            break
        offset = value
    return step + offset


@dataclass
class _Pending:
    step: int
    tokens: int
    host: torch.Tensor
    ready: Any = None  # a CUDA event after the copy, or None when the copy was synchronous


class SpikeGuard(Algorithm):
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
        self.reasons: list[str] = []
        self.judged_from: int | None = None
        self.skipped: list[int] = []  # recent judged-bad steps (a rollback returns to a checkpoint before them)
        self.offsets: list[list[int]] = []  # change points of (loader step - optimizer step)
        self._loader_steps: dict[int, int] = {}
        self._device_stats: torch.Tensor | None = None  # [loss mean, var, count, grad mean, var, count]
        self._loss_sum: torch.Tensor | None = None
        self._masked = 0
        self._pending: _Pending | None = None
        self._rollback_due = False
        self._fsdp1: bool | None = None
        rollbacks = read_rollbacks(self.run_dir)
        # Every window since the phase began stays skipped, whatever step this attempt starts from.
        if loader is not None:
            loader.skip_windows = [r.window() for r in rollbacks]
        self.lr_scale = math.prod(r.lr_factor for r in rollbacks)

    # -- checkpointed state (host values; read at a checkpoint, where composer waits for the device anyway) --
    def state_dict(self) -> dict[str, Any]:
        self._harvest(final=True)
        self._stats_to_host()
        return {"loss": asdict(self.loss_stats), "grad_norm": asdict(self.grad_stats), "streak": list(self.streak),
                "reasons": list(self.reasons), "judged_from": self.judged_from, "offsets": self.offsets,
                "skipped": list(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_stats = RunningStats(**state["loss"])
        self.grad_stats = RunningStats(**state["grad_norm"])
        self.streak = list(state["streak"])
        self.reasons = list(state.get("reasons", []))
        self.judged_from = state.get("judged_from")
        self.offsets = [list(x) for x in state.get("offsets", [])]
        self.skipped = list(state.get("skipped", []))
        self._device_stats = None
        self._rollback_due = len(self.streak) >= self.cfg.max_consecutive

    # -- events ----------------------------------------------------------------------------------------------
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.BATCH_START, Event.AFTER_LOSS, Event.AFTER_TRAIN_BATCH,
                         Event.FIT_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self.lr_schedule.scale = self.lr_scale
        elif event == Event.BATCH_START:
            self._batch_start(state)
        elif event == Event.AFTER_LOSS:
            masked = int(state.batch["num_masked"])  # a host int the loader counted
            if masked:
                loss = state.loss.detach().float() * masked
                self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
                self._masked += masked
        elif event == Event.AFTER_TRAIN_BATCH:
            self._harvest(final=False)
            self._judge(state)
        elif event == Event.FIT_END:
            self._harvest(final=True)
            self._raise_if_due()

    def _batch_start(self, state: State) -> None:
        self._loss_sum, self._masked = None, 0
        step = int(state.timestamp.batch) + 1
        loader_step = state.batch.get("loader_step") if isinstance(state.batch, dict) else None
        if loader_step is not None:
            self._loader_steps[step] = int(loader_step)
            if _loader_step_at(self.offsets, step) != loader_step:
                self.offsets = [o for o in self.offsets if o[0] < step] + [[step, int(loader_step) - step]]
        self._raise_if_due()  # a streak completed at the checkpoint just written (see state_dict)

    def _raise_if_due(self) -> None:
        if self._rollback_due:
            self._rollback_due = False
            loader_steps = {s: _loader_step_at(self.offsets, s) for s in range(0, max(self.streak) + 1)}
            loader_steps.update(self._loader_steps)
            # Skipped spikes within warmup_steps of each other and of the streak belong to its episode.
            first_bad = self.streak[0]
            for step in sorted(self.skipped, reverse=True):
                if step < first_bad and first_bad - step <= self.cfg.warmup_steps:
                    first_bad = step
            raise SpikeRollback(self.streak, self.reasons, self.judged_from, loader_steps, first_bad)

    # -- the device side: judge, mask, update, all without reading a device value ----------------------------
    def _judge(self, state: State) -> None:
        cfg = self.cfg
        if self._fsdp1 is None:  # the wrapping is fixed once training runs: look once, not every step
            self._fsdp1 = _has_fsdp1_shards(state.model)
        loss, norm = step_loss_and_grad_norm(state.model, self._loss_sum, self._masked, self._fsdp1)
        if self._device_stats is None:
            s, g = self.loss_stats, self.grad_stats  # once per attempt: the checkpoint's (host) values
            self._device_stats = torch.tensor([s.mean, s.var, s.count, g.mean, g.var, g.count], dtype=torch.float64,
                                              device=loss.device)
        stats = self._device_stats
        judged = stats[2] >= cfg.warmup_steps
        loss_limit = stats[0] + torch.maximum(cfg.z_threshold * stats[1].sqrt(), cfg.min_rise * stats[0].abs())
        grad_limit = stats[3] + torch.maximum(cfg.z_threshold * stats[4].sqrt(), cfg.grad_min_rise * stats[3].abs())
        non_finite = ~(torch.isfinite(loss) & torch.isfinite(norm))
        loss_rule = judged & (loss > loss_limit)
        grad_rule = judged & (norm > grad_limit)
        spike = non_finite | loss_rule | grad_rule
        for param in state.model.parameters():
            if param.grad is not None:
                _local(param.grad).masked_fill_(spike, 0.0)
        # Accepted steps update the statistics (the first one sets the mean).
        new = torch.cat([_ema(stats[0], stats[1], stats[2], loss, cfg.ema), _ema(stats[3], stats[4], stats[5], norm,
                                                                                cfg.ema)])
        stats.copy_(torch.where(spike, stats, new))
        record = torch.stack([loss, norm, loss_limit, grad_limit, judged.double(), loss_rule.double(),
                              grad_rule.double(), non_finite.double()])
        self._pending = self._to_host(int(state.timestamp.batch) + 1, int(state.timestamp.token), record)

    def _to_host(self, step: int, tokens: int, record: torch.Tensor) -> _Pending:
        if record.device.type == "cuda":
            host = torch.empty(record.shape, dtype=record.dtype, pin_memory=True)
            host.copy_(record, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return _Pending(step, tokens, host, ready)
        return _Pending(step, tokens, record.detach().clone())

    # -- the host side, one step behind --------------------------------------------------------------------
    def _harvest(self, final: bool) -> None:
        """Read the previous step's figures (its copy finished while this step ran), write the event line and
        count the streak. `final`: at a checkpoint or the end of training, where waiting costs nothing."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.ready is not None:
            pending.ready.synchronize()
        values = dict(zip(_FIELDS, pending.host.tolist()))
        step = pending.step
        if not (values["non_finite"] or values["loss_rule"] or values["grad_rule"]):
            self.streak, self.reasons = [], []
            if values["judged"] and self.judged_from is None:
                self.judged_from = step
            return
        reason = _reason(step, values)
        self.streak.append(step)
        self.skipped = self.skipped[-63:] + [step]
        self.reasons.append(reason)
        if dist.get_global_rank() == 0:
            self.metrics.append({
                "step": step, "tokens": pending.tokens, "event": "spike_skipped", "rule": _rules(values),
                "spike/loss": _finite_or_none(values["loss"]), "spike/grad_norm": _finite_or_none(values["grad_norm"]),
                "spike/loss_limit": values["loss_limit"], "spike/grad_norm_limit": values["grad_norm_limit"]})
        log.warning("spike guard: %s: update skipped", reason)
        if len(self.streak) >= self.cfg.max_consecutive:
            self._rollback_due = True
            if not final:
                self._raise_if_due()

    def _stats_to_host(self) -> None:
        if self._device_stats is not None:
            lm, lv, lc, gm, gv, gc = self._device_stats.tolist()
            self.loss_stats = RunningStats(lm, lv, int(lc))
            self.grad_stats = RunningStats(gm, gv, int(gc))


def _ema(mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, value: torch.Tensor, ema: float) -> torch.Tensor:
    """RunningStats.update on the device: [mean, var, count] after accepting `value`."""
    delta = value - mean
    first = count == 0
    new_mean = torch.where(first, value, mean + (1.0 - ema) * delta)
    new_var = torch.where(first, torch.zeros_like(var), ema * (var + (1.0 - ema) * delta * delta))
    return torch.stack([new_mean, new_var, count + 1])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly DTensor) gradient: masking it masks the shard in place."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def step_loss_and_grad_norm(model: torch.nn.Module, loss_sum: torch.Tensor | None, masked: int,
                            fsdp1: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's mean masked loss over all ranks and its global gradient norm, as float64 device tensors
    (one all-reduce, no read on the host).

    Each rank adds its share of the squared norm: a replicated gradient (one process, DDP) 1/world_size, an
    FSDP2 shard once per copy of that shard (HSDP replicates shards), an FSDP1 flat shard once."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    device = _local(grads[0]).device if grads else next(iter(model.parameters())).device
    world = dist.get_world_size()
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        squares = squares + torch.linalg.vector_norm(_local(grad), dtype=torch.float64).square() / _copies(
            grad, world, fsdp1)
    totals = torch.stack([loss_sum.reshape(()).to(device, torch.float64) if loss_sum is not None
                          else torch.zeros((), dtype=torch.float64, device=device),
                          torch.full((), float(masked), dtype=torch.float64, device=device), squares])
    if world > 1:
        dist.all_reduce(totals, reduce_operation="SUM")
    return totals[0] / totals[1].clamp(min=1.0), totals[2].sqrt()


def _copies(grad: torch.Tensor, world: int, fsdp1: bool) -> int:
    placements = getattr(grad, "placements", None)
    if placements is not None:  # FSDP2 / HSDP: the ranks along Replicate mesh dims hold the same shard
        mesh = grad.device_mesh
        copies = 1
        for dim, placement in enumerate(placements):
            if placement.is_replicate():
                copies *= mesh.size(dim)
        return copies * max(1, world // mesh.size())
    return 1 if fsdp1 else world


def _has_fsdp1_shards(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return dist.get_world_size() > 1 and any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _rules(values: dict[str, float]) -> str:
    names = [name for name, key in (("non-finite", "non_finite"), ("loss", "loss_rule"), ("grad-norm", "grad_rule"))
             if values[key]]
    return "+".join(names)


def _reason(step: int, values: dict[str, float]) -> str:
    parts = []
    if values["non_finite"]:
        parts.append(f"non-finite (loss {values['loss']:.4g}, grad norm {values['grad_norm']:.4g})")
    if values["loss_rule"]:
        parts.append(f"loss rule: loss {values['loss']:.4g} > limit {values['loss_limit']:.4g}")
    if values["grad_rule"]:
        parts.append(f"grad-norm rule: norm {values['grad_norm']:.4g} > limit {values['grad_norm_limit']:.4g}")
    return f"step {step} " + ", ".join(parts)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


__all__ = ["SpikeGuard", "SpikeRollback", "RunningStats", "Rollback", "choose_restart", "prepare_rollback",
           "read_rollbacks", "roll_back", "step_loss_and_grad_norm"]

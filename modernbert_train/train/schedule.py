"""Learning-rate schedule: linear warmup, constant plateau, final decay (1-sqrt, linear or cosine).

The schedule is a pure function of elapsed training time in max_duration's unit (real tokens or
optimizer steps), so a resumed run recomputes exactly the lr it would have had. It is applied by a
callback at BATCH_START from the timestamp at the start of the step, rather than as a composer
scheduler: composer steps its schedulers before advancing the timestamp, which would give every step
the lr of the step before it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from composer.core import Callback, Event, State
from composer.loggers import Logger

from modernbert_train.train.recipe import Recipe, parse_duration, resolve_in_unit


@dataclass(frozen=True)
class WarmupStableDecay:
    """lr multiplier at elapsed time t (all lengths in one unit)."""
    total: float
    warmup: float
    decay: float
    shape: str = "1-sqrt"
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.decay < 0 or self.warmup + self.decay > self.total:
            raise ValueError(f"warmup {self.warmup} + decay {self.decay} must fit in total {self.total}")

    def __call__(self, elapsed: float) -> float:
        if self.warmup > 0 and elapsed < self.warmup:
            return elapsed / self.warmup
        decay_start = self.total - self.decay
        if self.decay <= 0 or elapsed < decay_start:
            return 1.0
        progress = min(1.0, (elapsed - decay_start) / self.decay)
        if self.shape == "1-sqrt":
            fraction = 1.0 - math.sqrt(progress)
        elif self.shape == "linear":
            fraction = 1.0 - progress
        elif self.shape == "cosine":
            fraction = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"unknown decay shape {self.shape!r}")
        return self.min_ratio + (1.0 - self.min_ratio) * fraction

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> tuple["WarmupStableDecay", str]:
        """(schedule, unit) where unit is 'tok' or 'ba', max_duration's unit."""
        total, unit = parse_duration(recipe.max_duration, "max_duration")
        sched = recipe.scheduler
        return cls(total=total,
                   warmup=resolve_in_unit(sched.warmup, "scheduler.warmup", total, unit),
                   decay=resolve_in_unit(sched.decay, "scheduler.decay", total, unit),
                   shape=sched.decay_shape, min_ratio=sched.min_lr_ratio), unit


def peak_steps_from_recipe(recipe: Recipe) -> list[tuple[float, float]]:
    """scheduler.lr_steps as (elapsed time in max_duration's unit, peak lr from then on)."""
    total, unit = parse_duration(recipe.max_duration, "max_duration")
    return [(resolve_in_unit(step.at, f"scheduler.lr_steps.{i}.at", total, unit), float(step.lr))
            for i, step in enumerate(recipe.scheduler.lr_steps)]


class LRSchedule(Callback):
    """Sets every param group's lr to peak(elapsed) * schedule(elapsed) * scale before each optimizer step.

    peak(elapsed) is the recipe's lr, or the lr of the last scheduler.lr_steps entry already reached;
    `scale` is lowered by the spike guard after a rollback (1.0 otherwise).
    """

    def __init__(self, schedule: WarmupStableDecay, unit: str, peak_lr: float,
                 peak_steps: list[tuple[float, float]] = ()):
        self.schedule = schedule
        self.unit = unit
        self.peak_lr = peak_lr
        self.peak_steps = sorted(peak_steps)
        self.scale = 1.0
        self.current_lr = self.lr_at(0)

    def lr_at(self, elapsed: float) -> float:
        peak = self.peak_lr
        for at, lr in self.peak_steps:
            if elapsed >= at:
                peak = lr
        return peak * self.schedule(elapsed) * self.scale

    def elapsed(self, state: State) -> int:
        return int(state.timestamp.token if self.unit == "tok" else state.timestamp.batch)

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event not in (Event.FIT_START, Event.BATCH_START):
            return
        self.current_lr = self.lr_at(self.elapsed(state))
        for optimizer in state.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.current_lr


__all__ = ["WarmupStableDecay", "LRSchedule", "peak_steps_from_recipe"]

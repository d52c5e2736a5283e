"""Training's console: composer's bar on a terminal, else one plain line per `logging.console_interval`.

Composer's own ConsoleLogger prints every metric on its own line at each interval; a log file read with
`tail -f` wants one line per interval holding where the run stands. ConsoleLines is a composer logger
destination, so it also receives what the other callbacks log (MetricsJsonl's throughput and MFU). Loggers run
before callbacks at each event, so a step's line is printed at the start of the next step (or at the end of
training), when every callback has logged that step.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Optional

from composer.core import State
from composer.loggers import Logger, LoggerDestination

from modernbert_train.common.progress import emit, format_duration, human, resolve_mode
from modernbert_train.train.recipe import Recipe, parse_duration

# logging.progress_bar -> progress mode ('auto': a bar only on a terminal)
PROGRESS_BAR_VALUES = {"auto": "auto", "true": "bar", "false": "lines"}


def _has_file_descriptor(stream) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def console_mode(recipe: Recipe) -> str:
    """'bar' (composer's progress bar), 'lines' (ConsoleLines) or 'none' for this process."""
    mode = resolve_mode(PROGRESS_BAR_VALUES[recipe.logging.progress_bar])
    # composer's bar asks stderr for its file descriptor; a captured stderr (notebook, test) gets lines.
    if mode == "bar" and not _has_file_descriptor(sys.stderr):
        mode = "lines"
    return mode


def _as_float(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


class ConsoleLines(LoggerDestination):
    """`train <run>: step 120/1500 (8%), 245.76k tok, loss 5.1234, 12.30k tok/s, MFU 12.3%, lr 1.0e-03,
    elapsed 1:02, ETA 11:23` every `interval` ('10ba' or '5e6tok'), after the first step and at the end; one
    `eval <run>: ...` line after each evaluation. Rank 0 only (the trainer adds it there)."""

    def __init__(self, run_name: str, interval: str, stream=None):
        self.run_name = run_name
        self.every, self.unit = parse_duration(interval, "logging.console_interval")
        self.stream = stream
        self._logged: dict[str, list[float]] = {}
        self._train_seconds = 0.0
        self._tokens_at_line = 0
        self._step_of_line = -1
        self._first_step = 1
        self._fit_start: Optional[float] = None
        self._fraction_at_start = 0.0

    # -- what other callbacks log (MetricsJsonl: throughput/mfu, lr) ------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        for key in ("throughput/mfu", "lr"):
            if key in metrics and metrics[key] is not None:
                self._logged.setdefault(key, []).append(_as_float(metrics[key]))

    # -- events -----------------------------------------------------------------------------------------------
    def fit_start(self, state: State, logger: Logger) -> None:
        self._fit_start = time.monotonic()
        self._fraction_at_start = self._fraction(state)
        self._tokens_at_line = int(state.timestamp.token)
        self._step_of_line = int(state.timestamp.batch)
        self._first_step = self._step_of_line + 1

    def batch_end(self, state: State, logger: Logger) -> None:
        self._train_seconds += state.timestamp.batch_wct.total_seconds()

    def batch_start(self, state: State, logger: Logger) -> None:
        if self._due(state):
            self._print_train_line(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) != self._step_of_line:
            self._print_train_line(state)

    def eval_end(self, state: State, logger: Logger) -> None:
        values = ", ".join(f"{name} {_as_float(value):.4f}" for name, value in (state.eval_metric_values or {}).items())
        emit(f"eval {self.run_name}: step {int(state.timestamp.batch)}: {values or 'no metrics'}", self.stream)

    # -- the line ---------------------------------------------------------------------------------------------
    def _count(self, state: State) -> int:
        return int(state.timestamp.batch if self.unit == "ba" else state.timestamp.token)

    def _due(self, state: State) -> bool:
        step = int(state.timestamp.batch)
        if step == self._step_of_line:
            return False
        if step == self._first_step:
            return True  # the first finished step (of this start or resume) shows the run is going
        count = self._count(state)
        done_before = self._tokens_at_line if self.unit == "tok" else self._step_of_line
        return count // self.every > done_before // self.every

    @staticmethod
    def _fraction(state: State) -> float:
        elapsed = state.get_elapsed_duration()
        return float(elapsed.value) if elapsed is not None else 0.0

    def line(self, state: State) -> str:
        step, tokens = int(state.timestamp.batch), int(state.timestamp.token)
        fraction = min(1.0, self._fraction(state))  # the last step may pass a token budget
        max_duration = state.max_duration
        if max_duration is not None and max_duration.unit.value == "tok":
            position = f"step {step:,}, {human(tokens)}/{human(max_duration.value)} tok ({100 * fraction:.0f}%)"
        elif max_duration is not None:
            position = f"step {step:,}/{int(max_duration.value):,} ({100 * fraction:.0f}%), {human(tokens, 'tok')}"
        else:
            position = f"step {step:,}, {human(tokens, 'tok')}"
        parts = [position]
        loss = (state.total_loss_dict or {}).get("loss/train/total")
        if loss is not None:
            parts.append(f"loss {_as_float(loss):.4f}")
        new_tokens = tokens - self._tokens_at_line
        if self._train_seconds > 0 and new_tokens > 0:
            parts.append(human(new_tokens / self._train_seconds, "tok/s"))
        mfu = self._logged.get("throughput/mfu")
        if mfu:
            parts.append(f"MFU {100 * sum(mfu) / len(mfu):.1f}%")
        lr = self._logged.get("lr")
        if lr:
            parts.append(f"lr {lr[-1]:.2e}")
        elapsed = time.monotonic() - (self._fit_start or time.monotonic())
        progressed = fraction - self._fraction_at_start
        eta = elapsed * (1.0 - fraction) / progressed if progressed > 0 else None
        parts.append(f"elapsed {format_duration(elapsed)}")
        parts.append(f"ETA {format_duration(eta)}")
        return f"train {self.run_name}: " + ", ".join(parts)

    def _print_train_line(self, state: State) -> None:
        emit(self.line(state), self.stream)
        self._step_of_line = int(state.timestamp.batch)
        self._tokens_at_line = int(state.timestamp.token)
        self._train_seconds = 0.0
        self._logged.clear()


__all__ = ["ConsoleLines", "console_mode", "PROGRESS_BAR_VALUES"]

"""Progress output every command shares: a bar on a terminal, plain lines in a log file.

A cluster job writes its console to a file (SLURM's slurm-%j.out); a refreshing bar there becomes thousands of
carriage-return lines. So a bar is drawn only when the stream is a terminal (`isatty()`); otherwise one plain
line is printed every few seconds (and at the end), each with units done, extra counters (tokens), their rates,
and an ETA, so `tail -f` shows where a run stands.

Modes: `bar`, `lines`, `none`, or `auto` (bar on a terminal, else lines). The CLIs' `--progress MODE` sets the
process-wide choice through the MODERNBERT_PROGRESS environment variable, which launched ranks and the demo's
steps inherit. Only rank 0 reports progress; the other ranks' console carries warnings and errors only, each
line prefixed with the rank (`configure_console`).
"""
from __future__ import annotations

import io
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TextIO

from modernbert_train.common.errors import UserError

MODES = ("auto", "bar", "lines", "none")
MODE_ENV = "MODERNBERT_PROGRESS"
# Lines mode: the first line after MIN_INTERVAL_S, then the gap grows with the run (a tenth of the elapsed
# time), up to MAX_INTERVAL_S, so a minute-long job shows a dozen lines and a day-long one a line a minute.
# MODERNBERT_PROGRESS_INTERVAL (seconds) sets the shortest gap instead.
MIN_INTERVAL_S = 5.0
MAX_INTERVAL_S = 60.0
INTERVAL_ENV = "MODERNBERT_PROGRESS_INTERVAL"


# -- which mode -----------------------------------------------------------------------------------------------
def global_rank() -> int:
    """This process's rank under a launcher (composer, torchrun set RANK), 0 when alone."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def check_mode(mode: str, where: str = "--progress") -> str:
    if mode not in MODES:
        raise UserError(f"{where} {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def is_terminal(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def resolve_mode(requested: str | None = None, stream: TextIO | None = None) -> str:
    """'bar', 'lines' or 'none' for this process.

    `requested` is what the caller was configured with (a recipe key, a `progress=False` argument -> 'none');
    the `--progress` flag (MODERNBERT_PROGRESS) overrides it, except that 'none' asked by the caller stays.
    Ranks other than 0 never report progress.
    """
    if global_rank() != 0 or requested == "none":
        return "none"
    mode = os.environ.get(MODE_ENV) or requested or "auto"
    check_mode(mode, MODE_ENV if os.environ.get(MODE_ENV) else "progress mode")
    if mode == "auto":
        mode = "bar" if is_terminal(stream if stream is not None else sys.stderr) else "lines"
    return mode


@contextmanager
def progress_mode(mode: str | None) -> Iterator[None]:
    """Within the block (one CLI command), `mode` is the process-wide default; None leaves it as it is."""
    if mode is None:
        yield
        return
    check_mode(mode)
    previous = os.environ.get(MODE_ENV)
    os.environ[MODE_ENV] = mode
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MODE_ENV, None)
        else:
            os.environ[MODE_ENV] = previous


def add_progress_argument(parser) -> None:
    parser.add_argument("--progress", choices=MODES, default=None,
                        help="auto (default: a bar on a terminal, plain lines with an ETA in a log file) | bar | "
                             "lines | none")


# -- formatting -----------------------------------------------------------------------------------------------
def format_duration(seconds: float | None) -> str:
    """'0:07', '1:02:03', '2d 03:04:05'; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    clock = f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
    return f"{days}d {hours:02d}:{minutes:02d}:{seconds:02d}" if days else clock


def human(value: float, unit: str = "") -> str:
    """3.2M tok, 45.3k tok/s; bytes ('B') in KiB/MiB/GiB."""
    if unit == "B" or unit.startswith("B/"):
        for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
            if abs(value) < 1024 or prefix == "Ti":
                return f"{value:.0f} {prefix}{unit}" if not prefix else f"{value:.1f} {prefix}{unit}"
            value /= 1024
    for prefix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{prefix} {unit}".rstrip()
    text = f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def eta_seconds(done: float, total: float | None, elapsed: float) -> float | None:
    """Remaining time at the rate so far; None when there is no total or nothing done yet."""
    if not total or done <= 0 or elapsed <= 0:
        return None
    return max(0.0, elapsed * (total - done) / done)


def emit(line: str, stream: TextIO | None = None) -> None:
    """One complete line, flushed at once (a log file shows it even while the job runs)."""
    stream = stream if stream is not None else sys.stderr
    stream.write(line + "\n")
    stream.flush()


def _interval_from_env() -> float:
    text = os.environ.get(INTERVAL_ENV)
    if not text:
        return MIN_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UserError(f"{INTERVAL_ENV}={text!r}: give the seconds between progress lines (e.g. 30)")
    return value


class LineClock:
    """Decides when lines mode prints: after MIN_INTERVAL_S, then every tenth of the elapsed time, at most
    MAX_INTERVAL_S apart."""

    def __init__(self, min_interval_s: float | None = None, max_interval_s: float = MAX_INTERVAL_S):
        if min_interval_s is None:
            min_interval_s = _interval_from_env()
        self.min_interval_s, self.max_interval_s = min_interval_s, max(min_interval_s, max_interval_s)
        self.start = self.last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        gap = min(self.max_interval_s, max(self.min_interval_s, (now - self.start) / 10))
        if now - self.last >= gap:
            self.last = now
            return True
        return False


# -- the reporter ---------------------------------------------------------------------------------------------
class Progress:
    """Counts units of work (bytes, shards, documents) plus extra counters (tokens) toward an optional total.

    Bar mode: a tqdm bar (its own ETA). Lines mode: e.g.
    `prepare code: 3.2 MiB/10.0 MiB (32%), 1.20M tok, 45.30k tok/s, elapsed 0:12, ETA 0:25`
    at most every few seconds and once at close. None mode: silent.
    """

    def __init__(self, desc: str, total: float | None = None, unit: str = "it", *, mode: str | None = None,
                 stream: TextIO | None = None, min_interval_s: float | None = None,
                 max_interval_s: float = MAX_INTERVAL_S):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream
        self.mode = resolve_mode(mode, stream)
        self.done = 0.0
        self.counters: dict[str, float] = {}
        self.start = time.monotonic()
        self.clock = LineClock(min_interval_s, max_interval_s)
        self._closed = False
        self._first: tuple[float, float, dict[str, float]] | None = None
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            byte_units = unit == "B"
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=byte_units or None,
                            unit_divisor=1024 if byte_units else 1000, dynamic_ncols=True,
                            file=stream if stream is not None else sys.stderr)

    def update(self, n: float = 1, **counters: float) -> None:
        self.done += n
        for name, value in counters.items():
            self.counters[name] = self.counters.get(name, 0) + value
        if self._first is None:
            # Rates and ETA count from the first report on: start-up (imports, loading) is not the work's pace.
            self._first = (time.monotonic(), self.done, dict(self.counters))
        if self.bar is not None:
            self.bar.update(n)
            if self.counters:
                self.bar.set_postfix_str(self._counter_text(), refresh=False)
        elif self.mode == "lines" and self.clock.due():
            emit(self.line(), self.stream)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _pace(self) -> tuple[float, float, dict[str, float]]:
        """(seconds, units, counters) since the first report, or since the start when that spans no time."""
        now = time.monotonic()
        if self._first is not None and now - self._first[0] > 0:
            first_time, first_done, first_counters = self._first
            if self.done > first_done:
                return now - first_time, self.done - first_done, {
                    name: value - first_counters.get(name, 0) for name, value in self.counters.items()}
        return max(1e-9, now - self.start), self.done, dict(self.counters)

    def _counter_text(self) -> str:
        seconds, _, counted = self._pace()
        parts = []
        for name, value in self.counters.items():
            parts += [human(value, name), human(counted[name] / seconds, f"{name}/s")]
        return ", ".join(parts)

    def line(self, finished: bool = False) -> str:
        elapsed = self.elapsed()
        if self.total:
            pct = min(100.0, 100.0 * self.done / self.total)
            if self.unit == "B":
                position = f"{human(self.done, 'B')}/{human(self.total, 'B')} ({pct:.0f}%)"
            else:
                position = f"{human(self.done)}/{human(self.total, self.unit)} ({pct:.0f}%)"
        else:
            position = human(self.done, self.unit)
        parts = [position]
        seconds, counted, _ = self._pace()
        if self.counters:
            parts.append(self._counter_text())
        else:
            parts.append(human(counted / seconds, f"{self.unit}/s"))
        parts.append(f"elapsed {format_duration(elapsed)}")
        remaining = eta_seconds(counted, None if self.total is None else self.total - (self.done - counted), seconds)
        parts.append("done" if finished else f"ETA {format_duration(remaining)}")
        return f"{self.desc}: " + ", ".join(parts)

    def note(self, text: str) -> None:
        """A message that belongs between progress output (printed above a bar, as a line otherwise)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream if self.stream is not None else sys.stderr)
        elif self.mode == "lines":
            emit(f"{self.desc}: {text}", self.stream)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "lines":
            emit(self.line(finished=True), self.stream)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.bar is None:
            self._closed = True  # the error is the last word, not a progress line
        self.close()


def track(items: Iterable, desc: str, total: int | None = None, unit: str = "it", *,
          mode: str | None = None) -> Iterator:
    """Iterate `items`, reporting one unit per item."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, unit, mode=mode) as progress:
        for item in items:
            yield item
            progress.update(1)


# -- console of ranks -----------------------------------------------------------------------------------------
class RankPrefixedStream(io.TextIOBase):
    """Wraps a text stream so every line it receives starts with '[rank N] '."""

    def __init__(self, stream: TextIO, rank: int):
        self.stream, self.prefix = stream, f"[rank {rank}] "
        self._at_line_start = True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_line_start:
                out.append(self.prefix)
            out.append(piece)
            self._at_line_start = piece.endswith(("\n", "\r"))
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.stream, "errors", None)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests and the rank prefix replace it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname}: {message}"


_console_handler: logging.Handler | None = None


def configure_console() -> None:
    """Every rank: warnings and errors of every library on stderr ('WARNING: ...'; INFO messages go to the
    run's train.log only). Rank 0 also prints progress and results; other ranks print nothing else, every
    line of their stderr is prefixed '[rank N] ' and their stdout is discarded. Idempotent."""
    global _console_handler
    rank = global_rank()
    if _console_handler is None:
        _console_handler = _StderrHandler()
        _console_handler.setFormatter(_ConsoleFormatter("%(message)s"))
        _console_handler.setLevel(logging.WARNING)
        logging.getLogger().addHandler(_console_handler)
        logging.captureWarnings(True)  # warnings.warn goes through the handler (and its rank prefix)
    if rank != 0 and not isinstance(sys.stderr, RankPrefixedStream):
        sys.stderr = RankPrefixedStream(sys.stderr, rank)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


__all__ = ["MODES", "MODE_ENV", "Progress", "track", "resolve_mode", "progress_mode", "add_progress_argument",
           "format_duration", "human", "eta_seconds", "emit", "LineClock", "configure_console", "global_rank",
           "RankPrefixedStream"]

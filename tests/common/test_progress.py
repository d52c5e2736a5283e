"""The shared progress reporter: mode choice, line format and pace, and the console of ranks other than 0."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from modernbert_train.common import progress as progress_module
from modernbert_train.common.errors import UserError
from modernbert_train.common.progress import (LineClock, Progress, RankPrefixedStream, eta_seconds,
                                       format_duration, human, progress_mode, resolve_mode)
from tests.progress_io import ETA, REPO, cli_env


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


@pytest.fixture(autouse=True)
def no_mode_from_outside(monkeypatch):
    monkeypatch.delenv(progress_module.MODE_ENV, raising=False)
    monkeypatch.delenv(progress_module.INTERVAL_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)


def test_format_duration_and_eta():
    assert format_duration(7) == "0:07"
    assert format_duration(3723) == "1:02:03"
    assert format_duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "2d 03:04:05"
    assert format_duration(None) == "?"
    assert eta_seconds(25, 100, 10.0) == pytest.approx(30.0)  # a quarter in 10 s: 30 s to go
    assert eta_seconds(0, 100, 10.0) is None and eta_seconds(5, None, 10.0) is None
    assert human(45_300, "tok/s") == "45.30k tok/s"
    assert human(3 * 1024 * 1024, "B") == "3.0 MiB"


def test_auto_is_a_bar_on_a_terminal_and_lines_in_a_file(monkeypatch):
    assert resolve_mode(None, Terminal()) == "bar"
    assert resolve_mode(None, io.StringIO()) == "lines"
    assert resolve_mode("bar", io.StringIO()) == "bar"  # the caller's (recipe's) choice forces it
    with progress_mode("lines"):  # the --progress flag wins over the caller's choice ...
        assert resolve_mode("bar", Terminal()) == "lines"
        assert resolve_mode("none", Terminal()) == "none"  # ... except an explicit "no progress"
    assert resolve_mode(None, Terminal()) == "bar"  # the flag's scope ended with the command
    monkeypatch.setenv("RANK", "3")
    assert resolve_mode("bar", Terminal()) == "none"  # only rank 0 reports progress
    with pytest.raises(UserError, match="--progress 'fancy'"):
        with progress_mode("fancy"):
            pass


def test_lines_mode_prints_a_bounded_number_of_plain_lines_with_eta(clock):
    out = io.StringIO()
    bar = Progress("prepare web", total=100 * 1024 * 1024, unit="B", mode="lines", stream=out, min_interval_s=5)
    for _ in range(480):  # 60 s of work at 1 MiB/s and 40k tokens/s, in updates 1/8 s apart
        clock.now += 0.125
        bar.update(1024 * 1024 // 8, tok=5_000)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # First gap 5 s, then a tenth of the elapsed time (5 s up to 50 s, then 5.5 s): at most 60/5 + the last line.
    assert 8 <= len(lines) <= 60 / 5 + 1, lines
    assert lines[0] == "prepare web: 5.0 MiB/100.0 MiB (5%), 200.00k tok, 40.00k tok/s, elapsed 0:05, ETA 1:35"
    assert all(ETA.search(line) for line in lines[:-1])
    assert lines[-1] == "prepare web: 60.0 MiB/100.0 MiB (60%), 2.40M tok, 40.00k tok/s, elapsed 1:00, done"


def test_line_pace_grows_with_the_run_but_stays_within_a_minute(clock):
    lines_clock = LineClock(min_interval_s=5, max_interval_s=60)
    printed = 0
    for _ in range(24 * 3600):  # a day, one update a second
        clock.now += 1
        printed += lines_clock.due()
    assert 24 * 60 <= printed <= 24 * 60 + 60  # about a line a minute once past the first ten minutes


def test_bar_mode_draws_tqdm_and_none_is_silent():
    terminal = Terminal()
    with Progress("scan", total=4, unit="shard", stream=terminal) as bar:
        for _ in range(4):
            bar.update(1)
    assert "\r" in terminal.getvalue() and "4/4" in terminal.getvalue()
    quiet = io.StringIO()
    with Progress("scan", total=4, unit="shard", mode="none", stream=quiet) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""


def test_rank_prefixed_stream_prefixes_every_line():
    target = io.StringIO()
    stream = RankPrefixedStream(target, 2)
    stream.write("error: one\nand a")
    stream.write(" half\n")
    assert target.getvalue() == "[rank 2] error: one\n[rank 2] and a half\n"


CONSOLE_SCRIPT = """
import logging, sys, warnings
from modernbert_train.common.progress import Progress, configure_console
configure_console()
print("result on stdout")
logging.getLogger("modernbert_train").info("an info message")
logging.getLogger("modernbert_train").warning("a warning")
warnings.warn("a python warning")
with Progress("work", 2, "it", mode="lines", min_interval_s=0) as p:
    p.update(2)
print("error: a failure", file=sys.stderr)
"""


@pytest.mark.parametrize("rank", [0, 1])
def test_other_ranks_print_only_warnings_and_errors_with_their_rank(rank):
    result = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT], cwd=REPO, capture_output=True, text=True,
                            env=cli_env(RANK=str(rank)), timeout=60)
    assert result.returncode == 0, result.stderr
    err = result.stderr.splitlines()
    if rank == 0:
        assert result.stdout == "result on stdout\n"
        assert "WARNING: a warning" in err and "error: a failure" in err
        assert "an info message" not in err  # INFO goes to a run's train.log, not the console
        assert any(line.startswith("work: 2/2 it (100%)") for line in err)
    else:
        assert result.stdout == ""
        assert err[0] == "[rank 1] WARNING: a warning"
        assert any(line.startswith("[rank 1] WARNING: ") and "a python warning" in line for line in err)
        assert err[-1] == "[rank 1] error: a failure"
        assert all(line.startswith("[rank 1] ") for line in err)
        assert not any("info message" in line or "work:" in line for line in err)


def test_cli_error_on_another_rank_carries_the_rank(tmp_path):
    result = subprocess.run([sys.executable, "-m", "modernbert_train.cli.main", "train", str(tmp_path / "no.yaml")],
                            cwd=REPO, capture_output=True, text=True, env=cli_env(RANK="1"), timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("[rank 1] error: ") and "no.yaml" in result.stderr


def test_an_error_is_the_last_line_not_a_progress_line():
    out = io.StringIO()
    with pytest.raises(UserError):
        with Progress("report", total=5, unit="step", mode="lines", stream=out, min_interval_s=0):
            raise UserError("runs/x/metrics.jsonl:3: not JSON")
    assert out.getvalue() == ""

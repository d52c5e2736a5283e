"""Training's console in a log file (one line per logging.console_interval, eval lines, ETA) and on a terminal
(composer's bar). Real CLI, subprocesses; the recipe keeps its default logging.progress_bar: auto."""
from __future__ import annotations

import io
import re

import pytest

from modernbert_train.train.console import console_mode
from modernbert_train.train.recipe import load_recipe
from tests.progress_io import ETA, REPO, progress_lines, run_in_pty, run_to_file

RECIPE = str(REPO / "yamls/tiny/phase1.yaml")
TRAIN_LINE = re.compile(r"^train console-check: step (\d+)/12 \(\d+%\), [\d.]+k? tok, loss \d+\.\d{4}, "
                        r"[\d.]+k? tok/s, MFU \d+\.\d%, lr [\d.e+-]+, elapsed \d+:\d\d, ETA ")


def overrides(tiny_data, tmp_path, steps: int) -> list[str]:
    return [f"data.manifest={tiny_data['mix']}", f"data.tokenizer={tiny_data['tokenizer']}",
            f"max_duration={steps}ba", "run_name=console-check", f"save_folder={tmp_path / 'run'}",
            "checkpoint.interval=100ba", "scheduler.warmup=2ba", "peak_flops_per_device=1e12"]


@pytest.mark.slow
def test_training_log_file_has_one_line_per_interval(tiny_data, tmp_path):
    args = ["-m", "modernbert_train.cli.main", "train", RECIPE, *overrides(tiny_data, tmp_path, 12),
            "logging.console_interval=4ba", f"eval.manifest={tiny_data['eval']}", "eval.interval=6ba",
            "eval.max_batches=2"]
    code, log, _ = run_to_file(args, tmp_path / "train.log")
    assert code == 0, log[-3000:]
    assert "\r" not in log  # no bar refreshes
    assert "[batch=" not in log  # nor composer's one-line-per-metric console log
    lines = progress_lines(log, "train console-check: ")
    # The first step (the run is going), then every 4th step: 12 steps, 4 lines.
    assert [int(TRAIN_LINE.match(line).group(1)) for line in lines] == [1, 4, 8, 12], log
    assert all(ETA.search(line) for line in lines)
    evals = progress_lines(log, "eval console-check: ")
    assert [line.split(":")[1].strip() for line in evals] == ["step 6", "step 12"], log
    assert all("cross_entropy" in line for line in evals)
    assert "done: 12 steps" in log


@pytest.mark.slow
def test_training_on_a_terminal_shows_composer_bar(tiny_data, tmp_path):
    args = ["-m", "modernbert_train.cli.main", "train", RECIPE, *overrides(tiny_data, tmp_path, 3)]
    code, screen = run_in_pty(args)
    assert code == 0, screen[-3000:]
    assert "\r" in screen and "%|" in screen and "train" in screen
    assert not progress_lines(screen, "train console-check: ")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return 2


@pytest.mark.parametrize("key,on_terminal,in_file", [("auto", "bar", "lines"), ("true", "bar", "bar"),
                                                     ("false", "lines", "lines")])
def test_progress_bar_key_chooses_the_console(key, on_terminal, in_file, monkeypatch, tmp_path):
    monkeypatch.delenv("MODERNBERT_PROGRESS", raising=False)
    recipe = load_recipe(RECIPE, [f"logging.progress_bar={key}", f"save_folder={tmp_path}"])
    monkeypatch.setattr("sys.stderr", Terminal())
    assert console_mode(recipe) == on_terminal
    file = tmp_path / "log"
    with file.open("w") as stream:
        monkeypatch.setattr("sys.stderr", stream)
        assert console_mode(recipe) == in_file
        monkeypatch.setenv("MODERNBERT_PROGRESS", "none")  # --progress none
        assert console_mode(recipe) == "none"


class FakeState:
    """The parts of composer's State that ConsoleLines reads, for a run of 10,000 tokens."""

    def __init__(self):
        from composer.core import Time, TimeUnit, Timestamp

        self.max_duration = Time(10_000, TimeUnit.TOKEN)
        self.timestamp = Timestamp()
        self.total_loss_dict = {}
        self.eval_metric_values = {}

    def step(self, tokens: int, seconds: float, loss: float) -> None:
        import datetime

        from composer.core import Timestamp

        t = self.timestamp
        self.timestamp = Timestamp(batch=int(t.batch) + 1, token=int(t.token) + tokens,
                                   batch_wct=datetime.timedelta(seconds=seconds))
        self.total_loss_dict = {"loss/train/total": loss}

    def get_elapsed_duration(self):
        from types import SimpleNamespace

        return SimpleNamespace(value=int(self.timestamp.token) / self.max_duration.value)


def test_token_interval_lines_rates_and_eta(monkeypatch):
    from modernbert_train.train import console as console_module
    from modernbert_train.train.console import ConsoleLines

    now = [100.0]
    monkeypatch.setattr(console_module.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    console, state = ConsoleLines("tok-run", "2000tok", stream=out), FakeState()
    console.fit_start(state, None)
    for step in range(1, 16):  # 700 tokens a step, 1 s of training + 0.25 s of the rest (eval, checkpoints)
        console.batch_start(state, None)
        now[0] += 1.25
        state.step(700, 1.0, loss=7.0 - step / 10)
        console.batch_end(state, None)
        console.log_metrics({"throughput/mfu": 0.2 + step / 100, "lr": step * 1e-4})
    console.fit_end(state, None)
    lines = out.getvalue().splitlines()
    # Step 1, then each step that crosses a multiple of 2,000 tokens (3, 6, 9, 12), then the end (15).
    assert [line.split(",")[0] for line in lines] == [f"train tok-run: step {s}" for s in (1, 3, 6, 9, 12, 15)]
    # Step 3: 2.1k of 10k tokens in 3.75 s -> 3.75 * 0.79 / 0.21 = 14.1 s to go; 1,400 tokens in 2 s of steps.
    assert lines[1] == ("train tok-run: step 3, 2.10k/10.00k tok (21%), loss 6.7000, 700 tok/s, MFU 22.5%, "
                        "lr 3.00e-04, elapsed 0:04, ETA 0:14")
    # The last step passes the budget: 100%, nothing left.
    assert lines[-1].startswith("train tok-run: step 15, 10.50k/10.00k tok (100%), loss 5.5000")
    assert lines[-1].endswith("elapsed 0:19, ETA 0:00")

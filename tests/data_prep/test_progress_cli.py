"""`modernbert-data` progress as a cluster job (output in a file) and a person (a terminal) see it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_prep.cli import main
from tests.progress_io import ETA, cli_env, progress_lines, run_in_pty, run_to_file

INTERVAL_S = 0.02  # MODERNBERT_PROGRESS_INTERVAL for these runs: several lines from a few seconds of work


@pytest.fixture(scope="module")
def code_subset(local_corpus, tmp_path_factory) -> Path:
    """About 120 kB of the corpus's Python files: a few seconds of tokenizing in several work units."""
    out = tmp_path_factory.mktemp("code_subset")
    size = 0
    for path in sorted((local_corpus / "code").rglob("*.py")):
        if size > 120_000:
            break
        target = out / path.relative_to(local_corpus / "code")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        size += path.stat().st_size
    return out


def prepare_args(inputs: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "data_prep.cli", "prepare", str(inputs), "--format", "code", "--tokenizer", str(tokenizer),
            "--out", str(out), "--source", "code", "--max-seq-len", "256", "--workers", "1", "--unit-mb", "0.02",
            *extra]


def test_prepare_to_a_file_prints_plain_lines_with_eta(code_subset, trained_tokenizer_dir, tmp_path, capsys):
    env = cli_env(MODERNBERT_PROGRESS_INTERVAL=str(INTERVAL_S))
    code, log, seconds = run_to_file(prepare_args(code_subset, trained_tokenizer_dir, tmp_path / "shards"),
                                     tmp_path / "prepare.log", env)
    assert code == 0, log
    assert "\r" not in log  # no refresh lines
    lines = progress_lines(log, "prepare code: ")
    assert len(lines) >= 2, log  # one while it runs (at least), one at the end
    assert len(lines) <= seconds / INTERVAL_S + 2  # at most one line per interval, plus the last
    assert all(ETA.search(line) for line in lines[:-1]) and lines[-1].endswith("done")
    assert "(100%)" in lines[-1] and " tok/s, elapsed " in lines[-1]

    # stats --scan, in this process: pytest's captured stderr is no terminal either.
    assert main(["stats", str(tmp_path / "shards"), "--scan"]) == 0
    err = capsys.readouterr().err
    scan = progress_lines(err, f"scan {tmp_path / 'shards'}: ")
    assert "\r" not in err and scan and scan[-1].endswith("done") and " shard (100%)" in scan[-1], err


def test_prepare_on_a_terminal_draws_a_bar(code_subset, trained_tokenizer_dir, tmp_path):
    code, screen = run_in_pty(prepare_args(code_subset, trained_tokenizer_dir, tmp_path / "shards"))
    assert code == 0, screen
    assert "\r" in screen and "%|" in screen and "prepare code" in screen  # tqdm's refreshing bar
    assert not any(ETA.search(line) for line in screen.splitlines())


def test_progress_flag_forces_either_mode(code_subset, trained_tokenizer_dir, tmp_path, capsys):
    env = cli_env(MODERNBERT_PROGRESS_INTERVAL=str(INTERVAL_S))
    code, screen = run_in_pty(prepare_args(code_subset, trained_tokenizer_dir, tmp_path / "a", "--progress", "lines"),
                              env)
    assert code == 0 and "\r" not in screen, screen
    assert progress_lines(screen, "prepare code: ")[-1].endswith("done")
    # In this process stderr is pytest's capture, no terminal: the flag still gets the bar.
    assert main(prepare_args(code_subset, trained_tokenizer_dir, tmp_path / "b", "--progress", "bar")[2:]) == 0
    err = capsys.readouterr().err
    assert "\r" in err and "%|" in err, err


def test_train_tokenizer_lines(code_subset, tmp_path, capsys):
    assert main(["train-tokenizer", str(code_subset), "--out", str(tmp_path / "tok"), "--vocab-size", "400"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = progress_lines(err, "train-tokenizer: ")
    assert any(line.endswith("done") and " docs" in line for line in lines), err
    assert lines[-1] == "train-tokenizer: merges done, vocabulary 400"
    assert main(["train-tokenizer", str(code_subset), "--out", str(tmp_path / "tok2"), "--vocab-size", "400",
                 "--no-progress"]) == 0
    assert "train-tokenizer: " not in capsys.readouterr().err

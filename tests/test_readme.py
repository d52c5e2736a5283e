"""Every command the README shows is one our CLIs accept, with files and recipe keys that exist.

The commands are parsed by the real parsers (and `train` commands' recipes fully validated with their
overrides); what they do is covered by the tests of each command and by tests/e2e.
"""
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_FILES = [REPO / "README.md", REPO / "launch" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("modernbert-train", "modernbert-data", "composer", "make")


def readme_commands() -> list[tuple[str, int, list[str]]]:
    commands = []
    for path in README_FILES:
        in_block = False
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.startswith("```"):
                in_block = line.strip() in ("```bash", "```sh")
                continue
            text = line.split(" #")[0].strip()
            if in_block and text.split(" ")[0] in PROGRAMS and "$" not in text:
                commands.append((path.name, number, shlex.split(text)))
    return commands


COMMANDS = readme_commands()


def test_readme_shows_the_two_setup_commands_and_ci_calls_one():
    assert ["make", "demo"] in [c for _, _, c in COMMANDS] and ["make", "test"] in [c for _, _, c in COMMANDS]
    assert "make test" in (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


@pytest.mark.parametrize("where,line,argv", COMMANDS, ids=[f"{w}:{n}" for w, n, _ in COMMANDS])
def test_readme_command_parses(where, line, argv, monkeypatch):
    monkeypatch.chdir(REPO)
    program, args = argv[0], argv[1:]
    if program == "make":
        assert re.search(rf"^{args[0]}:", (REPO / "Makefile").read_text(), re.M)
    elif program == "composer":
        from composer.cli.launcher import _get_parser

        parsed = _get_parser().parse_args(args)
        assert parsed.module_mode and parsed.training_script == "modernbert_train.train"
        _check_train_args(parsed.training_script_args)
    elif program == "modernbert-data":
        from data_prep.cli import build_parser

        build_parser().parse_args(args)
    else:
        import argparse
        import importlib

        from modernbert_train.cli.main import COMMANDS as CLI

        module = importlib.import_module(CLI[args[0]][0])
        parser = argparse.ArgumentParser(prog=f"modernbert-train {args[0]}")
        module.add_arguments(parser)
        parsed = parser.parse_intermixed_args(args[1:])
        if args[0] in ("train", "launch"):
            _check_train_args([parsed.recipe, *parsed.overrides])


def _check_train_args(args):
    """The recipe file exists and loads with the given overrides (keys, types, values validated)."""
    from modernbert_train.train.recipe import load_recipe

    recipe, overrides = args[0], [a for a in args[1:] if "=" in a]
    assert (REPO / recipe).exists(), recipe
    load_recipe(REPO / recipe, overrides)

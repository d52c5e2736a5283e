"""`modernbert-train COMMAND ...`: one entry point, each command a thin module over a library call.

Each command module defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported only
when their command runs, so `--help` is fast and the model never pulls composer in by accident.

Exit codes: 0 success; 1 the work failed; 2 bad input (config key, file, argument), printed as one line.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from modernbert_train.common.errors import run_command
from modernbert_train.common.progress import add_progress_argument, configure_console, progress_mode

COMMANDS = {
    "demo": ("modernbert_train.cli.demo", "run the whole job on built-in local data (corpus to HF model), on CPU"),
    "train": ("modernbert_train.cli.train", "train from a YAML recipe (one process, or per rank under a launcher)"),
    "launch": ("modernbert_train.cli.launch", "build and run the composer launcher command for N GPUs / M nodes"),
    "export": ("modernbert_train.cli.export", "write a checkpoint or run directory as a Hugging Face folder"),
    "average": ("modernbert_train.cli.average", "average the weights of several checkpoints into one"),
    "convert-checkpoint": ("modernbert_train.cli.convert", "merge an FSDP sharded checkpoint folder into one .pt file"),
    "report": ("modernbert_train.cli.report", "plot metrics.jsonl of one or more run directories"),
    "eval": ("modernbert_train.cli.eval", "fine-tune and score models on an evaluation suite (yamls/eval/)"),
}

EPILOG = """examples:
  modernbert-train demo
  modernbert-train train yamls/tiny/phase1.yaml max_duration=200ba
  modernbert-train launch yamls/phase1.yaml --nproc 8
  modernbert-train export runs/phase3 --out hf/my-modernbert
  modernbert-train average runs/phase3/ep0-ba8000-rank0.pt runs/phase3 --out runs/phase3/averaged.pt
  modernbert-train convert-checkpoint runs/phase1/ep0-ba2000 --out phase1-ba2000.pt
  modernbert-train report runs/phase1 runs/phase2 runs/phase3
  modernbert-train eval yamls/eval/local.yaml --model demo_out/hf --model random:demo_out/hf
progress: a bar on a terminal; in a log file (SLURM, `> log`) one plain line per interval with an ETA.
  --progress auto|bar|lines|none after any command forces a mode; ranks other than 0 print only warnings and
  errors, prefixed with their rank.
exit codes: 0 ok, 1 failure, 2 bad input"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modernbert-train", description="Pretrain ModernBERT encoders.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        # Only the module of the chosen command is imported (see _command_module).
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _command_module(name: str):
    return importlib.import_module(COMMANDS[name][0])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and not argv[0].startswith("-"):
            from modernbert_train.common.errors import did_you_mean
            parser.error(f"unknown command {argv[0]!r}{did_you_mean(argv[0], COMMANDS)}")
        parser.parse_args(argv)  # prints --help / usage and exits
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module = _command_module(name)
    parser = argparse.ArgumentParser(
        prog=f"modernbert-train {name}", description=COMMANDS[name][1],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=getattr(module, "EPILOG", None))
    module.add_arguments(parser)
    add_progress_argument(parser)
    # Intermixed: overrides may follow options (`RECIPE --nproc 8 optimizer.lr=1e-4`) in every command.
    args = parser.parse_intermixed_args(rest)
    configure_console()
    with progress_mode(args.progress):
        return run_command(module.run, args, debug)

if __name__ == "__main__":
    sys.exit(main())

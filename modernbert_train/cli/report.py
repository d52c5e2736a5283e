"""`modernbert-train report RUN_DIR [RUN_DIR ...]`: plots and a summary from each run's metrics.jsonl."""
from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """Several run directories are phases of one model, given in training order: their token axes are
stitched (phase 2 starts where phase 1 ended). Writes loss.png, lr.png, throughput.png, batch_size.png,
masked_accuracy.png, report.md and report.html; a plot whose metrics were never logged is skipped with a note.

example:
  modernbert-train report runs/phase1 runs/phase2 runs/phase3 --out reports/base
  modernbert-train report runs/phase3 --eval eval_out/local   # with downstream evaluation table and eval.png
  (default --out: RUN_DIR/report of the last run directory)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directory holding metrics.jsonl and config.yaml (several: phases in order)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default: RUN_DIR/report of the last run directory)")
    parser.add_argument("--eval", action="append", default=[], metavar="DIR", dest="eval_dirs",
                        help="add the table and bar plot (eval.png) of a `modernbert-train eval` output folder "
                             "(results.json); repeatable")


def run(args: argparse.Namespace) -> int:
    from modernbert_train.run.report import write_report

    out_dir = args.out if args.out is not None else Path(args.run_dirs[-1]) / "report"
    markdown_path = write_report(args.run_dirs, out_dir, eval_dirs=args.eval_dirs)
    print(f"wrote {markdown_path} and {markdown_path.with_suffix('.html')}")
    return 0

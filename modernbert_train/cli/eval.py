"""`modernbert-train eval SUITE.yaml --model M [--model M2 ...]`: fine-tune and score models on a suite."""
from __future__ import annotations

EPILOG = """examples:
  modernbert-train eval yamls/eval/local.yaml --model demo_out/hf --model random:demo_out/hf
  modernbert-train eval yamls/eval/glue.yaml --model hf/my-modernbert --out eval/glue
  modernbert-train eval yamls/eval/local.yaml --model runs/phase1 data_root=eval_data   # newest checkpoint
  modernbert-train eval yamls/eval/beir.yaml --model hf/my-modernbert --tasks scifact,fiqa  # + msmarco, they start from it
M: an exported Hugging Face folder, a run directory (its newest checkpoint), a checkpoint file, or random:M
(M's architecture and tokenizer, random weights: the baseline). key=value arguments override suite keys.
Writes OUT/results.json (every run) and OUT/results.md (mean +- std over seeds, chosen hyperparameters)."""


def add_arguments(parser) -> None:
    parser.add_argument("suite", help="suite file, e.g. yamls/eval/local.yaml")
    parser.add_argument("--model", action="append", required=True, dest="models", metavar="M",
                        help="model to evaluate (repeat for several; shown side by side)")
    parser.add_argument("--out", default=None, help="output folder (default eval_out/<suite name>)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--build-local-tasks", action="store_true",
                        help="first write the local tasks built from this machine's stdlib under data_root")
    parser.add_argument("--tasks", default=None, metavar="NAME[,NAME]",
                        help="run only these tasks of the suite (and the tasks they start from)")
    parser.add_argument("overrides", nargs="*", help="suite overrides key=value (omegaconf dotlist)")


def run(args) -> int:
    from pathlib import Path

    from modernbert_train.common.errors import UserError
    from modernbert_train.eval.runner import run_suite
    from modernbert_train.eval.suite import load_suite, select_tasks

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(f"argument {bad[0]!r}: overrides look like key=value")
    if args.build_local_tasks:
        from modernbert_train.eval.local_tasks import build_local_tasks
        from modernbert_train.eval.suite import suite_config

        root = suite_config(Path(args.suite), args.overrides).get("data_root")
        if root is None:
            raise UserError(f"{args.suite}: data_root: --build-local-tasks needs the suite's data_root key")
        build_local_tasks(root)
    suite = load_suite(args.suite, args.overrides)
    if args.tasks:
        suite = select_tasks(suite, [name.strip() for name in args.tasks.split(",") if name.strip()])
    out = Path(args.out or Path("eval_out") / suite.name)
    run_suite(suite, args.models, out, device=args.device)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}  table: {out / 'results.md'}")
    return 0

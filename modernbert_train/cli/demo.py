"""`modernbert-train demo`: the whole job on built-in local data, on CPU, in minutes."""
from __future__ import annotations

EPILOG = """examples:
  modernbert-train demo                       # everything under demo_out/ (re-running reuses finished steps)
  modernbert-train demo --size small --out /tmp/demo   # a one-minute smoke run
  modernbert-train demo --clean               # delete demo_out/ (only if it holds nothing but demo output)
Steps: corpus from this machine -> tokenizer -> MDS shards -> tiny phases 1, 2, 3 -> HF export -> fill-mask -> report."""


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--size", default="default", choices=["default", "small"],
                        help="default: about 10 minutes on 2 cores; small: a one-minute smoke run")
    parser.add_argument("--workers", type=int, default=None, help="processes for data preparation")
    parser.add_argument("--clean", action="store_true",
                        help="delete the --out folder instead (refused if it holds anything the demo did not write)")


def run(args) -> int:
    from modernbert_train.run.demo import clean_demo, run_demo

    if args.clean:
        print(f"removed {args.out}" if clean_demo(args.out) else f"{args.out} does not exist")
        return 0
    run_demo(args.out, size=args.size, workers=args.workers)
    return 0

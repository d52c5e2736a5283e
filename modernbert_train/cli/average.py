"""`modernbert-train average CKPT... --out FILE`: the elementwise mean of several checkpoints' weights."""
from __future__ import annotations

EPILOG = """examples:
  modernbert-train average runs/phase3/ep0-ba8000-rank0.pt runs/phase3/ep0-ba9000-rank0.pt runs/phase3 \\
      --out runs/phase3/averaged.pt
  modernbert-train export runs/phase3/averaged.pt --out hf/my-modernbert
  modernbert-train average runs/p3/ep0-ba800 runs/p3/ep0-ba900 --out avg.pt    # FSDP sharded folders
Sources: checkpoint .pt files, FSDP sharded folders, or run directories (their newest checkpoint). The
output holds the averaged model weights (no optimizer state) and the last source's step; the run
directory's model_config.json and tokenizer.json are copied beside it so `export` can read it."""


def add_arguments(parser) -> None:
    parser.add_argument("sources", nargs="+", help="checkpoints to average (files, sharded folders, run directories)")
    parser.add_argument("--out", required=True, help="averaged checkpoint file to write (.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="fully unpickle sources the safe reader refuses (it can run code): only for "
                             "checkpoints you trust")


def run(args) -> int:
    from modernbert_train.checkpoint.averaging import average_checkpoints

    out = average_checkpoints(args.sources, args.out, overwrite=args.overwrite, trust=args.trust_checkpoint)
    print(f"averaged {len(args.sources)} checkpoints -> {out}")
    return 0

"""`modernbert-train convert-checkpoint`: FSDP sharded checkpoint folder -> one .pt file."""
from __future__ import annotations

EPILOG = """examples:
  modernbert-train convert-checkpoint runs/phase1/ep0-ba2000 --out runs/phase1/ep0-ba2000-full.pt
  modernbert-train convert-checkpoint runs/phase1/latest-rank0.pt --out phase1-latest.pt --overwrite
The file holds model, optimizer, schedule and data position with unsharded tensors, like a checkpoint saved with
parallelism.fsdp.state_dict_type=full; `export` and `model.init_from` read either form.
A sharded folder's .metadata is a pickle: it is read with a reader that builds only checkpoint metadata (no code
runs), wherever the folder lies; one naming anything else is refused unless --trust-checkpoint (full
unpickling: it can run code), for folders you trust."""


def add_arguments(parser) -> None:
    parser.add_argument("sharded_dir", help="sharded checkpoint folder (.metadata + __R_0.distcp files)")
    parser.add_argument("--out", required=True, help="destination .pt file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="fully unpickle a .metadata the safe reader refuses (it can run code)")


def run(args) -> int:
    from pathlib import Path

    from modernbert_train.checkpoint import convert_sharded_checkpoint

    out = convert_sharded_checkpoint(Path(args.sharded_dir).resolve(), args.out, overwrite=args.overwrite,
                                     trust=args.trust_checkpoint)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) from {args.sharded_dir}")
    return 0

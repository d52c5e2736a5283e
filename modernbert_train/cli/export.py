"""`modernbert-train export`: checkpoint or run directory -> validated Hugging Face folder."""
from __future__ import annotations

EPILOG = """examples:
  modernbert-train export runs/phase3 --out hf/my-modernbert
  modernbert-train export runs/phase1/ep0-ba2000-rank0.pt --out hf/phase1 --dtype bfloat16
  modernbert-train export runs/phase2/ep0-ba500 --out hf/phase2      # FSDP sharded folder (.distcp)
  modernbert-train export runs/p3/ep0-ba800-rank0.pt runs/p3/ep0-ba900-rank0.pt runs/p3 --average --out hf/avg
The folder loads with transformers.AutoModelForMaskedLM / AutoTokenizer (4.48+ and 5.x); it is checked
against our model before it is written, and a mismatch fails the export (exit 1 or 2).
--overwrite replaces only a previous export (config.json + model.safetensors and the files an export writes);
it never deletes the current directory, a home directory, the source run or a folder holding it.
Checkpoints are pickles. Every checkpoint (our own run folders' included) is read without running code: a .pt
file with torch's weights-only loader, a sharded folder's .metadata with a reader that builds only checkpoint
metadata. One holding anything else is refused unless --trust-checkpoint (full unpickling: it can run code).
Checkpoints this trainer writes never need it. Never pass it for a file from someone you do not trust."""


def add_arguments(parser) -> None:
    parser.add_argument("source", nargs="+",
                        help="run directory (newest checkpoint), checkpoint .pt file, or sharded checkpoint folder; "
                             "several with --average")
    parser.add_argument("--average", action="store_true",
                        help="export the elementwise mean of the sources' weights (run directory files of the first)")
    parser.add_argument("--out", required=True, help="destination folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokenizer", help="tokenizer.json to ship (default: the run directory's)")
    parser.add_argument("--model-config", help="model_config.json (default: the run directory's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous export in --out (nothing else)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="fully unpickle a checkpoint the safe reader refuses (it can run code)")
    parser.add_argument("--sentence-transformers", action="store_true",
                        help="also write the files that make SentenceTransformer(OUT) an embedding model (mean pooling)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| accepted (fp32)")


def run(args) -> int:
    import tempfile
    from pathlib import Path

    from modernbert_train.common.errors import UserError

    if len(args.source) > 1 and not args.average:
        raise UserError(f"{len(args.source)} sources given: pass --average to export their mean, or give one")
    if not args.average:
        return _export(args.source[0], args)
    from modernbert_train.checkpoint.averaging import average_checkpoints

    # The averaged file gets the first source's model_config.json and tokenizer.json beside it.
    with tempfile.TemporaryDirectory() as tmp:
        return _export(average_checkpoints(args.source, Path(tmp) / "averaged.pt", trust=args.trust_checkpoint),
                       args)


def _export(source, args) -> int:
    from modernbert_train.run.export import export_to_hf

    result = export_to_hf(source, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                          model_config=args.model_config, overwrite=args.overwrite, tolerance=args.tolerance,
                          sentence_transformers=args.sentence_transformers, trust_checkpoint=args.trust_checkpoint)
    print(f"exported {result.checkpoint} (step {result.step}) -> {result.out_dir}; "
          f"transformers reproduces our logits within {result.max_abs_logit_diff:.1e}")
    return 0

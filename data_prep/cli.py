"""`modernbert-data COMMAND ...`: tokenizer training, shard preparation, statistics, the local demo corpus.

Exit codes: 0 success; 1 the work failed; 2 bad input (argument, file, record), printed as one line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from modernbert_train.common.errors import UserError, did_you_mean, run_command
from modernbert_train.common.progress import add_progress_argument, configure_console, progress_mode

EPILOG = """examples:
  modernbert-data build-local-corpus --out demo_out/corpus --max-mb 4
  modernbert-data train-tokenizer demo_out/corpus/code demo_out/corpus/prose --out demo_out/tokenizer --vocab-size 32768
  modernbert-data prepare demo_out/corpus/code --format code --language python \\
      --tokenizer demo_out/tokenizer --out demo_out/shards/code
  modernbert-data prepare demo_out/corpus/prose --tokenizer demo_out/tokenizer --out demo_out/shards/prose
  modernbert-data stats yamls/data/demo.yaml
  modernbert-data propose-tokens my_code/ --tokenizer ModernBERT-base --out candidates.jsonl
  modernbert-data extend-vocab --model ModernBERT-base --tokens candidates.jsonl --top 83 --mode unused --out mb-ext
progress: a bar on a terminal; in a log file one plain line every few seconds with an ETA
(--progress auto|bar|lines|none after the command forces a mode).
exit codes: 0 ok, 1 failure, 2 bad input"""

TRAIN_TOKENIZER_EPILOG = """example:
  modernbert-data train-tokenizer corpus/code corpus/prose/*.jsonl --out tok --vocab-size 50368
writes tok/tokenizer.json (+ tokenizer_config.json, special_tokens_map.json for transformers.AutoTokenizer)
with [UNK]=0 [CLS]=1 [SEP]=2 [PAD]=3 [MASK]=4, and checks that transformers loads it and agrees on ids."""

PREPARE_EPILOG = """examples:
  modernbert-data prepare data/web/*.jsonl.zst --text-field text --tokenizer tok --out shards/web --workers 16
  modernbert-data prepare ~/src/repos --format code --language python --language rust \\
      --exclude '*/tests/*' --tokenizer tok --out shards/code
  modernbert-data prepare papers.parquet --text-field body --tokenizer tok --out shards/science --max-seq-len 8192
formats: jsonl (.jsonl .jsonl.gz .jsonl.zst, one JSON object per line, --text-field), parquet (--text-field
column), text (one document per file), code (one document per file, by --language/--extension).
Re-running on the same --out resumes: finished work units are kept, changed inputs are redone; different
settings (tokenizer, --max-seq-len, ...) are refused unless --overwrite.
object storage: --out s3://bucket/prefix (or gs://, oci://, azure://, ...) writes parts under --staging and
uploads each as it finishes (index.json last); a re-run resumes without re-uploading finished parts.
Credentials come from the environment (AWS_ACCESS_KEY_ID/AWS_PROFILE, S3_ENDPOINT_URL for S3-compatible stores).
  modernbert-data prepare data/web/*.jsonl.zst --tokenizer tok --out s3://corpus/shards/web --staging /scratch/web
many machines: --engine spark runs each work unit as a Spark task (retried by Spark if it fails); see
launch/spark_prepare.sh. The output equals a single-machine prepare's.
  modernbert-data prepare data/web --tokenizer tok --out /shared/shards/web --engine spark --workers 2
bad records: malformed JSON, missing/non-string text field, invalid UTF-8 and unreadable files follow
--on-error (default fail); binary files met in code/text directories follow --on-binary (default skip);
empty documents are always skipped and counted. prep_summary.json accounts for every record read.
a document over --max-doc-mb (default 16) is a bad record too: read in pieces, never held whole in memory.
--out may sit inside an input folder: it is never read as input. One prepare at a time per --out (a lock
file, .prepare.lock, names the holder); a second is refused without touching the first's work."""

STATS_EPILOG = """examples:
  modernbert-data stats demo_out/shards/code demo_out/shards/prose
  modernbert-data stats yamls/data/demo.yaml --scan
  modernbert-data stats s3://corpus/shards/web      (reads the metadata remotely; --scan downloads the shards)
--scan recounts from the shards themselves and checks prep_meta.json and each shard's hash; a folder with
a pickle column (which can run code when read) is refused unless --allow-unsafe-types."""

CORPUS_EPILOG = """example:
  modernbert-data build-local-corpus --out demo_out/corpus --max-mb 8
code = this interpreter's standard library (.py, tests excluded); prose = pydoc topics, stdlib docstrings
and the Python docs' .txt sources when installed. Nothing is downloaded."""


def _add_input_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or globs (quote globs)")
    parser.add_argument("--format", default="auto",
                        help="auto (by suffix: .jsonl[.gz|.zst], .parquet, .txt/.md/.rst, code extensions such as "
                             ".py) | jsonl | parquet | text | code")
    parser.add_argument("--text-field", default="text", help="jsonl key / parquet column holding the text")
    parser.add_argument("--language", action="append", default=[], help="code: a language (repeatable)")
    parser.add_argument("--extension", action="append", default=[], help="code: a file extension (repeatable)")
    parser.add_argument("--exclude", action="append", default=[],
                        help="glob on paths relative to an input directory (repeatable), e.g. '*/tests/*'")


def _expand(args) -> list[str]:
    from data_prep.sources import expand_inputs

    return expand_inputs(args.inputs, args.format, args.language, args.extension, args.exclude)


# ------------------------------------------------------------------------------------------- commands

def add_train_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    _add_input_selection(parser)
    parser.add_argument("--out", required=True, help="folder for tokenizer.json and the transformers files")
    parser.add_argument("--vocab-size", type=int, default=50368, help="vocabulary size incl. specials (50368)")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (2)")
    parser.add_argument("--max-mb", type=float, default=None, help="train on at most this many MB of text")
    parser.add_argument("--model-max-length", type=int, default=8192, help="written to tokenizer_config.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress output (same as --progress none)")


def run_train_tokenizer(args) -> int:
    from data_prep.tokenizer import iter_training_texts, save_tokenizer, train_tokenizer, verify_saved_tokenizer

    files = _expand(args)
    skipped: dict[str, int] = {}
    max_chars = int(args.max_mb * 1e6) if args.max_mb else None
    start = time.perf_counter()
    texts = iter_training_texts(files, args.format, args.text_field, max_chars, skipped)
    tok = train_tokenizer(texts, args.vocab_size, args.min_frequency, show_progress=not args.no_progress,
                          total_chars=max_chars or _plain_text_bytes(files))
    path = save_tokenizer(tok, args.out, args.model_max_length)
    sample = next(iter_training_texts(files[:1], args.format, args.text_field, 100_000), "")
    verify_saved_tokenizer(args.out, [sample, "def f(x):\n    return x  # [MASK] stays text\n\n"])
    skipped_text = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())) or "none"
    print(f"wrote {path} (vocab {tok.get_vocab_size():,}) from {len(files):,} files in "
          f"{time.perf_counter() - start:.1f}s; skipped records: {skipped_text}; transformers loads it and agrees")
    return 0


def _plain_text_bytes(files: list[str]) -> int | None:
    """Size of uncompressed text inputs, close to their character count (the reading ETA); None otherwise."""
    if any(f.endswith((".gz", ".zst", ".parquet")) for f in files):
        return None
    return sum(os.path.getsize(f) for f in files if os.path.isfile(f))


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    _add_input_selection(parser)
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder holding one")
    parser.add_argument("--out", required=True,
                        help="output folder for this source's shards, or an object-store URL (s3://bucket/prefix)")
    parser.add_argument("--staging", default=None,
                        help="with a remote --out: local folder for parts before upload (default: "
                             "~/.cache/modernbert-data/staging/...; keep it stable so a re-run resumes)")
    parser.add_argument("--source", default=None, help="source name written in every sample (default: --out name)")
    parser.add_argument("--max-seq-len", type=int, default=8192,
                        help="ids per chunk incl. [CLS]/[SEP]; longer documents are split (8192)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    parser.add_argument("--on-error", default="fail", choices=("skip", "fail"), help="malformed records (fail)")
    parser.add_argument("--on-binary", default="skip", choices=("skip", "fail"), help="binary files (skip)")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing output with other settings")
    parser.add_argument("--unit-mb", type=float, default=None,
                        help="input MB per work unit, the resume granularity (default: about 4 units per worker, "
                             "1-64 MB; a resumed run keeps its plan's)")
    parser.add_argument("--shard-mb", type=float, default=64, help="uncompressed MB per MDS shard")
    parser.add_argument("--max-doc-mb", type=float, default=16,
                        help="largest document (jsonl line, text/code file, parquet cell) in MB; larger ones are "
                             "read in pieces and dropped, never held whole, and follow --on-error (16)")
    parser.add_argument("--no-progress", action="store_true", help="no progress output (same as --progress none)")
    parser.add_argument("--engine", default="local", choices=("local", "spark"),
                        help="local: this machine's process pool; spark: one Spark task per work unit (needs "
                             "pyspark; --out on a filesystem every executor sees)")
    parser.add_argument("--spark-master", default=None,
                        help="with --engine spark: master URL (default local[--workers,4]: local mode with 4 "
                             "attempts per task; 'active' uses the running session, e.g. under spark-submit)")


def run_prepare(args) -> int:
    from data_prep.prepare import PrepareConfig, format_summary, prepare
    from data_prep.remote import is_remote, prepare_remote

    cfg = PrepareConfig(
        inputs=args.inputs, out=args.out, tokenizer=args.tokenizer, source=args.source, format=args.format,
        text_field=args.text_field, languages=tuple(args.language), extensions=tuple(args.extension),
        exclude=tuple(args.exclude), max_seq_len=args.max_seq_len, workers=args.workers,
        on_error=args.on_error, on_binary=args.on_binary, overwrite=args.overwrite,
        unit_bytes=max(1, int(args.unit_mb * (1 << 20))) if args.unit_mb else None, shard_size_limit=max(1 << 16, int(args.shard_mb * (1 << 20))),
        progress=not args.no_progress, max_doc_mb=args.max_doc_mb)
    if args.staging and not is_remote(args.out):
        raise UserError(f"--staging only applies when --out is an object-store URL (got --out {args.out})")
    if args.spark_master and args.engine != "spark":
        raise UserError("--spark-master only applies with --engine spark")
    if args.engine == "spark":
        from data_prep.distributed import local_master, prepare_on_spark

        master = None if args.spark_master == "active" else (args.spark_master or local_master(args.workers))
        summary = prepare_on_spark(cfg, master, args.staging)
    else:
        summary = prepare_remote(cfg, args.staging) if is_remote(args.out) else prepare(cfg)
    print(format_summary(summary))
    print(f"wrote {args.out}/index.json, prep_meta.json, prep_summary.json")
    return 0


def add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="FOLDER_OR_MANIFEST",
                        help="prepared shard folders or object-store URLs, or a mixture manifest .yaml")
    parser.add_argument("--scan", action="store_true", help="recount from the shards and check prep_meta.json")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--allow-unsafe-types", action="store_true",
                        help="decode pickle (pkl) columns; they can run arbitrary code, so only for shards "
                             "from someone you trust (refused by default)")


def _folders_of(paths: list[str]) -> list[str]:
    folders = []
    for path in paths:
        if path.endswith((".yaml", ".yml")):
            from modernbert_train.data.manifest import load_manifest

            for source in load_manifest(path).sources:
                folders.append(source.remote if source.remote else str(source.local))
        else:
            folders.append(path)
    return folders


def run_stats(args) -> int:
    from data_prep.remote import is_remote, remote_folder_stats
    from data_prep.stats import folder_stats, format_stats

    stats = [(remote_folder_stats if is_remote(folder) else folder_stats)(
                 folder, scan=args.scan, progress=args.scan and not args.json,
                 allow_unsafe_types=args.allow_unsafe_types)
             for folder in _folders_of(args.paths)]
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    return 0 if all(s.get("scan_matches_meta", True) for s in stats) else 1


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for code/ and prose/")
    parser.add_argument("--max-mb", type=float, default=None, help="cap on code and on prose, each (MB)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing corpus folder")


def run_corpus(args) -> int:
    from data_prep.local_corpus import build_local_corpus

    max_bytes = int(args.max_mb * 1e6) if args.max_mb is not None else None
    info = build_local_corpus(args.out, max_bytes, overwrite=args.overwrite)
    prose_bytes = sum(part.get("bytes", 0) for part in info["prose"].values())
    print(f"wrote {args.out}/code ({info['code']['files']:,} files, {info['code']['bytes'] / 1e6:.1f} MB) and "
          f"{args.out}/prose ({prose_bytes / 1e6:.1f} MB); details in {args.out}/corpus_info.json")
    return 0

PROPOSE_EPILOG = """example:
  modernbert-data propose-tokens ~/src/myrepo --format code --language python --tokenizer ModernBERT-base \\
      --top 200 --out candidates.jsonl
A candidate is a whole word piece of the tokenizer's pre-tokenizer (' numpy', 'Exception') that it splits into
several ids; gain = count x (pieces - 1), the tokens saved on the sample. Writes one JSON record per line
(token, count, pieces, gain_tokens, gain_share) for extend-vocab --tokens."""

EXTEND_EPILOG = """examples:
  modernbert-data extend-vocab --model ModernBERT-base --tokens candidates.jsonl --top 83 --mode unused --out mb-ext
  modernbert-data extend-vocab --model ModernBERT-base --tokens candidates.jsonl --top 500 --mode append --out mb-ext
unused: the tokens take the tokenizer's [unused*] slots (ModernBERT-base has 83), the embedding keeps its shape.
append: the tokens get new ids; embeddings and the tied decoder grow to a multiple of 64.
Either way each new row starts as the mean of the rows of the pieces the old tokenizer split it into, and the
old tokens' logits are checked to be unchanged. --out is a Hugging Face folder: prepare shards with its
tokenizer.json and start training from it with model.init_from: hf:OUT (docs/continued-pretraining.md)."""


def add_propose_arguments(parser: argparse.ArgumentParser) -> None:
    _add_input_selection(parser)
    parser.add_argument("--tokenizer", required=True, help="the model's tokenizer.json or a folder holding one")
    parser.add_argument("--out", default=None, help="write the candidates here as JSON lines (default: print only)")
    parser.add_argument("--top", type=int, default=100, help="how many candidates to keep (100)")
    parser.add_argument("--min-count", type=int, default=5, help="occurrences a candidate needs (5)")
    parser.add_argument("--min-pieces", type=int, default=2, help="ids the tokenizer must spend on it now (2)")
    parser.add_argument("--max-mb", type=float, default=50, help="read at most this many MB of text (50)")


def run_propose(args) -> int:
    from data_prep.tokenizer import iter_training_texts, load_tokenizer
    from modernbert_train.data.vocab_extension import propose_tokens

    tok = load_tokenizer(args.tokenizer)
    texts = iter_training_texts(_expand(args), args.format, args.text_field, int(args.max_mb * 1e6))
    found, tokens, chars = propose_tokens(texts, tok, args.top, args.min_count, args.min_pieces)
    print(f"{chars:,} characters, {tokens:,} tokens ({tokens / max(1, chars):.4f} per character)")
    print(f"{'token':<24} {'count':>8} {'pieces':>6} {'gain':>8} {'gain %':>7}")
    for c in found[:40]:
        print(f"{json.dumps(c.token):<24} {c.count:>8,} {c.pieces:>6} {c.gain_tokens:>8,} {100 * c.gain_share:>6.2f}%")
    total = sum(c.gain_tokens for c in found)
    print(f"all {len(found)} together save at most {total:,} tokens ({100 * total / max(1, tokens):.1f}%; overlaps "
          f"make the real gain a little smaller)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(c.as_dict()) + "\n" for c in found)
        print(f"wrote {args.out}")
    return 0


def add_extend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face ModernBERT folder (config.json, weights, "
                                                       "tokenizer.json)")
    parser.add_argument("--tokens", required=True, help="propose-tokens output (.jsonl) or one JSON string per line")
    parser.add_argument("--top", type=int, default=None, help="use only the first N tokens of --tokens")
    parser.add_argument("--mode", required=True, choices=("unused", "append"), help="where the new ids come from")
    parser.add_argument("--out", required=True, help="new Hugging Face folder (must not exist or be empty)")


def run_extend(args) -> int:
    from modernbert_train.checkpoint.vocab import extend_hf_folder
    from modernbert_train.data.vocab_extension import read_token_list

    tokens = read_token_list(args.tokens)[:args.top]
    record = extend_hf_folder(args.model, tokens, args.mode, args.out, sample_text=" ".join(tokens[:50]))
    print(f"wrote {args.out}: {len(tokens)} tokens ({args.mode}), ids {record['tokens'][0]['id']}.."
          f"{record['tokens'][-1]['id']}, embedding {record['old_vocab_rows']} -> {record['new_vocab_rows']} rows; "
          f"old tokens' logits unchanged (max difference {record['old_logits_max_abs_diff']:g})")
    return 0


COMMANDS = {
    "train-tokenizer": (add_train_tokenizer_arguments, run_train_tokenizer, TRAIN_TOKENIZER_EPILOG,
                        "train a lossless byte-level BPE tokenizer with ModernBERT's special tokens"),
    "prepare": (add_prepare_arguments, run_prepare, PREPARE_EPILOG,
                "tokenize a source into MDS shards (parallel, resumable, every record accounted)"),
    "stats": (add_stats_arguments, run_stats, STATS_EPILOG,
              "documents, tokens, chunks and length histograms of prepared sources"),
    "build-local-corpus": (add_corpus_arguments, run_corpus, CORPUS_EPILOG,
                           "write the offline demo corpus (stdlib code + Python prose)"),
    "propose-tokens": (add_propose_arguments, run_propose, PROPOSE_EPILOG,
                       "propose domain tokens the tokenizer splits into many pieces, with their compression gain"),
    "extend-vocab": (add_extend_arguments, run_extend, EXTEND_EPILOG,
                     "add tokens to a model's tokenizer (unused slots or appended) and initialise their rows"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modernbert-data", description="Prepare data for ModernBERT pretraining.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_arguments, _, epilog, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(command)
        add_progress_argument(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}{did_you_mean(argv[0], COMMANDS)}")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    configure_console()
    with progress_mode(args.progress):
        return run_command(COMMANDS[args.command][1], args, debug)

if __name__ == "__main__":
    sys.exit(main())

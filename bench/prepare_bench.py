"""Throughput of `modernbert-data prepare` against plain `tokenizers` encode_batch on the same documents.

    .venv/bin/python bench/prepare_bench.py --workers 1 2 --max-mb 12

Builds the offline local corpus (stdlib code + Python prose) unless --corpus is given, trains a tokenizer on it
unless --tokenizer is given (neither is timed), then in one process and one run:
  raw      : Tokenizer.encode_batch over every document, already in memory, one core
             (TOKENIZERS_PARALLELISM=false), best of --repeats
  prepare  : the whole `prepare` call per worker count (planning, reading, tokenizing, chunking, MDS writing
             with zstd, index merge, worker start-up), into a fresh folder, best of --repeats
Tokens are content tokens ([CLS]/[SEP] of chunks excluded) so both sides count the same thing.
Target: prepare tokens/s per worker >= 0.8x the raw one-core rate, and rising with workers.
"""
from __future__ import annotations

import os

# Before tokenizers is imported: the raw baseline must be one core, like one prepare worker.
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=None, help="folder with code/ and prose/ (default: build one)")
    parser.add_argument("--max-mb", type=float, default=12, help="cap per kind when building the corpus (MB)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json or folder (default: train one)")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-seq-len", type=int, default=8192)
    parser.add_argument("--unit-mb", type=float, default=1.0, help="work unit size: small, so all workers get work")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed)")
    parser.add_argument("--json-out", default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def load_documents(inputs: list[str]) -> tuple[list[str], int]:
    from data_prep.sources import Document, expand_inputs, plan_units, read_unit

    texts: list[str] = []
    for unit in plan_units(expand_inputs(inputs), "auto", unit_bytes=1 << 40):
        texts.extend(item.text for item in read_unit(unit) if isinstance(item, Document))
    return texts, sum(len(t.encode("utf-8")) for t in texts)


def time_raw(tokenizer_path: str, texts: list[str]) -> tuple[float, int]:
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    tok.encode_special_tokens = True  # as prepare does: "[MASK]" in a text is text
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return time.perf_counter() - start, _cpu_seconds() - cpu_start, tokens


def _cpu_seconds() -> float:
    """User+system CPU of this process and its reaped children (the pool's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def time_prepare(tokenizer_path: str, inputs: list[str], out: Path, workers: int, args) -> tuple[float, dict]:
    from data_prep.prepare import PrepareConfig, prepare

    shutil.rmtree(out, ignore_errors=True)
    cfg = PrepareConfig(inputs=inputs, out=str(out), tokenizer=tokenizer_path, source="bench",
                        max_seq_len=args.max_seq_len, workers=workers, progress=False,
                        unit_bytes=int(args.unit_mb * (1 << 20)))
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    summary = prepare(cfg)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    meta = json.loads((out / "prep_meta.json").read_text())
    return elapsed, {"cpu_seconds": cpu, "tokens": meta["content_tokens"], "units": summary["units"],
                     "documents": meta["documents"], "chunks": meta["chunks"]}


def measure(tokenizer_path: str, inputs: list[str], texts: list[str], scratch: Path, args) -> tuple[dict, list]:
    """Best of --repeats, raw and prepare interleaved so a busy machine hurts both sides alike."""
    raw_times, raw_cpu, prep_times, prep_cpu, prep_info = [], [], {w: [] for w in args.workers}, \
        {w: [] for w in args.workers}, {}
    tokens = 0
    for _ in range(args.repeats):
        elapsed, cpu, tokens = time_raw(tokenizer_path, texts)
        raw_times.append(elapsed)
        raw_cpu.append(cpu)
        for w in args.workers:
            elapsed, prep_info[w] = time_prepare(tokenizer_path, inputs, scratch / f"out_w{w}", w, args)
            prep_times[w].append(elapsed)
            prep_cpu[w].append(prep_info[w].pop("cpu_seconds"))
    raw = {"tokens": tokens, "seconds": min(raw_times), "tokens_per_s": tokens / min(raw_times),
           "tokens_per_cpu_s": tokens / min(raw_cpu), "all_seconds": raw_times}
    runs = []
    for w in args.workers:
        best = min(prep_times[w])
        runs.append(dict(prep_info[w], workers=w, seconds=best, tokens_per_s=prep_info[w]["tokens"] / best,
                         tokens_per_s_per_worker=prep_info[w]["tokens"] / best / w,
                         tokens_per_cpu_s=prep_info[w]["tokens"] / min(prep_cpu[w]), all_seconds=prep_times[w]))
    return raw, runs


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from data_prep.local_corpus import build_local_corpus
    from data_prep.tokenizer import iter_training_texts, save_tokenizer, train_tokenizer
    from data_prep.sources import expand_inputs

    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="prepare_bench_"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        corpus = Path(args.corpus) if args.corpus else scratch / "corpus"
        if not args.corpus:
            build_local_corpus(corpus, int(args.max_mb * 1e6), overwrite=True)
        inputs = [str(corpus / "code"), str(corpus / "prose")]
        tokenizer_path = args.tokenizer
        if tokenizer_path is None:
            texts = iter_training_texts(expand_inputs(inputs), max_chars=20_000_000)
            tokenizer_path = str(save_tokenizer(train_tokenizer(texts, args.vocab_size, show_progress=False),
                                                scratch / "tokenizer"))
        texts, nbytes = load_documents(inputs)
        raw, runs = measure(tokenizer_path, inputs, texts, scratch, args)
        for run in runs:
            if run["tokens"] != raw["tokens"]:
                raise SystemExit(f"token counts differ: raw {raw['tokens']} vs prepare {run['tokens']}")
            run["per_worker_vs_raw"] = run["tokens_per_s_per_worker"] / raw["tokens_per_s"]
            run["per_cpu_s_vs_raw"] = run["tokens_per_cpu_s"] / raw["tokens_per_cpu_s"]
        import tokenizers

        result = {"documents": len(texts), "input_mb": nbytes / 1e6, "raw": raw, "prepare": runs,
                  "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                  "python": platform.python_version(), "tokenizers": tokenizers.__version__,
                  "max_seq_len": args.max_seq_len, "unit_mb": args.unit_mb,
                  "date": time.strftime("%Y-%m-%d"), "load_average_after": os.getloadavg()}
    finally:
        if args.workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"{result['documents']:,} documents, {result['input_mb']:.1f} MB, {raw['tokens']:,} tokens; "
          f"{result['cpu_count']} CPUs; tokenizers {result['tokenizers']}")
    print(f"load average after the run: {', '.join(f'{x:.1f}' for x in result['load_average_after'])}")
    print("| run | workers | wall s | tokens/s | tokens/s per worker | per worker vs raw | tokens per CPU-s | vs raw |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| raw encode_batch | 1 | {raw['seconds']:.2f} | {raw['tokens_per_s']:,.0f} | "
          f"{raw['tokens_per_s']:,.0f} | 1.00x | {raw['tokens_per_cpu_s']:,.0f} | 1.00x |")
    for run in runs:
        print(f"| prepare | {run['workers']} | {run['seconds']:.2f} | {run['tokens_per_s']:,.0f} | "
              f"{run['tokens_per_s_per_worker']:,.0f} | {run['per_worker_vs_raw']:.2f}x | "
              f"{run['tokens_per_cpu_s']:,.0f} | {run['per_cpu_s_vs_raw']:.2f}x |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

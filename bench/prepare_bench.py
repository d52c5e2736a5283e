"""Throughput of `modernbert-data prepare` against plain `tokenizers` encode_batch on the same documents.

    .venv/bin/python bench/prepare_bench.py --workers 1 2 --max-mb 12

Builds the offline local corpus (stdlib code + Python prose) unless --corpus is given, trains a tokenizer on it
unless --tokenizer is given (neither is timed), then, in one process and one run, for each worker count N:
  raw x N  : Tokenizer.encode_batch over every document (already in memory), split over N single-threaded
             processes (TOKENIZERS_PARALLELISM=false); N=1 is the plain one-core rate
  prepare  : the whole `prepare` call with N workers (planning, reading files, tokenizing, chunking, MDS
             writing with zstd, index merge, worker start-up) into a fresh folder
Each pair runs back to back; the table gives the best of --repeats and the median of the per-repeat
prepare/raw ratios, so load from other processes on a shared machine hits both sides alike. Tokens are content tokens ([CLS]/[SEP] excluded): both sides count the same.
CPU-s rates (user+system of the process and its workers) are less disturbed by other load; the last line
alternates prepare's per-unit work and encode_batch unit by unit in one process (CPU seconds), the
comparison least disturbed by other processes on a shared machine.
Target: prepare tokens/s per worker >= 0.8x the raw one-core rate, and rising with workers.
"""
from __future__ import annotations

import os

# Before tokenizers is imported: the raw baseline must be one core, like one prepare worker.
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
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


_RAW: dict = {}


def _encode_slice(index: int) -> int:
    tok, texts, n = _RAW["tok"], _RAW["texts"], _RAW["n"]
    return sum(len(e.ids) for e in tok.encode_batch(texts[index::n], add_special_tokens=False))


def time_raw(tokenizer_path: str, texts: list[str], processes: int) -> tuple[float, float, int]:
    """encode_batch over all texts, split across `processes` single-threaded processes (1: in this process)."""
    import multiprocessing as mp

    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    tok.encode_special_tokens = True  # as prepare does: "[MASK]" in a text is text
    _RAW.update(tok=tok, texts=texts, n=processes)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    if processes == 1:
        tokens = _encode_slice(0)
    else:
        with mp.get_context("fork").Pool(processes) as pool:
            tokens = sum(pool.map(_encode_slice, range(processes)))
    return time.perf_counter() - start, _cpu_seconds() - cpu_start, tokens


def _cpu_seconds() -> float:
    """User+system CPU of this process and its reaped children (the pool's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def time_prepare(tokenizer_path: str, inputs: list[str], out: Path, workers: int, args) -> tuple[float, dict]:
    from data_prep.bookkeeping import recognise_output
    from data_prep.prepare import PrepareConfig, prepare
    from modernbert_train.common.safety import remove_tree

    remove_tree(out, label="bench output", recognise=recognise_output)  # a prepare output of an earlier run
    cfg = PrepareConfig(inputs=inputs, out=str(out), tokenizer=tokenizer_path, source="bench",
                        max_seq_len=args.max_seq_len, workers=workers, progress=False,
                        unit_bytes=int(args.unit_mb * (1 << 20)))
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    summary = prepare(cfg)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    meta = json.loads((out / "prep_meta.json").read_text())
    return elapsed, {"cpu_seconds": cpu, "tokens": meta["content_tokens"], "units": summary["units"],
                     "documents": meta["documents"], "chunks": meta["chunks"]}


def interleaved_core(tokenizer_path: str, inputs: list[str], scratch: Path, args) -> dict:
    """CPU seconds of prepare's per-unit work (read, tokenize, chunk, MDS write) against encode_batch on the
    same unit's texts, alternating unit by unit: the per-core comparison least disturbed by other load."""
    from data_prep.prepare import UnitWriter, mds_columns, token_dtype  # noqa: F401 - same code as prepare
    from data_prep.sources import Document, expand_inputs, plan_units, read_unit
    from data_prep.tokenizer import load_tokenizer, special_token_ids, vocab_size

    tok = load_tokenizer(tokenizer_path)
    tok.encode_special_tokens = True
    vocab = vocab_size(tok)
    settings = {"source": "bench", "vocab_size": vocab, "dtype": token_dtype(vocab), "max_seq_len": args.max_seq_len,
                "text_field": "text", "shard_size_limit": 1 << 26,
                "policies": {"on_error": "fail", "on_binary": "skip"}}
    out = scratch / "interleaved"
    from data_prep.bookkeeping import is_own_entry
    from modernbert_train.common.safety import only_these_entries, remove_tree

    remove_tree(out, label="bench output", recognise=only_these_entries(is_own_entry, (), "prepare_bench"))
    out.mkdir(parents=True)
    writer = UnitWriter(tok, special_token_ids(tok), settings, out, report=lambda nbytes, ntokens: None)
    raw_cpu = unit_cpu = 0.0
    tokens = 0
    for _ in range(args.repeats):
        for unit in plan_units(expand_inputs(inputs), "auto", int(args.unit_mb * (1 << 20))):
            texts = [item.text for item in read_unit(unit) if isinstance(item, Document)]
            start = time.process_time()
            tokens += sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
            raw_cpu += time.process_time() - start
            start = time.process_time()
            writer.run(unit)
            unit_cpu += time.process_time() - start
    return {"tokens": tokens, "raw_cpu_s": raw_cpu, "prepare_unit_cpu_s": unit_cpu, "ratio": raw_cpu / unit_cpu}


def measure(tokenizer_path: str, inputs: list[str], texts: list[str], scratch: Path, args) -> list[dict]:
    """Best of --repeats; raw xN and prepare with N workers run back to back, so load from other processes on
    the machine hits both sides of each comparison alike."""
    times: dict = {}
    for _ in range(args.repeats):
        for w in args.workers:
            elapsed, cpu, tokens = time_raw(tokenizer_path, texts, w)
            times.setdefault(("raw", w), []).append((elapsed, cpu, {"tokens": tokens}))
            elapsed, info = time_prepare(tokenizer_path, inputs, scratch / f"out_w{w}", w, args)
            cpu = info.pop("cpu_seconds")
            times.setdefault(("prepare", w), []).append((elapsed, cpu, info))
    rows = []
    for (kind, w), runs in times.items():
        best = min(r[0] for r in runs)
        best_cpu = min(r[1] for r in runs)
        info = runs[-1][2]
        # Ratio of each prepare run to the raw run just before it: robust to load that changes over minutes.
        paired = [raw[0] / run[0] for raw, run in zip(times[("raw", w)], runs)]
        rows.append(dict(info, run=kind, workers=w, seconds=best, tokens_per_s=info["tokens"] / best,
                         tokens_per_s_per_worker=info["tokens"] / best / w,
                         tokens_per_cpu_s=info["tokens"] / best_cpu, all_seconds=[r[0] for r in runs],
                         median_paired_ratio=statistics.median(paired)))
    return rows


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
        rows = measure(tokenizer_path, inputs, texts, scratch, args)
        core = interleaved_core(tokenizer_path, inputs, scratch, args)
        raw1 = next(r for r in rows if r["run"] == "raw" and r["workers"] == 1)
        for row in rows:
            if row["tokens"] != raw1["tokens"]:
                raise SystemExit(f"token counts differ: raw {raw1['tokens']} vs {row['run']} {row['tokens']}")
            raw_same = next(r for r in rows if r["run"] == "raw" and r["workers"] == row["workers"])
            row["per_worker_vs_raw1"] = row["tokens_per_s_per_worker"] / raw1["tokens_per_s"]
            row["vs_raw_same_processes"] = row["tokens_per_s"] / raw_same["tokens_per_s"]
            row["per_cpu_s_vs_raw1"] = row["tokens_per_cpu_s"] / raw1["tokens_per_cpu_s"]
        import tokenizers

        result = {"documents": len(texts), "input_mb": nbytes / 1e6, "rows": rows, "interleaved_core": core,
                  "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                  "python": platform.python_version(), "tokenizers": tokenizers.__version__,
                  "max_seq_len": args.max_seq_len, "unit_mb": args.unit_mb,
                  "date": time.strftime("%Y-%m-%d"), "load_average_after": os.getloadavg()}
    finally:
        if args.workdir is None:  # its own mkdtemp folder
            from modernbert_train.common.safety import remove_tree

            remove_tree(scratch, label="scratch folder", recognise=None)

    print(f"{result['documents']:,} documents, {result['input_mb']:.1f} MB, {raw1['tokens']:,} tokens; "
          f"{result['cpu_count']} CPUs; tokenizers {result['tokenizers']}; load average after: "
          f"{', '.join(f'{x:.1f}' for x in result['load_average_after'])}")
    print("| run | workers | wall s (best) | tokens/s | per worker | per worker / raw x1 | / raw same N "
          "| median paired / raw same N | tokens per CPU-s | / raw x1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["workers"], r["run"] != "raw")):
        name = f"raw encode_batch x{row['workers']}" if row["run"] == "raw" else "prepare"
        print(f"| {name} | {row['workers']} | {row['seconds']:.2f} | {row['tokens_per_s']:,.0f} | "
              f"{row['tokens_per_s_per_worker']:,.0f} | {row['per_worker_vs_raw1']:.2f}x | "
              f"{row['vs_raw_same_processes']:.2f}x | {row['median_paired_ratio']:.2f}x | "
              f"{row['tokens_per_cpu_s']:,.0f} | {row['per_cpu_s_vs_raw1']:.2f}x |")
    print(f"interleaved per work unit, CPU seconds: encode_batch {core['raw_cpu_s']:.2f} s, prepare's unit work "
          f"{core['prepare_unit_cpu_s']:.2f} s -> prepare runs at {core['ratio']:.2f}x the raw per-core rate")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

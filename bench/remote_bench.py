"""Data at scale: `prepare --engine spark` against today's `prepare`, and streaming from S3 against local disk.

    .venv/bin/python bench/remote_bench.py --max-mb 3 --repeats 2

Builds the offline local corpus (stdlib code + Python prose) and trains a tokenizer (neither timed), then in
one process and one run:
  prepare      : the whole `prepare` call with N local workers (today's path), N = 1, 2
  spark        : the same call with --engine spark on Spark local[N,4]; the session is started first and its
                 start-up (JVM, ~10 s) is reported on its own, since a cluster pays it once per job
  stream local : every sample of the prepared source read through StreamingDataset from local disk
  stream s3    : the same from moto's S3 server on 127.0.0.1 (cold cache: every shard downloaded), with and
                 without a cache_limit of 8 shards (eviction on)
Rates are content tokens/s (wall) and per CPU second; ratios are against the baseline row of the same block.
"""
from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _prepare(cfg, engine: str):
    from data_prep.distributed import SparkEngine
    from data_prep.prepare import prepare

    from data_prep.bookkeeping import recognise_output
    from modernbert_train.common.safety import remove_tree

    remove_tree(cfg.out, label="bench output", recognise=recognise_output)
    start, cpu = time.perf_counter(), _cpu()
    hooks = SparkEngine(None, cfg.tokenizer) if engine == "spark" else None  # None: the running session
    summary = prepare(cfg, hooks=hooks)
    return time.perf_counter() - start, _cpu() - cpu, summary


def bench_prepare(corpus: Path, tokenizer: Path, work: Path, args) -> list[tuple]:
    from pyspark.sql import SparkSession

    from data_prep.distributed import local_master
    from data_prep.prepare import PrepareConfig

    rows = []
    for workers in args.workers:
        def cfg(name):
            return PrepareConfig(inputs=[str(corpus / "code"), str(corpus / "prose")], out=str(work / name),
                                 tokenizer=str(tokenizer), source="bench", max_seq_len=8192, workers=workers,
                                 unit_bytes=int(args.unit_mb * (1 << 20)), progress=False)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        start = time.perf_counter()
        session = (SparkSession.builder.master(local_master(workers)).config("spark.driver.host", "127.0.0.1")
                   .config("spark.python.daemon.module", "data_prep.spark_daemon")
                   .config("spark.ui.enabled", "false").getOrCreate())
        startup = time.perf_counter() - start
        best = {}
        for _ in range(args.repeats):
            for engine in ("prepare", "spark"):
                seconds, cpu, summary = _prepare(cfg(f"{engine}{workers}"), engine)
                folder = work / f"{engine}{workers}"
                tokens = json.loads((folder / "prep_meta.json").read_text())["content_tokens"]
                # Seconds spent inside the units' work (read, tokenize, chunk, write), wherever they ran.
                in_units = sum(json.loads(p.read_text())["seconds"] for p in folder.glob("part-*/unit_summary.json"))
                if engine not in best or seconds < best[engine][0]:
                    best[engine] = (seconds, cpu, tokens, summary["units"], in_units)
        session.stop()
        base = best["prepare"][2] / best["prepare"][0]
        for engine in ("prepare", "spark"):
            seconds, cpu, tokens, units, in_units = best[engine]
            note = (f"session start {startup:.1f}s not incl.; " if engine == "spark" else "today's prepare; ") + \
                f"inside units {tokens / in_units:,.0f} tok/s per core"
            # Spark's Python workers are the JVM's children, not ours: their CPU time is not visible here.
            per_cpu = tokens / max(cpu, 1e-9) if engine == "prepare" else None
            rows.append((f"{engine} x{workers}", units, tokens, tokens / seconds, tokens / seconds / workers,
                         per_cpu, (tokens / seconds) / base, note))
    return rows


def _read_all(manifest, **kwargs) -> tuple[float, float, int]:
    from modernbert_train.data.dataset import build_streaming_dataset

    start, cpu = time.perf_counter(), _cpu()
    dataset = build_streaming_dataset(manifest, batch_size=8, shuffle=True, seed=1, shuffle_algo="py1s",
                                      predownload=32, **kwargs)
    tokens = sum(int(item["input_ids"].size) for item in dataset)
    return time.perf_counter() - start, _cpu() - cpu, tokens


def bench_stream(corpus: Path, tokenizer: Path, work: Path, args) -> list[tuple]:
    import boto3
    from moto.server import ThreadedMotoServer

    from data_prep.prepare import PrepareConfig, prepare
    from data_prep.remote import prepare_remote
    from modernbert_train.data.manifest import parse_manifest

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["S3_ENDPOINT_URL"] = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    settings = dict(inputs=[str(corpus / "code"), str(corpus / "prose")], tokenizer=str(tokenizer), source="s",
                    max_seq_len=1024, shard_size_limit=1 << 20, workers=1, progress=False)
    prepare(PrepareConfig(out=str(work / "local_src"), **settings))
    prepare_remote(PrepareConfig(out="s3://bench/src", **settings), work / "staging")
    index = json.loads((work / "local_src" / "index.json").read_text())
    largest = max(s["raw_data"]["bytes"] + s["zip_data"]["bytes"] for s in index["shards"])

    def manifest(name, local, remote=None):
        source = {"name": "s", "local": str(local), **({"remote": remote} if remote else {})}
        return parse_manifest({"name": name, "sources": [source]}, name, check_local=False)

    rows = []
    best: dict = {}
    for repeat in range(args.repeats):
        runs = [("local disk", work / "local_src", None, None),
                ("s3, cold cache", work / f"cache{repeat}", "s3://bench/src", None),
                ("s3, cache 8 shards", work / f"cache_evict{repeat}", "s3://bench/src", 8 * largest)]
        for label, local, remote, limit in runs:
            seconds, cpu, tokens = _read_all(manifest(f"{label}{repeat}", local, remote), cache_limit=limit)
            if label not in best or seconds < best[label][0]:
                best[label] = (seconds, cpu, tokens)
    server.stop()
    base = best["local disk"][2] / best["local disk"][0]
    for label, (seconds, cpu, tokens) in best.items():
        rows.append((label, len(index["shards"]), tokens, tokens / seconds, tokens / seconds,
                     tokens / max(cpu, 1e-9), (tokens / seconds) / base, f"{largest / 1e6:.2f} MB largest shard"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-mb", type=float, default=3, help="corpus cap per kind (MB)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--unit-mb", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", choices=("prepare", "stream"), default=None)
    args = parser.parse_args()

    from data_prep.local_corpus import build_local_corpus
    from data_prep.sources import expand_inputs
    from data_prep.tokenizer import iter_training_texts, save_tokenizer, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="remote_bench_"))
    try:
        build_local_corpus(work / "corpus", max_bytes=int(args.max_mb * 1e6))
        files = expand_inputs([work / "corpus" / "code", work / "corpus" / "prose"])
        tokenizer = save_tokenizer(train_tokenizer(iter_training_texts(files, max_chars=2_000_000), vocab_size=8192,
                                                   show_progress=False), work / "tok").parent
        import pyspark
        import streaming

        print(f"{time.strftime('%Y-%m-%d')} python {platform.python_version()}, streaming {streaming.__version__}, "
              f"pyspark {pyspark.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        header = f"| {'run':<20} | units/shards | content tokens | tok/s (wall) | tok/s per worker | tok per CPU-s | ratio | note |"
        print(header)
        print("|" + "---|" * 8)
        rows = []
        if args.skip != "prepare":
            rows += bench_prepare(work / "corpus", tokenizer, work, args)
        if args.skip != "stream":
            rows += bench_stream(work / "corpus", tokenizer, work, args)
        for label, units, tokens, rate, per_worker, per_cpu, ratio, note in rows:
            print(f"| {label:<20} | {units} | {tokens:,} | {rate:,.0f} | {per_worker:,.0f} | {'n/a' if per_cpu is None else f'{per_cpu:,.0f}'} | "
                  f"{ratio:.2f}x | {note} |")
    finally:
        from modernbert_train.common.safety import remove_tree

        remove_tree(work, label="scratch folder", recognise=None)  # its own mkdtemp folder
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of verifying shard hashes on read (issue 17, finding 7), CPU.

A prepared source is read through streaming with `remote` = the prepared folder and `local` = a cache folder:
each compressed shard is copied into the cache, its xxh3_64 checked (when verifying), decompressed, and the
compressed copy dropped. This measures that first ("cold") read of every shard with and without the check,
the same for `modernbert-data stats --scan`'s in-memory reader, and a full pass over the samples for scale.

The shards are synthetic but shaped like prepare's: uint16 token chunks of up to 8,192 ids drawn from a Zipf
distribution (so zstd compresses them about as much as real text), written by MDSWriter with hashes.

example:
  python bench/shard_hash_bench.py --workdir /tmp/hash_bench --mb 96 --repeats 3
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np


def build_source(folder: Path, mb: float, shard_mb: float) -> None:
    from streaming import MDSWriter

    from modernbert_train.data.shards import SHARD_HASH

    if (folder / "index.json").is_file():
        return
    rng = np.random.default_rng(0)
    columns = {"input_ids": "ndarray:uint16", "doc_id": "int64", "chunk_index": "int32", "source": "str"}
    written, doc = 0, 0
    with MDSWriter(out=str(folder), columns=columns, compression="zstd", hashes=[SHARD_HASH],
                   size_limit=int(shard_mb * (1 << 20))) as writer:
        while written < mb * (1 << 20):
            n = int(rng.integers(64, 8192))
            ids = np.minimum(rng.zipf(1.2, n), 50_000).astype(np.uint16)
            writer.write({"input_ids": ids, "doc_id": doc, "chunk_index": 0, "source": "bench"})
            written += ids.nbytes
            doc += 1
    (folder / "prep_meta.json").write_text(json.dumps({"vocab_size": 50_368}))


def _only_cache_folders(folder: Path) -> str | None:
    """The deletion guard's test: a shard cache root holds only <source>-<16 hex digits> folders."""
    import re

    foreign = [p.name for p in folder.iterdir() if not re.fullmatch(r".+-[0-9a-f]{16}", p.name)]
    return f"holds {', '.join(sorted(foreign)[:3])}, which a shard cache does not" if foreign else None


def cold_read_seconds(folder: Path, cache_root: Path, verify: bool) -> tuple[float, float]:
    """(seconds to copy + check + decompress every shard into a fresh cache, seconds for a pass over samples)."""
    import modernbert_train.data.dataset as dataset_module
    from modernbert_train.data.manifest import parse_manifest

    from modernbert_train.common.safety import remove_tree

    remove_tree(cache_root, label="bench cache", recognise=_only_cache_folders)
    logging.getLogger(dataset_module.__name__).setLevel(logging.ERROR)  # "no shard hashes" is the point here
    os.environ[dataset_module.SHARD_CACHE_ENV] = str(cache_root)
    real = dataset_module.has_shard_hashes
    dataset_module.has_shard_hashes = real if verify else (lambda _folder: False)
    try:
        manifest = parse_manifest({"name": "bench", "sources": [{"name": "bench", "local": str(folder)}]})
        dataset = dataset_module.build_streaming_dataset(manifest, batch_size=8, shuffle=False, seed=0)
    finally:
        dataset_module.has_shard_hashes = real
    start = time.perf_counter()
    for shard_id in range(len(dataset.shards)):
        dataset.prepare_shard(shard_id)
    prepared = time.perf_counter() - start
    start = time.perf_counter()
    for sample_id in range(dataset.num_samples):
        dataset.get_item(sample_id)
    passed = time.perf_counter() - start
    del dataset
    gc.collect()
    return prepared, passed


def scan_seconds(folder: Path, verify: bool) -> float:
    from modernbert_train.data.shards import load_index, shard_bytes

    index = load_index(folder)
    start = time.perf_counter()
    for shard in index["shards"]:
        shard_bytes(folder, shard, verify=verify)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/shard_hash_bench")
    parser.add_argument("--mb", type=float, default=96, help="uncompressed MB of token ids")
    parser.add_argument("--shard-mb", type=float, default=32, help="uncompressed MB per shard")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    workdir = Path(args.workdir)
    folder = workdir / "source"
    build_source(folder, args.mb, args.shard_mb)
    index = json.loads((folder / "index.json").read_text())
    raw = sum(s["raw_data"]["bytes"] for s in index["shards"])
    packed = sum(s["zip_data"]["bytes"] for s in index["shards"])
    import streaming
    import xxhash

    print(f"{len(index['shards'])} shards, {raw / 2**20:.0f} MiB raw, {packed / 2**20:.0f} MiB zstd; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, streaming {streaming.__version__}, "
          f"xxhash {xxhash.VERSION}")
    rows = []
    for verify in (False, True):
        colds = [cold_read_seconds(folder, workdir / "cache", verify) for _ in range(args.repeats)]
        scans = [scan_seconds(folder, verify) for _ in range(args.repeats)]
        rows.append((verify, min(c[0] for c in colds), min(c[1] for c in colds), min(scans)))
    base = rows[0]
    print(f"{'hash check':<11} {'cold read s':>12} {'MiB/s':>8} {'ratio':>7} {'stats scan s':>13} {'ratio':>7} "
          f"{'sample pass s':>14}")
    for verify, cold, passed, scan in rows:
        print(f"{'on' if verify else 'off':<11} {cold:>12.3f} {raw / 2**20 / cold:>8.0f} {cold / base[1]:>6.2f}x "
              f"{scan:>13.3f} {scan / base[3]:>6.2f}x {passed:>14.3f}")
    from modernbert_train.common.safety import remove_tree

    remove_tree(workdir / "cache", label="bench cache", recognise=_only_cache_folders)


if __name__ == "__main__":
    main()

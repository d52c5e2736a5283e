"""Remote sources get a bounded shard cache (issue 12 item 10): eviction keeps the cache under its limit and
every sample still reads back exactly as from local disk. The remote here is a local folder (a shared
filesystem, as streaming allows); the S3 path is covered in tests/data_prep/test_remote_training.py."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from modernbert_train.data.dataset import (DEFAULT_CACHE_DISK_FRACTION, build_streaming_dataset,
                                           default_cache_limit)
from modernbert_train.data.manifest import load_manifest


def _manifest(path, local, remote=None):
    source = {"name": "code", "local": str(local), **({"remote": str(remote)} if remote else {})}
    path.write_text(yaml.safe_dump({"name": "one", "sources": [source]}))
    return load_manifest(path)


def _read_all(dataset) -> list[tuple[int, str]]:
    return [(item["sample_id"], hashlib.sha256(item["input_ids"].tobytes()).hexdigest()) for item in dataset]


def _cache_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("shard.*") if p.is_file())


def test_remote_cache_evicts_under_its_limit_and_reads_every_sample(corpus_copy):
    shards, tmp = corpus_copy["shards"], corpus_copy["tmp"]
    remote = tmp / "shared_fs" / "code"
    shutil.copytree(shards / "code", remote)
    index = json.loads((remote / "index.json").read_text())
    largest = max(s["raw_data"]["bytes"] + (s.get("zip_data") or {}).get("bytes", 0) for s in index["shards"])
    limit = 5 * largest  # streaming's floor is 4 shards; the source has far more
    assert len(index["shards"]) >= 8

    # A shuffle that reads one shard at a time (py1s): with a cache of a few shards, streaming's
    # download-ahead must never need more shards at once than the cache holds (README "Data at scale").
    order = dict(batch_size=8, shuffle=True, seed=3, shuffle_algo="py1s", predownload=8)
    local_read = _read_all(build_streaming_dataset(_manifest(tmp / "local.yaml", shards / "code"), **order))
    cache = tmp / "cache" / "code"
    dataset = build_streaming_dataset(_manifest(tmp / "remote.yaml", cache, remote), cache_limit=limit, **order)
    assert dataset.cache_limit == limit
    remote_read = _read_all(dataset)
    assert remote_read == local_read
    assert {i for i, _ in remote_read} == set(range(sum(s["samples"] for s in index["shards"])))
    # Streaming counts a shard once it lands: with its read-ahead and the reader downloading at once, the
    # cache may pass the limit by one shard (README 'Data at scale').
    assert 0 < _cache_bytes(cache) <= limit + largest
    present = {p.name for p in cache.glob("shard.*.mds")}
    assert len(present) < len(index["shards"])  # shards were evicted (and each was read: every sample came back)


def test_every_cache_gets_a_disk_derived_default(corpus_copy):
    shards, tmp = corpus_copy["shards"], corpus_copy["tmp"]
    # A prepared local folder is decompressed into the shard cache: bounded by that cache's disk.
    from modernbert_train.data.dataset import shard_cache_root

    cache_root = Path(shard_cache_root())
    cache_root.mkdir(parents=True, exist_ok=True)
    local_limit = default_cache_limit(_manifest(tmp / "local.yaml", shards / "code"))
    free_there = shutil.disk_usage(cache_root).free
    assert abs(local_limit - DEFAULT_CACHE_DISK_FRACTION * free_there) <= 0.05 * free_there
    remote_manifest = _manifest(tmp / "remote.yaml", tmp / "cache" / "code", shards / "code")
    free = shutil.disk_usage(tmp).free
    expected = default_cache_limit(remote_manifest)
    assert abs(expected - DEFAULT_CACHE_DISK_FRACTION * free) <= 0.01 * free  # the cache folder is still empty
    dataset = build_streaming_dataset(remote_manifest, batch_size=8, shuffle=False, seed=3)
    assert dataset.cache_limit is not None and abs(dataset.cache_limit - expected) <= 0.01 * free


def test_a_remote_shard_that_no_longer_matches_its_hash_is_named_not_read(corpus_copy):
    """A remote (object-store) source is checked against the hashes prepare wrote, as a local one is: a shard
    replaced by other bytes that still decompress and decode (so only the hash can tell) stops the read."""
    import pytest
    from streaming.base.compression import compress, decompress

    from modernbert_train.common.errors import UserError

    shards, tmp = corpus_copy["shards"], corpus_copy["tmp"]
    remote = tmp / "shared_fs" / "code"
    shutil.copytree(shards / "code", remote)
    index = json.loads((remote / "index.json").read_text())
    shard = index["shards"][0]
    victim = remote / shard["zip_data"]["basename"]
    raw = bytearray(decompress(shard["compression"], victim.read_bytes()))
    raw[-1] ^= 0x01  # one byte of the last sample's tokens: still a valid shard
    victim.write_bytes(compress(shard["compression"], bytes(raw)))
    dataset = build_streaming_dataset(_manifest(tmp / "remote.yaml", tmp / "cache" / "code", remote),
                                      batch_size=8, shuffle=False, seed=3)
    with pytest.raises(UserError, match=rf"shard {victim} of source 'code' is corrupt or unreadable "
                                        r"\(ValueError: Checksum failure"):
        for _ in dataset:
            pass

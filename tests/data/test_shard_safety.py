"""Issue 17, the loader side: pickle columns refused, shards decompressed into a cache (never into the prepared
folder) with hashes verified and the shard named on failure, token-id ranges checked before training."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from .conftest import write_manifest
from modernbert_train.data import build_streaming_dataset, load_manifest
from modernbert_train.data.shards import check_token_ranges, scan_token_range
from modernbert_train.common.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def _dataset(manifest: Path):
    return build_streaming_dataset(load_manifest(manifest), batch_size=4, shuffle=False, seed=0)


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


class _Planted:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_loader_refuses_a_pickle_column_by_name(corpus_copy):
    from streaming import MDSWriter

    shards, marker = corpus_copy["shards"], corpus_copy["tmp"] / "PWNED"
    planted = shards / "prose"
    meta = (planted / "prep_meta.json").read_bytes()
    shutil.rmtree(planted)
    with MDSWriter(out=str(planted), columns={"input_ids": "ndarray:uint16", "payload": "pkl"}) as writer:
        writer.write({"input_ids": np.array([1, 7, 2], dtype=np.uint16), "payload": _Planted(marker)})
    (planted / "prep_meta.json").write_bytes(meta)
    manifest = write_manifest(corpus_copy["tmp"] / "mix.yaml", shards)
    with pytest.raises(UserError, match=rf"{planted / 'index.json'}: column payload \(pkl\) is a pickle"):
        _dataset(manifest)
    assert not marker.exists()


def test_shards_decompress_into_a_cache_verified_and_a_corrupt_one_is_named(corpus_copy):
    shards = corpus_copy["shards"]
    manifest = write_manifest(corpus_copy["tmp"] / "mix.yaml", shards)
    before = _listing(shards)
    index = json.loads((shards / "code" / "index.json").read_text())
    victim = shards / "code" / index["shards"][1]["zip_data"]["basename"]
    original = victim.read_bytes()
    damaged = bytearray(original)
    damaged[100] ^= 0xFF
    victim.write_bytes(bytes(damaged))
    dataset = _dataset(manifest)
    with pytest.raises(UserError, match=rf"shard {victim} of source 'code' is corrupt or unreadable "
                                        rf"\(ValueError: Checksum failure"):
        for _ in dataset:
            pass
    victim.write_bytes(original)  # the original restored: a fresh dataset reads everything
    dataset = _dataset(manifest)
    count = sum(1 for _ in dataset)
    assert count == sum(meta["chunks"] for meta in corpus_copy["meta"].values())
    after = _listing(shards)
    after[str(victim.relative_to(shards))] = before[str(victim.relative_to(shards))]
    assert after == before  # nothing decompressed into (or written to) the prepared folders
    # Each dataset decompresses into its own folder (job and dataset ordinal): the second read every shard.
    caches = Path(corpus_copy["tmp"]).glob("modernbert-shard-cache-*/code-*/*-*")
    newest = max(caches, key=lambda folder: int(folder.name.rsplit("-", 1)[1]))
    assert len(list(newest.glob("*.mds"))) == len(index["shards"])


def test_token_range_is_checked_from_meta_or_by_scanning(corpus_copy):
    from streaming import MDSWriter

    shards = corpus_copy["shards"]
    vocab = corpus_copy["meta"]["code"]["vocab_size"]
    (shards / "prose" / "prep_meta.json").unlink()  # a source prepared elsewhere: no metadata
    manifest = load_manifest(write_manifest(corpus_copy["tmp"] / "mix.yaml", shards))
    check_token_ranges(manifest, vocab)  # its ids fit: accepted
    assert scan_token_range(shards / "prose") < vocab
    foreign = shards / "prose"
    for path in foreign.iterdir():
        path.unlink()
    columns = {"input_ids": "ndarray:uint16", "doc_id": "int64", "chunk_index": "int32", "source": "str"}
    with MDSWriter(out=str(foreign), columns=columns, compression="zstd", size_limit=1 << 10) as writer:
        for i in range(200):
            ids = np.array([1, 5, 6, 7, 2], dtype=np.uint16)
            if i % 10 == 3:  # ids of a bigger vocabulary, in every shard
                ids[2] = vocab + 17
            writer.write({"input_ids": ids, "doc_id": i, "chunk_index": 0, "source": "prose"})
    assert len(json.loads((foreign / "index.json").read_text())["shards"]) > 4
    with pytest.raises(UserError, match=rf"source 'prose': shards in {foreign} hold token id {vocab + 17}, outside "
                                        rf"the tokenizer's {vocab} ids"):
        check_token_ranges(manifest, vocab)
    meta_says_more = dict(corpus_copy["meta"]["code"], vocab_size=vocab + 100)
    (shards / "code" / "prep_meta.json").write_text(json.dumps(meta_says_more))
    with pytest.raises(UserError, match=r"source 'code': .*prep_meta.json says vocab_size"):
        check_token_ranges(load_manifest(write_manifest(corpus_copy["tmp"] / "m2.yaml", shards)), vocab)


def test_training_set_up_refuses_a_foreign_tokenizers_source(corpus_copy):
    from streaming import MDSWriter

    from modernbert_train.train.recipe import load_recipe
    from modernbert_train.train.builders import read_data_facts

    shards = corpus_copy["shards"]
    foreign = shards / "prose"
    for path in foreign.iterdir():
        path.unlink()
    with MDSWriter(out=str(foreign), columns={"input_ids": "ndarray:uint32"}) as writer:
        writer.write({"input_ids": np.array([1, 60000, 2], dtype=np.uint32)})
    manifest_path = write_manifest(corpus_copy["tmp"] / "mix.yaml", shards)
    recipe = load_recipe(REPO / "yamls/tiny/phase1.yaml", [f"data.manifest={manifest_path}",
                                                          f"data.tokenizer={corpus_copy['tokenizer']}"])
    with pytest.raises(UserError, match=r"data.manifest: source 'prose': shards in .* hold token id 60000"):
        read_data_facts(load_manifest(manifest_path), recipe)


def test_an_id_the_scan_missed_is_refused_by_the_loader_by_name(corpus_copy):
    from streaming import MDSWriter

    shards = corpus_copy["shards"]
    vocab = corpus_copy["meta"]["code"]["vocab_size"]
    foreign = shards / "prose"
    shutil.rmtree(foreign)
    with MDSWriter(out=str(foreign), columns={"input_ids": "ndarray:uint16"}, size_limit=1 << 10) as writer:
        for i in range(1000):
            writer.write({"input_ids": np.array([1, vocab + 5 if i == 500 else 9, 2], dtype=np.uint16)})
    manifest = write_manifest(corpus_copy["tmp"] / "mix.yaml", shards)
    check_token_ranges(load_manifest(manifest), vocab)  # a single outlier can escape a sampled scan ...
    with pytest.raises(UserError, match=rf"shard {foreign}/shard\.\d+\.mds of source 'prose': sample \d+ holds "
                                        rf"token id {vocab + 5}, outside the tokenizer's {vocab} ids"):
        for _ in _dataset(manifest):  # ... but not the loader
            pass

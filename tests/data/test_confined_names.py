"""Issue 24, finding 4 and the shard cache: names read from index.json are confined to their folder (one
helper, `confined_path`), and a shard cache folder is deleted only when it holds nothing but what its index
lists. Each attack below deleted or overwrote a file outside the cache before."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from .conftest import write_manifest
from modernbert_train.common.errors import UserError
from modernbert_train.data import build_streaming_dataset, load_manifest
from modernbert_train.data.shards import iter_samples


@pytest.mark.parametrize("name", ["../victim", "/etc/passwd", "part-00000/../../x", "a//b", "./a", "", "a\\..\\b",
                                  None, 7])
def test_a_name_that_is_not_a_plain_relative_name_is_one_error_naming_file_and_name(tmp_path, name):
    from modernbert_train.data.shards import confined_path

    with pytest.raises(UserError) as err:
        confined_path(tmp_path, name, tmp_path / "index.json")
    assert str(err.value).startswith(f"{tmp_path / 'index.json'}: {name!r} is not a plain file name inside")


def test_plain_names_join_as_before(tmp_path):
    from modernbert_train.data.shards import confined_path

    assert confined_path(tmp_path, "shard.00000.mds", "x") == tmp_path / "shard.00000.mds"
    joined = confined_path(tmp_path, "part-00003/shard.00001.mds.zstd", "x")
    assert joined == tmp_path / "part-00003" / "shard.00001.mds.zstd"


def test_a_crafted_name_with_a_bad_hash_deletes_nothing_outside_the_cache(corpus_copy):
    """index.json lists '../../victim.mds.zstd' with a wrong hash: streaming copied the file there and, on the
    checksum failure, our clean-up unlinked that path, a file outside the cache. Now the index is refused
    before any file is read, copied or deleted."""
    shards, tmp = corpus_copy["shards"], corpus_copy["tmp"]
    index_file = shards / "code" / "index.json"
    index = json.loads(index_file.read_text())
    index["shards"][0]["zip_data"]["basename"] = "../../victim.mds.zstd"
    index["shards"][0]["raw_data"]["basename"] = "../../victim.mds"
    index_file.write_text(json.dumps(index))
    cache_root = tmp / f"modernbert-shard-cache-{__import__('os').getuid()}"
    cache_root.mkdir()
    victims = [cache_root / "victim.mds.zstd", cache_root / "victim.mds", shards / "victim.mds.zstd"]
    for victim in victims:
        victim.write_text("keep me")
    manifest = write_manifest(tmp / "mix.yaml", shards)
    with pytest.raises(UserError, match=rf"{index_file}: '../../victim.mds' is not a plain file name"):
        dataset = build_streaming_dataset(load_manifest(manifest), batch_size=4, shuffle=False, seed=0)
        for _ in dataset:
            pass
    with pytest.raises(UserError, match=r"'../../victim.mds' is not a plain file name"):
        next(iter_samples(shards / "code"))  # stats and the token-range scan read the same way
    assert all(victim.read_text() == "keep me" for victim in victims)


def test_names_of_a_remote_sources_index_are_checked_before_any_download(tmp_path):
    """streaming fetches a remote source's index.json itself: the built dataset's names are checked."""
    from modernbert_train.data.shards import check_stream_shard_names

    info = SimpleNamespace(basename="../../.bashrc")
    stream = SimpleNamespace(local=str(tmp_path / "cache"), split=None, remote="s3://bucket/web")
    dataset = SimpleNamespace(shards=[SimpleNamespace(file_pairs=[(None, info)])], streams=[stream],
                              stream_per_shard=[0])
    with pytest.raises(UserError, match=r"s3://bucket/web/index.json: '../../.bashrc' is not a plain file name"):
        check_stream_shard_names(dataset)


def test_a_shard_cache_folder_is_removed_only_when_it_holds_nothing_else(tmp_path, caplog):
    from modernbert_train.data.shards import remove_shard_cache

    cache = tmp_path / "code-1234" / "pid-999999-0"
    (cache / "part-00000").mkdir(parents=True)
    (cache / "index.json").write_text(json.dumps({"shards": [
        {"raw_data": {"basename": "part-00000/shard.00000.mds"},
         "zip_data": {"basename": "part-00000/shard.00000.mds.zstd"}}]}))
    (cache / "part-00000" / "shard.00000.mds").write_bytes(b"x")
    (cache / "part-00000" / "shard.00000.mds.zstd.tmp").write_bytes(b"x")  # streaming's half-done download
    (cache / "thesis.tex").write_text("mine")  # MODERNBERT_SHARD_CACHE pointed somewhere a user keeps work
    with caplog.at_level(logging.WARNING, logger="modernbert_train"):
        assert remove_shard_cache(cache) is False
    assert (cache / "thesis.tex").read_text() == "mine" and "holds thesis.tex, which its index.json" in caplog.text
    (cache / "thesis.tex").unlink()
    assert remove_shard_cache(cache) is True and not cache.exists()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "code-1234")
    assert remove_shard_cache(link) is False and (tmp_path / "code-1234").is_dir()

"""Manifest validation, masking and packing on their own (no streaming)."""
from __future__ import annotations

import numpy as np
import pytest

from .conftest import write_manifest
from modernbert_train.data import (BestFitPacker, Masker, MaskingConfig, Piece, assemble, document_key,
                                   load_manifest, parse_manifest, split_sample)
from modernbert_train.data.dataset import clean_stale_streaming_shm
from modernbert_train.data.packing import pieces_count
from modernbert_train.common.errors import UserError


# --- manifest -------------------------------------------------------------------------------------------
def test_manifest_loads_sources_and_weights(prepared_corpus, tmp_path):
    shards = prepared_corpus["root"] / "shards"
    path = write_manifest(tmp_path / "m.yaml", shards, {"code": {"proportion": 0.5, "target_tokens": 1.2e9},
                                                         "prose": {"proportion": 0.25},
                                                         "docstrings": {"proportion": 0.25}})
    manifest = load_manifest(path)
    assert manifest.name == "test-mix" and manifest.source_names() == ["code", "prose", "docstrings"]
    assert manifest.sources[0].stream_weight_kwargs() == {"proportion": 0.5}
    assert manifest.sources[0].target_tokens == 1.2e9 and manifest.sources[0].remote is None


@pytest.mark.parametrize("weights,message", [
    ({"code": {"proportoin": 0.5}}, "did you mean: proportion"),
    ({"code": {"proportion": -1}, "prose": {"proportion": 1}, "docstrings": {"proportion": 1}}, "must be > 0"),
    ({"code": {"proportion": 0.5, "repeat": 2}}, "at most one of"),
    ({"code": {"proportion": 0.5}}, "every source needs one"),
    ({"code": {"remote": "ftp://x"}}, "object-store URL"),
])
def test_manifest_errors_name_the_problem(prepared_corpus, tmp_path, weights, message):
    path = write_manifest(tmp_path / "m.yaml", prepared_corpus["root"] / "shards", weights)
    with pytest.raises(UserError, match=message) as err:
        load_manifest(path)
    assert str(path) in str(err.value)


def test_manifest_missing_folder_names_source_and_path(tmp_path):
    path = write_manifest(tmp_path / "m.yaml", tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"source 'code': local folder .*nowhere/code does not exist"):
        load_manifest(path)
    (tmp_path / "bad.yaml").write_text("name: x\nsources: [\n")
    with pytest.raises(UserError, match="bad.yaml line"):
        load_manifest(tmp_path / "bad.yaml")


def test_token_shares_become_sample_proportions(tmp_path):
    import json

    from modernbert_train.data.manifest import sampling_manifest, training_tokens_per_sample

    # 8192-token chunks at 1024: 8 contiguous windows (the tokens stay), or 9 framed pieces (each after the
    # first gains a [CLS] and a [SEP]).
    full = {"tokens": 10 * 8192, "chunks": 10, "max_seq_len": 8192, "length_histograms": {"chunk_tokens": {"8192": 10}}}
    assert training_tokens_per_sample(full, 1024, "m") == 8192
    assert training_tokens_per_sample(full, 1024, "m", "framed") == 8192 + 2 * 8
    assert training_tokens_per_sample(full, 8192, "m", "framed") == 8192
    no_histogram = training_tokens_per_sample({"tokens": 10 * 8192, "chunks": 10}, 1024, "m", "framed")
    assert no_histogram == pytest.approx(8192 + 2 * 7.03, abs=0.1)
    with pytest.raises(UserError, match="m: needs numeric 'tokens' and 'chunks'"):
        training_tokens_per_sample({"chunks": 3}, 1024, "m")
    short = {"tokens": 1000 * 100, "chunks": 1000, "max_seq_len": 8192}
    for name, meta in (("long", full), ("short", short)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "index.json").write_text("{}")
        (tmp_path / name / "prep_meta.json").write_text(json.dumps(meta))
    raw = {"name": "m", "sources": [{"name": "long", "local": str(tmp_path / "long"), "proportion": 1},
                                    {"name": "short", "local": str(tmp_path / "short"), "proportion": 3}]}
    for resplit, long_tokens in (("contiguous", 8192), ("framed", 8208)):
        converted, shares = sampling_manifest(parse_manifest(raw), 1024, resplit)
        assert shares == {"long": 0.25, "short": 0.75}
        long_, short_ = (s.proportion for s in converted.sources)
        # Sample weights x tokens per sample give the token shares back.
        assert long_ * long_tokens / (long_ * long_tokens + short_ * 100) == pytest.approx(0.25)
    (tmp_path / "short" / "prep_meta.json").unlink()
    with pytest.raises(UserError, match="source 'short' has no .*prep_meta.json; its proportion is a share of "):
        sampling_manifest(parse_manifest(raw), 1024)
    raw["sources"] = [{**s, "proportion": None, "repeat": 2} for s in raw["sources"]]
    assert sampling_manifest(parse_manifest(raw), 1024)[1] is None  # absolute weights stay in samples


# --- masking --------------------------------------------------------------------------------------------
SPECIAL = {0, 1, 2, 3, 4}


def _masker(**kwargs) -> Masker:
    return Masker(MaskingConfig(**kwargs), mask_id=4, vocab_size=3000, special_ids=SPECIAL)


def _documents(count=400, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 600, count)
    docs = [np.concatenate([[1], rng.integers(5, 3000, n - 2), [2]]) for n in lengths]
    return np.concatenate(docs), lengths, np.array([document_key(7, 0, i, 0) for i in range(count)], dtype=np.uint64)


def test_mask_rate_split_and_specials():
    tokens, lengths, keys = _documents()
    tokens[::50] = 3  # some [PAD] and [UNK] inside: never masked either
    tokens[7::50] = 0
    masked, labels = _masker().mask(tokens, keys, lengths)
    selected = labels != -100
    special = np.isin(tokens, list(SPECIAL))
    assert not (selected & special).any()
    assert (labels[selected] == tokens[selected]).all() and (masked[~selected] == tokens[~selected]).all()
    rate = selected.sum() / (~special).sum()
    assert abs(rate - 0.3) < 0.01
    replaced = masked[selected]
    mask_share = (replaced == 4).mean()
    keep_share = (replaced == tokens[selected]).mean()
    assert abs(mask_share - 0.8) < 0.01 and abs(keep_share - 0.1) < 0.01
    assert not np.isin(replaced[(replaced != 4) & (replaced != tokens[selected])], list(SPECIAL)).any()


def test_mask_is_a_pure_function_of_document_key_not_of_packing():
    tokens, lengths, keys = _documents(50)
    masker = _masker()
    together, _ = masker.mask(tokens, keys, lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    # The same documents masked alone, in reverse order, give the same result per document.
    for i in reversed(range(50)):
        alone, _ = masker.mask(tokens[starts[i]:starts[i + 1]], keys[i:i + 1], lengths[i:i + 1])
        np.testing.assert_array_equal(alone, together[starts[i]:starts[i + 1]])
    other_epoch = np.array([document_key(7, 1, i, 0) for i in range(50)], dtype=np.uint64)
    assert not np.array_equal(masker.mask(tokens, other_epoch, lengths)[0], together)
    assert _masker(mlm_probability=0.15).mask(tokens, keys, lengths)[1].__ne__(-100).mean() < 0.2


def test_masking_config_is_validated():
    with pytest.raises(UserError, match="must be <= 1"):
        _masker(mask_token_fraction=0.9, random_token_fraction=0.2)
    with pytest.raises(UserError, match="outside the tokenizer's vocabulary"):
        _masker().mask(np.array([1, 5000, 2]), np.array([1], dtype=np.uint64), np.array([3]))


# --- packing --------------------------------------------------------------------------------------------
def test_split_sample_keeps_every_token_and_wraps_pieces():
    for n in (3, 10, 128, 129, 130, 256, 257, 1000, 1024):
        tokens = np.concatenate([[1], np.arange(10, 10 + n - 2), [2]]).astype(np.uint16)
        pieces = split_sample(tokens, 128, 1, 2, "framed")
        assert all(len(p) <= 128 and p[0] == 1 and p[-1] == 2 for p in pieces)
        np.testing.assert_array_equal(np.concatenate([p[1:-1] for p in pieces]), tokens[1:-1])
        assert min(len(p) for p in pieces) >= min(n, 64)  # no stub pieces
        assert len(pieces) == pieces_count(n, 128, "framed")


def test_contiguous_split_cuts_a_chunk_into_full_windows():
    for n in (3, 10, 128, 129, 130, 256, 257, 512, 1000, 1024, 8192):
        tokens = np.concatenate([[1], np.arange(10, 10 + n - 2), [2]]).astype(np.uint16)
        pieces = split_sample(tokens, 128, 1, 2)
        np.testing.assert_array_equal(np.concatenate(pieces), tokens)  # the chunk itself, in order
        assert all(len(p) <= 128 for p in pieces) and len(pieces) == pieces_count(n, 128) == -(-n // 128)
        assert min(len(p) for p in pieces) >= min(n, 64)  # no stub pieces
        if n % 128 == 0:
            assert {len(p) for p in pieces} == {128}  # a full chunk: full windows, none short
    assert len(split_sample(np.ones(512, np.uint16) * 7, 128, 1, 2, "framed")) == 5  # what framing cost
    bare = np.arange(10, 300).astype(np.uint16)  # no [CLS] / [SEP]: added, as for a framed split
    pieces = split_sample(bare, 128, 1, 2)
    assert pieces[0][0] == 1 and pieces[-1][-1] == 2 and sum(map(len, pieces)) == 292


def test_best_fit_packer_fills_budgets_and_keeps_documents_whole():
    rng = np.random.default_rng(1)
    packer = BestFitPacker(2048, max_wait=40)
    lengths = iter(np.minimum(rng.lognormal(5.0, 1.0, 20000).astype(int) + 3, 512))
    used, seen, added = [], [], 0
    for _ in range(400):
        while packer.buffered_tokens < 8 * 2048:  # the loader's top-up
            packer.add(Piece(tokens=np.full(next(lengths), 7, dtype=np.uint16), sample_id=added, piece_index=0,
                             epoch=0, key=added))
            added += 1
        pieces = packer.pack()
        ids, cu, piece_lengths = assemble(pieces, 2048, pad_id=3)
        assert cu[0] == 0 and cu[-1] == 2048 and (np.diff(cu) > 0).all()
        assert (ids[piece_lengths.sum():] == 3).all() and (ids[:piece_lengths.sum()] == 7).all()
        used.append(piece_lengths.sum())
        seen += [p.sample_id for p in pieces]
    assert np.mean(used) / 2048 >= 0.99
    assert len(seen) == len(set(seen))
    waits = [packer.budgets_packed - ref[4] for ref in packer.references()]
    assert max(waits) <= 40 + 2


def test_best_fit_packer_mixes_the_pieces_of_a_sample_with_other_samples():
    """A long sample re-splits into equal full-length pieces that arrive together; a budget must not take them
    together (issue 27: rows of one step from 2 documents instead of 8 trained a worse encoder)."""
    from modernbert_train.data import document_key

    packer = BestFitPacker(4 * 128, max_wait=40)
    distinct, next_sample = [], 0
    for _ in range(50):
        while packer.buffered_tokens < 24 * 128:  # the loader's top-up: ~6 samples of 4 pieces each
            for piece_index in range(4):
                packer.add(Piece(tokens=np.full(128, 7, dtype=np.uint16), sample_id=next_sample,
                                 piece_index=piece_index, epoch=0, key=document_key(0, 0, next_sample, piece_index)))
            next_sample += 1
        pieces = packer.pack()
        assert len(pieces) == 4
        distinct.append(len({p.sample_id for p in pieces}))
    # Arrival order gave 1 sample per budget; 4 draws among 6 samples of 4 pieces give ~3.2 on average.
    assert np.mean(distinct) >= 2.8, distinct


@pytest.mark.parametrize("policy", ["draw_then_fit", "best_fit"])
def test_short_pieces_leave_a_large_buffer_at_their_share(policy):
    """Two sources read half and half by tokens: one in full-length pieces, one in short ones. With a 512-row
    buffer, drawing from the whole buffer emits each at its share from the first budgets on; taking the largest
    piece first (best_fit, before 2026-12-03) kept the short ones waiting for max_wait (issue 27)."""
    rng = np.random.default_rng(0)
    budget, target = 4 * 128, 512 * 128
    packer = BestFitPacker(budget, max_wait=2 * target // budget, policy=policy)
    emitted, used, added = np.zeros(2), [], 0
    for _ in range(200):
        while packer.buffered_tokens < target:
            source = added % 2
            lengths = [128] * 4 if source == 0 else list(rng.integers(20, 100, size=8))
            lengths = lengths if source == 0 else lengths[:int(np.searchsorted(np.cumsum(lengths), 512)) + 1]
            for n in lengths:
                packer.add(Piece(tokens=np.full(int(n), 7, dtype=np.uint16), sample_id=source, piece_index=0,
                                 epoch=0, key=added))
            added += 1
        pieces = packer.pack()
        used.append(sum(p.length for p in pieces))
        for piece in pieces:
            emitted[piece.sample_id] += piece.length
    short_share = emitted[1] / emitted.sum()
    if policy == "draw_then_fit":
        assert 0.45 < short_share < 0.55, short_share
        assert np.mean(used) / budget >= 0.98
    else:
        assert short_share < 0.4, short_share


def test_stale_shm_cleaner_removes_only_unmapped_streaming_files(tmp_path):
    from multiprocessing import shared_memory

    live = shared_memory.SharedMemory(create=True, size=16, name="999990_barrier")
    stale = tmp_path / "999991_barrier"
    stale.write_bytes(b"x")
    other = tmp_path / "999992_not_streaming"
    other.write_bytes(b"x")
    try:
        removed = clean_stale_streaming_shm(tmp_path)
        assert removed == ["999991_barrier"] and other.exists()
        assert "999990_barrier" not in clean_stale_streaming_shm()
    finally:
        live.close()
        live.unlink()


# --- prefetch -------------------------------------------------------------------------------------------
def test_prefetchers_of_two_ranks_stop_after_the_same_productions():
    """Each production holds a collective (a two-party barrier here, the loader's all-reduce in training): when
    one rank closes right after its last step and the other a while later, both threads must finish the same
    productions, or one waits in the collective for a peer that stopped (a hang, then an abort at exit)."""
    import threading
    import time

    from modernbert_train.data.prefetch import StepPrefetcher

    collective = threading.Barrier(2, timeout=5)
    produced = {"early": 0, "late": 0}

    def producer(name):
        def produce():
            collective.wait()  # raises BrokenBarrierError if the peer never comes
            produced[name] += 1
            return produced[name], None
        return produce

    prefetchers = {name: StepPrefetcher(producer(name), depth=2) for name in produced}
    for step in range(1, 6):  # the ranks take their steps in lock-step, as in training
        assert [prefetcher.get()[0] for prefetcher in prefetchers.values()] == [step, step]
    prefetchers["early"].close(timeout=10)
    time.sleep(0.5)  # the late rank's thread has long started its next production
    prefetchers["late"].close(timeout=10)
    assert not collective.broken
    assert produced == {"early": 5 + 2 + 1, "late": 5 + 2 + 1}
    assert not any(p._thread.is_alive() for p in prefetchers.values())

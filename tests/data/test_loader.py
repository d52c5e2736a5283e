"""The training loader on real prepared shards (three sources): contract 4, fill, document boundaries,
masking statistics, mixture proportions, batch-size warmup, epochs, eval pass, state round trip."""
from __future__ import annotations

import math
import pickle
import time

import numpy as np
import pytest

from .conftest import write_manifest
from modernbert_train.data import MLMLoaderConfig, build_eval_loader, build_mlm_loader, split_sample
from modernbert_train.data.packing import pieces_count
from modernbert_train.common.errors import UserError

SPECIALS = {0, 1, 2, 3, 4}  # [UNK] [CLS] [SEP] [PAD] [MASK] of the test tokenizer
MASK_ID, PAD_ID, CLS_ID, SEP_ID = 4, 3, 1, 2


def _config(corpus, manifest, **overrides) -> MLMLoaderConfig:
    values = dict(manifest=str(manifest), tokenizer=corpus["tokenizer"], max_seq_len=256, micro_batch_size=8,
                  global_batch_size=16, return_provenance=True)
    values.update(overrides)
    return MLMLoaderConfig(**values)


def _original_tokens(mb) -> np.ndarray:
    labels = mb["labels"].numpy()
    return np.where(labels != -100, labels, mb["input_ids"].numpy())


@pytest.fixture
def mixed(corpus_copy):
    manifest = write_manifest(corpus_copy["tmp"] / "mix.yaml", corpus_copy["shards"],
                              {"code": {"proportion": 0.5}, "prose": {"proportion": 0.2},
                               "docstrings": {"proportion": 0.3}})
    return corpus_copy, manifest


def test_micro_batches_follow_contract_and_hold_whole_pieces(mixed):
    corpus, manifest = mixed
    loader = build_mlm_loader(_config(corpus, manifest))
    budget = 8 * 256
    assert loader.tokens_per_micro_batch == budget and loader.vocab_size == 3000
    assert loader.special_token_ids.mask_id == MASK_ID
    real = capacity = 0
    for _, step in zip(range(40), loader):
        assert len(step["micro_batches"]) == 2  # 16 rows / (1 rank x 8 rows)
        for mb in step["micro_batches"]:
            ids, cu, labels = mb["input_ids"], mb["cu_seqlens"], mb["labels"]
            assert ids.dtype.is_floating_point is False and ids.shape == (budget,) and str(ids.dtype) == "torch.int64"
            assert labels.shape == (budget,) and str(labels.dtype) == "torch.int64"
            assert str(cu.dtype) == "torch.int32" and cu[0] == 0 and cu[-1] == budget
            lengths = np.diff(cu.numpy())
            assert (lengths > 0).all() and mb["max_seqlen"] == lengths.max() <= 256
            used = mb["num_tokens"]
            assert mb["num_docs"] == len(mb["sample_ids"])
            # Padding only at the tail, cut into segments of at most max_seq_len.
            assert int(cu[mb["num_docs"]]) == used
            assert len(lengths) == mb["num_docs"] + -(-(budget - used) // 256)
            assert (ids[used:] == PAD_ID).all() and (labels[used:] == -100).all()
            assert mb["num_masked"] == int((labels != -100).sum())
            # Each segment is exactly one piece of one sample, re-read from the shards: a contiguous window of
            # its [CLS] ... [SEP] chunk (the first opens with the [CLS], the last closes with the [SEP]).
            original = _original_tokens(mb)
            for doc, (sample_id, piece) in enumerate(zip(mb["sample_ids"], mb["piece_indices"])):
                segment = original[cu[doc]:cu[doc + 1]]
                raw = np.asarray(loader.dataset[int(sample_id)]["input_ids"])
                pieces = split_sample(raw, 256, CLS_ID, SEP_ID)
                np.testing.assert_array_equal(segment, pieces[int(piece)])
                assert (segment[0] == CLS_ID) == (int(piece) == 0)
                assert (segment[-1] == SEP_ID) == (int(piece) == len(pieces) - 1)
                assert not np.isin(segment[1:-1], [CLS_ID, SEP_ID]).any()
            real += used
            capacity += budget
    assert real / capacity >= 0.99, f"fill {real / capacity:.4f}"


@pytest.mark.parametrize("resplit", ["contiguous", "framed"])
def test_long_chunks_are_resplit_without_losing_tokens(corpus_copy, resplit):
    manifest = write_manifest(corpus_copy["tmp"] / "code.yaml", corpus_copy["shards"])
    # A small lookahead, so that the pieces of one chunk are all packed within the 30 steps read here.
    loader = build_mlm_loader(_config(corpus_copy, manifest, max_seq_len=128, shuffle=False, resplit=resplit,
                                      packing_lookahead_tokens=32 * 128))
    pieces: dict[int, dict[int, np.ndarray]] = {}
    for _, step in zip(range(30), loader):
        for mb in step["micro_batches"]:
            original, cu = _original_tokens(mb), mb["cu_seqlens"].numpy()
            for doc, (sample_id, piece) in enumerate(zip(mb["sample_ids"], mb["piece_indices"])):
                pieces.setdefault(int(sample_id), {})[int(piece)] = original[cu[doc]:cu[doc + 1]]
    complete = 0
    for sample_id, parts in pieces.items():
        raw = np.asarray(loader.dataset[sample_id]["input_ids"])
        if len(raw) <= 128 or len(parts) < pieces_count(len(raw), 128, resplit):
            continue
        if resplit == "contiguous":
            np.testing.assert_array_equal(np.concatenate([parts[i] for i in sorted(parts)]), raw)
        else:
            np.testing.assert_array_equal(np.concatenate([parts[i][1:-1] for i in sorted(parts)]), raw[1:-1])
        assert all(len(p) <= 128 for p in parts.values())
        complete += 1
    assert complete >= 5, "expected several long samples seen in full"


def test_masking_statistics_and_specials_on_loader_output(mixed):
    corpus, manifest = mixed
    loader = build_mlm_loader(_config(corpus, manifest, global_batch_size=32))
    counts = {"maskable": 0, "selected": 0, "mask": 0, "random": 0, "keep": 0}
    for _, step in zip(range(60), loader):
        for mb in step["micro_batches"]:
            used = mb["num_tokens"]
            ids, labels = mb["input_ids"].numpy()[:used], mb["labels"].numpy()[:used]
            original = _original_tokens(mb)[:used]
            special = np.isin(original, list(SPECIALS))
            selected = labels != -100
            assert not (selected & special).any(), "a special token was masked"
            assert (ids[~selected] == original[~selected]).all()
            counts["maskable"] += int((~special).sum())
            counts["selected"] += int(selected.sum())
            replaced = ids[selected]
            counts["mask"] += int((replaced == MASK_ID).sum())
            counts["keep"] += int((replaced == original[selected]).sum())
            randoms = (replaced != MASK_ID) & (replaced != original[selected])
            counts["random"] += int(randoms.sum())
            assert not np.isin(replaced[randoms], list(SPECIALS)).any()
            assert (replaced < 3000).all()
    rate = counts["selected"] / counts["maskable"]
    n = counts["maskable"]
    assert abs(rate - 0.3) < 5 * math.sqrt(0.21 / n) + 1e-3, f"masked rate {rate:.4f} over {n} tokens"
    selected = counts["selected"]
    # A random replacement equal to the original counts as "keep": expected 0.1 + 0.1/2995.
    for kind, expected in (("mask", 0.8), ("random", 0.1), ("keep", 0.1)):
        share = counts[kind] / selected
        assert abs(share - expected) < 5 * math.sqrt(expected * (1 - expected) / selected) + 1e-3, (kind, share)


def test_mixture_proportions_are_shares_of_training_tokens(corpus_copy, caplog):
    """Long code chunks (re-split into up to 5 pieces at 256) against short docstrings: per-sample weights
    would give code about 10x its share of tokens."""
    import logging

    manifest = corpus_copy["tmp"] / "two.yaml"
    manifest.write_text(f"name: two\nsources:\n"
                        f"  - {{name: code, local: {corpus_copy['shards'] / 'code'}, proportion: 0.3}}\n"
                        f"  - {{name: docstrings, local: {corpus_copy['shards'] / 'docstrings'}, proportion: 0.7}}\n")
    meta = corpus_copy["meta"]
    tokens_per_sample = {name: meta[name]["tokens"] / meta[name]["chunks"] for name in ("code", "docstrings")}
    assert tokens_per_sample["code"] > 8 * tokens_per_sample["docstrings"]
    caplog.set_level(logging.INFO, logger="modernbert_train")
    loader = build_mlm_loader(_config(corpus_copy, manifest, global_batch_size=64, mixture_log_every=20))
    tokens, samples = np.zeros(2), np.zeros(2)
    for _, step in zip(range(60), loader):
        for mb in step["micro_batches"]:
            lengths = np.diff(mb["cu_seqlens"].numpy())[:mb["num_docs"]]
            tokens += np.bincount(mb["source_ids"], weights=lengths, minlength=2)
            samples += np.bincount(mb["source_ids"][mb["piece_indices"] == 0], minlength=2)
    assert samples.sum() > 3000 and samples[0] > 100, samples
    for index, expected in enumerate((0.3, 0.7)):
        assert abs(tokens[index] / tokens.sum() - expected) < 0.02, (index, tokens / tokens.sum())
    # The loader's own tally, as logged.
    assert loader.realized_token_shares() == pytest.approx(dict(zip(("code", "docstrings"), tokens / tokens.sum())))
    logged = [r.getMessage() for r in caplog.records if "realized token shares" in r.getMessage()]
    assert len(logged) == 3 and "after 60 steps" in logged[-1] and "(manifest 30.0%)" in logged[-1]


def test_batch_size_warmup_grows_with_real_tokens(mixed):
    corpus, manifest = mixed
    loader = build_mlm_loader(_config(corpus, manifest, global_batch_size=32, batch_size_warmup_start=8,
                                      batch_size_warmup_tokens=40_000))
    counts, seen, partial = [], 0, 0
    for _, step in zip(range(25), loader):
        assert step["tokens_seen_before"] == seen == loader.tokens_seen
        expected_rows = loader.warmup.sequences(seen)
        rows = [mb["num_rows"] for mb in step["micro_batches"]]
        # Rows move in steps of 2 (a quarter micro-batch) during the warmup.
        wanted = 8 + 2 * math.floor(12 * min(1, seen / 40_000) + 0.5)
        assert sum(rows) == expected_rows == step["num_sequences"] == wanted
        # Whole micro-batches, then one smaller one for the remainder, its budget cut to its rows.
        assert all(r == 8 for r in rows[:-1]) and 1 <= rows[-1] <= 8
        for mb in step["micro_batches"]:
            assert mb["input_ids"].shape == (mb["num_rows"] * 256,) and mb["max_seqlen"] <= 256
            assert int(mb["cu_seqlens"][-1]) == mb["num_rows"] * 256
        assert step["num_tokens"] > 0.95 * expected_rows * 256  # still packed full
        partial += rows[-1] < 8
        assert step["num_tokens"] == sum(mb["num_tokens"] for mb in step["micro_batches"])
        counts.append(expected_rows)
        seen += step["num_tokens"]
    assert counts[0] == 8 and counts[-1] == 32 and counts == sorted(counts) and len(set(counts)) > 8
    assert partial >= 5
    assert loader.warmup.sequences(0) == 8 and loader.warmup.sequences(20_000) == 20
    assert loader.warmup.sequences(40_000) == 32


def test_epochs_roll_over_and_change_the_masks(corpus_copy):
    manifest = write_manifest(corpus_copy["tmp"] / "small.yaml", corpus_copy["shards"],
                              {"code": {"choose": 4}, "prose": {"choose": 4}, "docstrings": {"choose": 16}})
    loader = build_mlm_loader(_config(corpus_copy, manifest, shuffle=False))
    masks: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    for _, step in zip(range(80), loader):
        for mb in step["micro_batches"]:
            cu, labels = mb["cu_seqlens"].numpy(), mb["labels"].numpy()
            for doc, (sid, piece, epoch) in enumerate(zip(mb["sample_ids"], mb["piece_indices"], mb["epochs"])):
                masks.setdefault((int(sid), int(piece)), {})[int(epoch)] = labels[cu[doc]:cu[doc + 1]] != -100
    assert loader.epoch >= 3
    repeated = [m for m in masks.values() if len(m) >= 2]
    assert len(repeated) >= 10
    differing = sum(not np.array_equal(m[min(m)], m[max(m)]) for m in repeated)
    assert differing >= 0.9 * len(repeated)


def test_state_round_trip_in_process_continues_identically(mixed):
    corpus, manifest = mixed
    config = _config(corpus, manifest, global_batch_size=32, batch_size_warmup_start=8, batch_size_warmup_tokens=20_000)
    loader = build_mlm_loader(config)
    for _ in range(7):
        next(loader)
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    assert len(pickle.dumps(state)) < 64_000
    expected = [next(loader) for _ in range(6)]
    loader.load_state_dict(state)
    for want in expected:
        got = next(loader)
        assert len(got["micro_batches"]) == len(want["micro_batches"])
        for a, b in zip(got["micro_batches"], want["micro_batches"]):
            for key in ("input_ids", "cu_seqlens", "labels"):
                assert a[key].equal(b[key])


def test_prefetch_thread_gives_the_same_steps_and_states(mixed, tmp_path):
    """Steps prepared ahead on the background thread are byte-identical to steps prepared when asked for, and
    the state after a step taken is the synchronous loader's, though the thread has already read further."""
    import shutil

    corpus, manifest = mixed
    shutil.copytree(corpus["shards"], tmp_path / "shards2")  # streaming: one live dataset per folder
    other = write_manifest(tmp_path / "mix2.yaml", tmp_path / "shards2", {
        "code": {"proportion": 0.5}, "prose": {"proportion": 0.2}, "docstrings": {"proportion": 0.3}})
    warm = dict(global_batch_size=32, batch_size_warmup_start=8, batch_size_warmup_tokens=20_000)
    sync = build_mlm_loader(_config(corpus, manifest, prefetch_steps=0, **warm))
    ahead = build_mlm_loader(_config(corpus, other, prefetch_steps=2, **warm))
    try:
        for index in range(10):
            want, got = next(sync), next(ahead)
            assert got["num_sequences"] == want["num_sequences"] and got["epoch"] == want["epoch"]
            for a, b in zip(got["micro_batches"], want["micro_batches"], strict=True):
                for key in ("input_ids", "cu_seqlens", "labels"):
                    assert a[key].equal(b[key]), (index, key)
            assert ahead.tokens_seen == sync.tokens_seen
            if index == 6:
                deadline = time.monotonic() + 30
                while ahead.steps < 9 and time.monotonic() < deadline:  # the thread runs two steps ahead
                    time.sleep(0.05)
                # Two queued, and possibly a third packed and waiting for a free slot.
                assert ahead.steps in (9, 10)
                assert pickle.dumps(ahead.state_dict()) == pickle.dumps(sync.state_dict())
                assert ahead.realized_token_shares() == sync.realized_token_shares()
    finally:
        ahead.close()


def test_load_state_rejects_a_changed_setup(mixed):
    corpus, manifest = mixed
    loader = build_mlm_loader(_config(corpus, manifest))
    next(loader)
    state = loader.state_dict()
    state["config"]["max_seq_len"] = 512
    with pytest.raises(UserError, match="max_seq_len"):
        loader.load_state_dict(state)
    with pytest.raises(UserError, match="not a"):
        loader.load_state_dict({"epoch": 0})


def test_eval_loader_is_one_fixed_pass(corpus_copy):
    manifest = write_manifest(corpus_copy["tmp"] / "eval.yaml", corpus_copy["shards"],
                              {"code": {"choose": 5}, "prose": {"choose": 5}, "docstrings": {"choose": 20}})
    loader = build_eval_loader(_config(corpus_copy, manifest))
    first = list(loader)
    second = list(loader)
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        assert a["input_ids"].equal(b["input_ids"]) and a["labels"].equal(b["labels"])
    seen = {(int(s), int(p)) for mb in first for s, p in zip(mb["sample_ids"], mb["piece_indices"])}
    assert len({s for s, _ in seen}) == 30  # every chosen sample once
    assert len(seen) == sum(mb["num_docs"] for mb in first)  # no piece twice


def test_bad_config_and_mismatched_tokenizer_are_user_errors(mixed, tmp_path):
    corpus, manifest = mixed
    with pytest.raises(UserError, match=r"global_batch_size 2 is smaller than the number of ranks \(4\)"):
        _config(corpus, manifest, global_batch_size=2).validate(4)
    with pytest.raises(UserError, match="global_batch_size must be a positive integer"):
        build_mlm_loader(_config(corpus, manifest, global_batch_size=0))
    with pytest.raises(UserError, match="did you mean: micro_batch_size"):
        MLMLoaderConfig.from_dict({"manifest": "m.yaml", "tokenizer": "t.json", "micro_batch_sise": 4})
    other = tmp_path / "other.json"
    other.write_text(open(corpus["tokenizer"]).read().replace('"[MASK]"', '"[MASK2]"', 1))
    with pytest.raises(UserError):
        build_mlm_loader(_config(corpus, manifest, tokenizer=str(other)))


def test_a_checkpoint_from_before_contiguous_resplits_resumes_framed(mixed):
    """A loader state without "resplit" came from a run that framed every piece: the resumed loader re-splits as
    that run did, with that run's sample weights, and gives its next steps exactly; a state that names another
    mode than the config's is refused."""
    corpus, manifest = mixed
    framed = build_mlm_loader(_config(corpus, manifest, max_seq_len=128, resplit="framed"))
    steps = iter(framed)
    for _ in range(3):
        next(steps)
    state = framed.state_dict()
    expected = [next(steps) for _ in range(3)]
    old_state = {k: v for k, v in state.items() if k != "resplit"}
    resumed = build_mlm_loader(_config(corpus, manifest, max_seq_len=128))
    assert [s.choose for s in resumed.dataset.streams] != [s.choose for s in framed.dataset.streams]
    resumed.load_state_dict(old_state)
    assert resumed.resplit == "framed"
    assert [s.choose for s in resumed.dataset.streams] == [s.choose for s in framed.dataset.streams]
    for want, got in zip(expected, iter(resumed)):
        for a, b in zip(want["micro_batches"], got["micro_batches"]):
            assert a["input_ids"].equal(b["input_ids"]) and a["labels"].equal(b["labels"])
    with pytest.raises(UserError, match="resplit was 'framed' in the checkpoint and is 'contiguous'"):
        build_mlm_loader(_config(corpus, manifest, max_seq_len=128)).load_state_dict(state)


def _shared_in_step(loader, steps: int) -> float:
    """Share of the pieces whose sample (chunk) gave another piece to the same step."""
    shared = total = 0
    for item, _ in zip(loader, range(steps)):
        ids = [int(s) for mb in item["micro_batches"] for s in mb["sample_ids"]]
        shared += sum(ids.count(s) > 1 for s in ids)
        total += len(ids)
    return shared / total


def test_pieces_of_one_chunk_land_in_different_steps(mixed):
    """A 1,024-token chunk re-split to 128 gives 8 pieces that reach the packer together; with the default lookahead
    they spread over many steps of 8 rows instead of filling one or two (a worse encoder at equal tokens,
    bench/RESULTS.md, issue 27). The old 64-row floor is the baseline."""
    corpus, manifest = mixed
    small = dict(max_seq_len=128, micro_batch_size=4, global_batch_size=8)
    default = build_mlm_loader(_config(corpus, manifest, **small))
    old = build_mlm_loader(_config(corpus, manifest, **small, packing_lookahead_tokens=64 * 128))
    spread, bunched = _shared_in_step(iter(default), 60), _shared_in_step(iter(old), 60)
    assert spread < 0.5 * bunched, (spread, bunched)


def test_a_checkpoint_from_before_the_larger_lookahead_resumes_with_its_own(mixed):
    """A loader state without "lookahead_tokens" and "packing" was saved with the 64-row floor and best-fit
    packing: a loader left to the defaults takes both and gives the saved run's next steps exactly; an explicit
    other lookahead is refused."""
    corpus, manifest = mixed
    small = dict(max_seq_len=128, micro_batch_size=4, global_batch_size=8)
    before = build_mlm_loader(_config(corpus, manifest, **small, packing_lookahead_tokens=64 * 128))
    before.packer.policy = "best_fit"
    steps = iter(before)
    for _ in range(3):
        next(steps)
    state = before.state_dict()
    assert state["lookahead_tokens"] == 64 * 128 and state["packing"] == "best_fit"
    expected = [next(steps) for _ in range(4)]
    old_state = {k: v for k, v in state.items() if k not in ("lookahead_tokens", "packing")}
    resumed = build_mlm_loader(_config(corpus, manifest, **small))
    assert resumed.state_dict()["lookahead_tokens"] == 512 * 128
    assert resumed.packer.policy == "draw_then_fit"
    resumed.load_state_dict(old_state)
    assert resumed.packer.policy == "best_fit"
    for want, got in zip(expected, iter(resumed)):
        for a, b in zip(want["micro_batches"], got["micro_batches"]):
            assert a["input_ids"].equal(b["input_ids"]) and a["labels"].equal(b["labels"])
    chosen = build_mlm_loader(_config(corpus, manifest, **small, packing_lookahead_tokens=64 * 128)).state_dict()
    with pytest.raises(UserError, match="packing_lookahead_tokens was 8192 in the checkpoint and is 4096 now"):
        build_mlm_loader(_config(corpus, manifest, **small, packing_lookahead_tokens=4096)).load_state_dict(chosen)

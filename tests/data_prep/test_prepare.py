"""`prepare` end to end on real files: lossless round trip, the shard contract, resume and refusal."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from .conftest import build_official_layout_tokenizer, decoded_documents, read_jsonl_texts, run_prepare
from data_prep.sources import expand_inputs
from data_prep.stats import iter_samples
from data_prep.tokenizer import load_tokenizer, tokenizer_sha256
from modernbert_train.common.errors import UserError

MAX_SEQ_LEN = 256  # small, so real stdlib modules and long pydoc topics are split into many chunks


def _code_files(local_corpus: Path) -> list[Path]:
    # prepare walks directories in sorted order, directory by directory.
    found = []
    for dirpath, dirnames, filenames in os.walk(local_corpus / "code"):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return found


@pytest.fixture(scope="module")
def prepared(local_corpus, trained_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    code = run_prepare([local_corpus / "code"], root / "code", trained_tokenizer_dir, format="code",
                       languages=("python",), max_seq_len=MAX_SEQ_LEN, unit_bytes=64_000, workers=2)
    prose = run_prepare([local_corpus / "prose"], root / "prose", trained_tokenizer_dir, max_seq_len=MAX_SEQ_LEN,
                        unit_bytes=64_000)
    return root, code, prose


def test_round_trip_reproduces_every_real_document(prepared, local_corpus, trained_tokenizer_dir):
    root, code_summary, prose_summary = prepared
    tok = load_tokenizer(trained_tokenizer_dir)
    all_code = [p.read_bytes().decode("utf-8") for p in _code_files(local_corpus)]
    code_texts = [t for t in all_code if t.strip()]  # empty __init__.py files are skipped as "empty"
    assert len(code_texts) > 20 and len(all_code) > len(code_texts)
    assert decoded_documents(root / "code", tok) == code_texts
    prose = local_corpus / "prose"
    prose_texts = read_jsonl_texts(prose / "docstrings.jsonl") + read_jsonl_texts(prose / "pydoc_topics.jsonl")
    assert decoded_documents(root / "prose", tok) == prose_texts
    assert code_summary["skipped"] == {"empty": len(all_code) - len(code_texts)}
    assert prose_summary["skipped"] == {}
    for summary, texts in ((code_summary, code_texts), (prose_summary, prose_texts)):
        assert summary["written"] + summary["chunked"] == len(texts) == summary["documents"]
        assert summary["read"] == len(texts) + sum(summary["skipped"].values())
        assert summary["chunked"] > 10  # long documents were split, not truncated


def test_shards_follow_the_contract(prepared, trained_tokenizer_dir):
    root, code_summary, _ = prepared
    folder = root / "code"
    index = json.loads((folder / "index.json").read_text())
    assert {s["compression"] for s in index["shards"]} == {"zstd"}
    assert {tuple(s["column_encodings"]) for s in index["shards"]} == {("int32", "int64", "ndarray:uint16", "str")}
    assert index["shards"][0]["column_names"] == ["chunk_index", "doc_id", "input_ids", "source"]
    meta = json.loads((folder / "prep_meta.json").read_text())
    assert meta["tokenizer_sha256"] == tokenizer_sha256(trained_tokenizer_dir)
    assert (meta["vocab_size"], meta["max_seq_len"], meta["source"]) == (3000, MAX_SEQ_LEN, "code")
    assert meta["special_token_ids"] == {"cls_id": 1, "sep_id": 2, "pad_id": 3, "mask_id": 4, "unk_id": 0}

    doc_ids, chunks, tokens, per_doc = set(), 0, 0, {}
    for sample in iter_samples(folder):
        ids = sample["input_ids"]
        assert ids.dtype == np.uint16 and 3 <= ids.size <= MAX_SEQ_LEN
        assert ids[0] == 1 and ids[-1] == 2 and not np.isin(ids[1:-1], [1, 2, 3, 4]).any()
        assert sample["source"] == "code"
        doc = int(sample["doc_id"])
        per_doc.setdefault(doc, []).append((int(sample["chunk_index"]), ids.size))
        doc_ids.add(doc)
        chunks += 1
        tokens += ids.size
    assert (meta["documents"], meta["chunks"], meta["tokens"]) == (len(doc_ids), chunks, tokens)
    assert meta["content_tokens"] == tokens - 2 * chunks
    for parts in per_doc.values():
        assert [k for k, _ in parts] == list(range(len(parts)))
        assert all(size == MAX_SEQ_LEN for _, size in parts[:-1])  # only a document's last chunk is short
    assert code_summary["units"] > 2 and len(index["shards"]) >= code_summary["units"]


def test_streaming_dataset_reads_the_output(prepared, tmp_path, monkeypatch):
    from streaming import StreamingDataset

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    root = prepared[0]
    expected = [(int(s["doc_id"]), int(s["chunk_index"]), s["input_ids"].tolist()) for s in iter_samples(root / "prose")]
    dataset = StreamingDataset(local=str(root / "prose"), batch_size=1, shuffle=False)
    assert len(dataset) == len(expected)
    for i in (0, len(expected) // 2, len(expected) - 1):
        sample = dataset[i]
        assert (int(sample["doc_id"]), int(sample["chunk_index"]), sample["input_ids"].tolist()) == expected[i]


def test_worker_count_does_not_change_the_output(prepared, local_corpus, trained_tokenizer_dir, tmp_path):
    root = prepared[0]
    run_prepare([local_corpus / "code"], tmp_path / "code", trained_tokenizer_dir, format="code",
                languages=("python",), max_seq_len=MAX_SEQ_LEN, unit_bytes=64_000, workers=1)

    def content(folder):
        return [(int(s["doc_id"]), int(s["chunk_index"]), s["input_ids"].tobytes()) for s in iter_samples(folder)]

    assert content(tmp_path / "code") == content(root / "code")


def test_resume_keeps_finished_parts_and_redoes_changed_inputs(local_corpus, trained_tokenizer_dir, tmp_path):
    tok = load_tokenizer(trained_tokenizer_dir)
    data = tmp_path / "data"
    data.mkdir()
    texts = read_jsonl_texts(local_corpus / "prose" / "pydoc_topics.jsonl")[:30]
    for i in range(3):
        (data / f"part{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i::3]))
    out = tmp_path / "out"
    first = run_prepare([data], out, trained_tokenizer_dir, unit_bytes=1 << 20)
    assert first["this_run"]["units_done"] == 3
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("part-*/shard.*")}

    again = run_prepare([data], out, trained_tokenizer_dir, unit_bytes=1 << 20)
    assert again["this_run"]["units_done"] == 0 and again["read"] == first["read"]

    (data / "part1.jsonl").write_text(json.dumps({"text": "a changed file"}) + "\n")
    third = run_prepare([data], out, trained_tokenizer_dir, unit_bytes=1 << 20)
    assert (third["this_run"]["units_done"], third["this_run"]["units_kept"]) == (1, 2)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if "part-00001" not in str(p))
    assert decoded_documents(out, tok) == texts[0::3] + ["a changed file"] + texts[2::3]
    assert third["read"] == len(texts[0::3]) + 1 + len(texts[2::3])


def test_interrupted_unit_leaves_no_partial_output(local_corpus, trained_tokenizer_dir, tmp_path):
    """A crash mid-unit leaves only a .tmp folder; the next run removes it and redoes the unit."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)))
    out = tmp_path / "out"
    run_prepare([data], out, trained_tokenizer_dir)
    (out / "part-00000").rename(out / ".tmp-part-00000")  # as a killed worker would leave it
    (out / "index.json").unlink()
    summary = run_prepare([data], out, trained_tokenizer_dir)
    assert summary["this_run"]["units_done"] == 1 and summary["written"] == 50
    assert not (out / ".tmp-part-00000").exists()


def test_changed_settings_are_refused_unless_overwrite(local_corpus, trained_tokenizer_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    run_prepare([data], out, trained_tokenizer_dir, max_seq_len=64)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(UserError, match=r"prepared with different settings \(max_seq_len: 64 now 128\); "
                                        r"pass --overwrite"):
        run_prepare([data], out, trained_tokenizer_dir, max_seq_len=128)
    assert sorted(p.name for p in out.rglob("*")) == before
    summary = run_prepare([data], out, trained_tokenizer_dir, max_seq_len=128, overwrite=True)
    assert summary["written"] == 5
    assert json.loads((out / "prep_meta.json").read_text())["max_seq_len"] == 128


def test_foreign_output_folder_is_refused(trained_tokenizer_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "x"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"holds files prepare did not write \(notes.txt\)"):
            run_prepare([data], out, trained_tokenizer_dir, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "mine"


def test_official_modernbert_layout_tokenizer_works(tmp_path, local_corpus):
    tok_path = build_official_layout_tokenizer(tmp_path / "tok" / "tokenizer.json")
    texts = read_jsonl_texts(local_corpus / "prose" / "pydoc_topics.jsonl")[:5]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run_prepare([data], tmp_path / "out", tok_path, max_seq_len=512)
    samples = list(iter_samples(tmp_path / "out"))
    assert all(s["input_ids"].dtype == np.uint16 for s in samples)
    assert {int(s["input_ids"][0]) for s in samples} == {50281} and {int(s["input_ids"][-1]) for s in samples} == {50282}
    assert decoded_documents(tmp_path / "out", load_tokenizer(tok_path)) == texts


def test_vocab_over_65536_uses_uint32(tmp_path):
    tok_path = build_official_layout_tokenizer(tmp_path / "tok" / "tokenizer.json", total_vocab=70000)
    data = tmp_path / "docs.txt"
    data.write_text("plain text file, one document\n")
    run_prepare([data], tmp_path / "out", tok_path)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert "ndarray:uint32" in index["shards"][0]["column_encodings"]
    (sample,) = iter_samples(tmp_path / "out")
    assert sample["input_ids"].dtype == np.uint32 and sample["input_ids"][0] == 50281
    assert load_tokenizer(tok_path).decode(sample["input_ids"][1:-1].tolist()) == "plain text file, one document\n"


def test_special_token_strings_in_text_stay_text(trained_tokenizer_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    text = "fill the [MASK] then [SEP] and [CLS] and [PAD]"
    data.write_text(json.dumps({"text": text}) + "\n")
    run_prepare([data], tmp_path / "out", trained_tokenizer_dir)
    (sample,) = iter_samples(tmp_path / "out")
    assert not np.isin(sample["input_ids"][1:-1], [0, 1, 2, 3, 4]).any()
    assert decoded_documents(tmp_path / "out", load_tokenizer(trained_tokenizer_dir)) == [text]


def test_bad_settings_are_refused(trained_tokenizer_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UserError, match="--max-seq-len 2 leaves no room"):
        run_prepare([data], tmp_path / "out", trained_tokenizer_dir, max_seq_len=2)
    with pytest.raises(UserError, match="--on-error must be skip or fail, not 'ignore'"):
        run_prepare([data], tmp_path / "out", trained_tokenizer_dir, on_error="ignore")
    with pytest.raises(UserError, match="tokenizer file .*missing.json does not exist"):
        run_prepare([data], tmp_path / "out", tmp_path / "missing.json")


@pytest.mark.slow
def test_round_trip_over_the_whole_standard_library(trained_tokenizer_dir, tmp_path):
    """Every stdlib module the corpus takes (not tests, not those reserved for evaluation) and every pydoc
    topic, in parallel workers, at the default 8192 length."""
    from data_prep.local_corpus import build_local_corpus, stdlib_python_files

    corpus = tmp_path / "corpus"
    info = build_local_corpus(corpus)
    assert info["code"]["files"] == len(stdlib_python_files(reserved=False)) > 400
    tok = load_tokenizer(trained_tokenizer_dir)
    code = run_prepare([corpus / "code"], tmp_path / "code", trained_tokenizer_dir, format="code", workers=2)
    prose = run_prepare([corpus / "prose"], tmp_path / "prose", trained_tokenizer_dir, workers=2)
    all_code = [p.read_bytes().decode("utf-8") for p in _code_files(corpus)]
    assert decoded_documents(tmp_path / "code", tok) == [t for t in all_code if t.strip()]
    assert code["skipped"] == {"empty": sum(1 for t in all_code if not t.strip())}
    prose_texts = []
    for path in map(Path, expand_inputs([corpus / "prose"])):  # prepare's input order
        prose_texts += read_jsonl_texts(path) if path.suffix == ".jsonl" else [path.read_text(encoding="utf-8")]
    assert decoded_documents(tmp_path / "prose", tok) == prose_texts
    assert prose["skipped"] == {} and code["chunked"] > 0

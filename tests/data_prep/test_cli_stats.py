"""`modernbert-data` commands end to end, `stats`, the local corpus and the mixture manifests in yamls/data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_prepare
from data_prep.cli import COMMANDS, main
from data_prep.local_corpus import build_local_corpus, stdlib_dir
from data_prep.stats import Histogram, folder_stats, format_stats, iter_samples
from modernbert_train.common.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_cli_pipeline_from_corpus_to_stats(tmp_path, capsys):
    corpus, tok, shards = tmp_path / "corpus", tmp_path / "tok", tmp_path / "shards"
    assert main(["build-local-corpus", "--out", str(corpus), "--max-mb", "0.15"]) == 0
    assert main(["train-tokenizer", str(corpus), "--out", str(tok), "--vocab-size", "600", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "vocab 600" in out and "transformers loads it and agrees" in out
    assert main(["prepare", str(corpus / "code"), "--format", "code", "--language", "python", "--tokenizer",
                 str(tok), "--out", str(shards / "code"), "--max-seq-len", "128", "--workers", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((shards / "code" / "prep_summary.json").read_text())
    assert f"read {summary['read']:,} = written {summary['written']:,} + chunked {summary['chunked']:,}" in out
    assert main(["stats", str(shards / "code"), "--scan"]) == 0
    out = capsys.readouterr().out
    meta = json.loads((shards / "code" / "prep_meta.json").read_text())
    assert f"{meta['documents']:>12,} {meta['chunks']:>12,} {meta['tokens']:>16,}" in out
    assert "scan of the shards matches prep_meta.json" in out


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "ok"}\n{"text": \n')
    code = main(["prepare", str(data), "--tokenizer", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "none.json does not exist" in err
    with pytest.raises(SystemExit):
        main(["prepaer"])
    assert "unknown command 'prepaer' (did you mean: prepare?)" in capsys.readouterr().err


def test_cli_prepare_failure_names_the_line(tmp_path, trained_tokenizer_dir, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "ok"}\n{"text": \n')
    code = main(["prepare", str(data), "--tokenizer", str(trained_tokenizer_dir), "--out", str(tmp_path / "o"),
                 "--no-progress"])
    assert code == 2
    assert f"error: {data}:2: malformed_json: not valid JSON" in capsys.readouterr().err
    assert main(["prepare", str(data), "--tokenizer", str(trained_tokenizer_dir), "--out", str(tmp_path / "o"),
                 "--no-progress", "--on-error", "skip"]) == 0
    assert "skipped 1 (malformed_json 1)" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"modernbert-data {command}" in out


def test_stats_scan_agrees_with_meta_and_histograms_add_up(local_corpus, trained_tokenizer_dir, tmp_path):
    run_prepare([local_corpus / "prose"], tmp_path / "prose", trained_tokenizer_dir, max_seq_len=200)
    stats = folder_stats(tmp_path / "prose", scan=True)
    assert stats["scan_matches_meta"] is True
    assert Histogram(stats["length_histograms"]["chunk_tokens"]).total() == stats["chunks"]
    assert Histogram(stats["length_histograms"]["document_tokens"]).total() == stats["documents"]
    assert max(int(b) for b in stats["length_histograms"]["chunk_tokens"]) == 256  # 200 rounds up to 256
    meta = json.loads((tmp_path / "prose" / "prep_meta.json").read_text())
    assert meta["length_histograms"] == stats["scan"]["length_histograms"]
    text = format_stats([stats])
    assert "prose: chunk length (tokens incl. [CLS]/[SEP], max 200)" in text


def test_stats_reads_a_manifest_and_reports_unfinished_folders(local_corpus, trained_tokenizer_dir, tmp_path,
                                                                capsys):
    run_prepare([local_corpus / "prose" / "pydoc_topics.jsonl"], tmp_path / "a", trained_tokenizer_dir, source="a")
    run_prepare([local_corpus / "prose" / "docstrings.jsonl"], tmp_path / "b", trained_tokenizer_dir, source="b")
    manifest = tmp_path / "mix.yaml"
    manifest.write_text(f"name: mix\nsources:\n  - name: a\n    local: {tmp_path / 'a'}\n    proportion: 0.5\n"
                        f"  - name: b\n    local: {tmp_path / 'b'}\n    proportion: 0.5\n")
    assert main(["stats", str(manifest), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert [s["source"] for s in stats] == ["a", "b"]
    assert [s["documents"] for s in stats] == [sum(1 for _ in open(local_corpus / "prose" / f))
                                              for f in ("pydoc_topics.jsonl", "docstrings.jsonl")]
    (tmp_path / "a" / "index.json").unlink()
    with pytest.raises(UserError, match=r"a has no index.json \(prepare did not finish: re-run it to resume\)"):
        folder_stats(tmp_path / "a")


def test_histogram_bins_are_powers_of_two():
    hist = Histogram()
    for length in (1, 16, 17, 32, 33, 8192, 8193):
        hist.add(length)
    assert hist.to_json() == {"16": 2, "32": 2, "64": 1, "8192": 1, "16384": 1}


def test_local_corpus_is_real_stdlib_code_and_prose(local_corpus):
    info = json.loads((local_corpus / "corpus_info.json").read_text())
    code_files = sorted((local_corpus / "code").rglob("*.py"))
    assert len(code_files) == info["code"]["files"] > 20
    assert sum(f.stat().st_size for f in code_files) == info["code"]["bytes"] <= 300_000
    for f in code_files:
        rel = f.relative_to(local_corpus / "code")
        assert not {"test", "tests", "site-packages", "idle_test"} & set(rel.parts)
        assert f.read_bytes() == (stdlib_dir() / rel).read_bytes()
    topics = [json.loads(line) for line in (local_corpus / "prose" / "pydoc_topics.jsonl").open()]
    from pydoc_data.topics import topics as reference

    assert all(reference[t["id"].split("/", 1)[1]] == t["text"] for t in topics) and len(topics) > 10
    docstrings = [json.loads(line) for line in (local_corpus / "prose" / "docstrings.jsonl").open()]
    assert len(docstrings) > 5 and all(d["text"].strip() for d in docstrings)
    prose_bytes = sum(p.stat().st_size for p in (local_corpus / "prose").rglob("*") if p.is_file())
    assert prose_bytes <= 300_000


def test_local_corpus_refuses_to_overwrite(tmp_path):
    build_local_corpus(tmp_path, max_bytes=20_000)
    with pytest.raises(UserError, match="already holds code, prose, corpus_info.json; pass --overwrite"):
        build_local_corpus(tmp_path, max_bytes=20_000)
    info = build_local_corpus(tmp_path, max_bytes=30_000, overwrite=True)
    assert info["code"]["bytes"] <= 30_000 and info["max_bytes_per_kind"] == 30_000


def test_mixture_manifests_in_yamls_data():
    from modernbert_train.data.manifest import load_manifest

    demo = load_manifest(REPO / "yamls" / "data" / "demo.yaml", check_local=False)
    assert demo.name == "demo" and [s.name for s in demo.sources] == ["code", "prose"]
    assert [s.local for s in demo.sources] == ["demo_out/shards/code", "demo_out/shards/prose"]
    assert sum(s.proportion for s in demo.sources) == pytest.approx(1.0)
    big = load_manifest(REPO / "yamls" / "data" / "modernbert_2t.yaml")  # remote sources: no local check
    assert [s.name for s in big.sources] == ["web", "code", "scientific", "retrieval"]
    assert sum(s.target_tokens for s in big.sources) == pytest.approx(2e12)
    assert sum(s.proportion for s in big.sources) == pytest.approx(1.0)
    for s in big.sources:
        assert s.remote.startswith("s3://") and s.proportion == pytest.approx(s.target_tokens / 2e12)
    text = (REPO / "yamls" / "data" / "modernbert_2t.yaml").read_text()
    assert "OUR PLANNING TARGETS" in text and "2412.13663" in text


def test_iter_samples_reads_unpacked_shards_too(local_corpus, trained_tokenizer_dir, tmp_path):
    """StreamingDataset unpacks .zstd shards beside the originals; reading must still work after that."""
    import zstandard

    run_prepare([local_corpus / "prose" / "docstrings.jsonl"], tmp_path / "o", trained_tokenizer_dir)
    before = [s["input_ids"].tolist() for s in iter_samples(tmp_path / "o")]
    for zipped in (tmp_path / "o").rglob("*.mds.zstd"):
        zipped.with_suffix("").write_bytes(zstandard.ZstdDecompressor().decompress(zipped.read_bytes()))
        zipped.unlink()
    assert [s["input_ids"].tolist() for s in iter_samples(tmp_path / "o")] == before

"""Issue 17, the data side: no code runs from a shard, bookkeeping is atomic, corrupt shards are named, readers
have a memory bound, --out is never an input, and one prepare at a time writes an output folder."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import read_jsonl_texts, run_prepare
from data_prep.cli import main
from data_prep.stats import folder_stats, iter_samples
from modernbert_train.data.shards import SHARD_HASH
from modernbert_train.common.errors import UserError


class _Planted:
    """Unpickling this creates `path`: the stand-in for an attacker's command."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _planted_folder(folder: Path, marker: Path) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(folder), columns={"input_ids": "ndarray:uint16", "payload": "pkl"},
                   compression="zstd") as writer:
        writer.write({"input_ids": np.array([1, 7, 2], dtype=np.uint16), "payload": _Planted(marker)})
    meta = {"source": "planted", "documents": 1, "chunks": 1, "tokens": 3, "content_tokens": 1, "max_seq_len": 8,
            "vocab_size": 100, "length_histograms": {"chunk_tokens": {}, "document_tokens": {}}}
    (folder / "prep_meta.json").write_text(json.dumps(meta))


def test_stats_scan_refuses_a_pickle_column_and_runs_nothing(tmp_path, capsys):
    folder, marker = tmp_path / "shards", tmp_path / "PWNED"
    _planted_folder(folder, marker)
    assert main(["stats", str(folder), "--scan"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "payload (pkl)" in err and str(folder / "index.json") in err
    assert "--allow-unsafe-types" in err
    with pytest.raises(UserError, match="pickle"):
        list(iter_samples(folder))
    assert not marker.exists()
    # The payload is live: the explicit opt-in decodes it (so the refusal above is what kept it from running).
    assert main(["stats", str(folder), "--scan", "--allow-unsafe-types"]) in (0, 1)
    assert marker.exists()


def test_prepare_writes_shard_hashes_and_reading_names_a_corrupt_shard(local_corpus, trained_tokenizer_dir,
                                                                       tmp_path):
    out = tmp_path / "out"
    run_prepare([local_corpus / "prose" / "docstrings.jsonl"], out, trained_tokenizer_dir, shard_size_limit=1 << 16)
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) > 1
    assert all(SHARD_HASH in s["zip_data"]["hashes"] and SHARD_HASH in s["raw_data"]["hashes"]
               for s in index["shards"])
    assert folder_stats(out, scan=True)["scan_matches_meta"]
    victim = out / index["shards"][1]["zip_data"]["basename"]
    original = victim.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    victim.write_bytes(bytes(damaged))
    with pytest.raises(UserError, match=rf"shard {victim} is corrupt: its {SHARD_HASH} hash does not match"):
        folder_stats(out, scan=True)
    victim.write_bytes(original[:-10])
    with pytest.raises(UserError, match=rf"shard {victim} is corrupt: .* bytes, index.json says"):
        folder_stats(out, scan=True)
    victim.write_bytes(original)
    assert folder_stats(out, scan=True)["scan_matches_meta"]


# ------------------------------------------------------------------------------ atomic bookkeeping (finding 5)

def test_bookkeeping_is_renamed_into_place_with_index_json_last(local_corpus, trained_tokenizer_dir, tmp_path,
                                                                monkeypatch):
    import data_prep.prepare as prepare_module

    written = []
    real = prepare_module.write_json_atomic

    def recording(path, obj, indent=None):
        real(path, obj, indent)
        written.append(Path(path).name)

    monkeypatch.setattr(prepare_module, "write_json_atomic", recording)
    out = tmp_path / "out"
    run_prepare([local_corpus / "prose" / "docstrings.jsonl"], out, trained_tokenizer_dir)
    top = [name for name in written if name != "unit_summary.json"]
    assert top == ["plan.json", "prep_meta.json", "prep_summary.json", "index.json"]
    assert not list(out.rglob("*.tmp"))


def test_truncated_bookkeeping_is_named_or_recovered(local_corpus, trained_tokenizer_dir, tmp_path, capsys):
    inputs = [local_corpus / "prose" / "docstrings.jsonl"]
    out = tmp_path / "out"
    first = run_prepare(inputs, out, trained_tokenizer_dir)
    # A finished run's summary cut short: the next run rewrites it instead of failing on JSON.
    (out / "prep_summary.json").write_text('{"source": "ou')
    assert run_prepare(inputs, out, trained_tokenizer_dir)["chunks"] == first["chunks"]
    json.loads((out / "prep_summary.json").read_text())
    # A truncated plan.json: refused with its name, and --overwrite starts over instead of failing the same way.
    (out / "plan.json").write_text('{"settings": {"lay')
    with pytest.raises(UserError, match=rf"{out / 'plan.json'}: not valid JSON .*--overwrite"):
        run_prepare(inputs, out, trained_tokenizer_dir)
    assert run_prepare(inputs, out, trained_tokenizer_dir, overwrite=True)["chunks"] == first["chunks"]
    # A truncated unit summary: that part is redone, the rest kept.
    (out / "part-00000" / "unit_summary.json").write_text("{")
    again = run_prepare(inputs, out, trained_tokenizer_dir)
    assert again["this_run"]["units_done"] == 1 and again["chunks"] == first["chunks"]
    # stats names a corrupt prep_meta.json / index.json.
    (out / "prep_meta.json").write_text('{"sou')
    assert main(["stats", str(out)]) == 2
    assert f"{out / 'prep_meta.json'}: not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ memory bound (finding 8)

def test_a_200m_character_line_stays_within_a_memory_bound(local_corpus, tmp_path):
    """The reader's own allocations are traced (tracemalloc): unbounded, it held the 200 MB line (and more).
    Peak RSS of the same read in a fresh process, measured once: 45 MB bounded, 871 MB unbounded. prepare's
    accounting of too_large records (skip, or fail with file:line) is the next test's."""
    import tracemalloc

    from data_prep.sources import Document, read_jsonl

    texts = read_jsonl_texts(local_corpus / "prose" / "pydoc_topics.jsonl")[:2]
    bomb = tmp_path / "bomb.jsonl.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as fh:
        fh.write(json.dumps({"text": texts[0]}).encode() + b"\n" + b'{"text": "')
        piece = b"a" * (1 << 20)
        for _ in range(200_000_000 // len(piece)):
            fh.write(piece)
        fh.write(b'"}\n' + json.dumps({"text": texts[1]}).encode() + b"\n")
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        items = list(read_jsonl(str(bomb), "text", max_doc_bytes=16 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [type(i).__name__ for i in items] == ["Document", "Problem", "Document"]
    assert [i.text for i in items if isinstance(i, Document)] == texts
    assert peak < 40 << 20, f"reader peaked at {peak / 2**20:.0f} MB"
    assert items[1].describe() == f"{bomb}:2: too_large: line of 190.0 MB is over --max-doc-mb 16"
    assert items[2].line == 3  # the lines after it keep their numbers


def test_whole_files_over_the_bound_are_not_read(local_corpus, trained_tokenizer_dir, tmp_path):
    data = tmp_path / "docs"
    data.mkdir()
    (data / "small.txt").write_text("a short document\n")
    (data / "big.txt").write_text("word " * 300_000)  # 1.5 MB
    summary = run_prepare([data], tmp_path / "o", trained_tokenizer_dir, max_doc_mb=1, on_error="skip")
    assert summary["written"] == 1 and summary["skipped"] == {"too_large": 1}
    assert summary["problems"][0] == f"{data / 'big.txt'}: too_large: file of 1.4 MB is over --max-doc-mb 1"
    # The default policy fails with the file named, like any other bad record.
    with pytest.raises(UserError, match=rf"{data / 'big.txt'}: too_large: file of 1.4 MB .*--on-error skip"):
        run_prepare([data], tmp_path / "o2", trained_tokenizer_dir, max_doc_mb=1)


def test_a_dying_worker_is_named_with_its_file(local_corpus, trained_tokenizer_dir, tmp_path, monkeypatch):
    import data_prep.prepare as prepare_module

    data = tmp_path / "data"
    data.mkdir()
    texts = read_jsonl_texts(local_corpus / "prose" / "pydoc_topics.jsonl")[:4]
    for name in ("a.jsonl", "poison.jsonl", "c.jsonl"):
        (data / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    real = prepare_module.read_unit

    def killing(unit, *args):
        if "poison" in unit.files[0]:
            os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
        return real(unit, *args)

    monkeypatch.setattr(prepare_module, "read_unit", killing)  # workers are forked: they inherit it
    with pytest.raises(UserError, match=r"a prepare worker died .*work unit 2 \(\S*poison\.jsonl\)"):
        run_prepare([data], tmp_path / "o", trained_tokenizer_dir, workers=2)


# ---------------------------------------------------------------------------- --out inside an input (finding 9)

def test_out_inside_the_input_folder_is_never_read(local_corpus, trained_tokenizer_dir, tmp_path):
    data = tmp_path / "docs"
    data.mkdir()
    for i, text in enumerate(read_jsonl_texts(local_corpus / "prose" / "pydoc_topics.jsonl")[:6]):
        (data / f"doc{i}.txt").write_text(text)
    out = data / "shards"
    first = run_prepare([data], out, trained_tokenizer_dir, format="text")
    assert first["input_files"] == 6
    again = run_prepare([data], out, trained_tokenizer_dir, format="text")
    assert again["input_files"] == 6 and again["this_run"]["units_done"] == 0 and again["chunks"] == first["chunks"]
    plan = json.loads((out / "plan.json").read_text())
    assert not [f for f in plan["inputs"] if "shards" in f]
    with pytest.raises(UserError, match="inside the output folder"):
        run_prepare([out / "plan.json"], out, trained_tokenizer_dir, format="text")


# ----------------------------------------------------------------------------------------- lock (finding 10)

def test_a_second_prepare_on_the_same_out_is_refused_and_changes_nothing(local_corpus, trained_tokenizer_dir,
                                                                         tmp_path):
    from data_prep.bookkeeping import OutputLock

    inputs = [local_corpus / "prose" / "docstrings.jsonl"]
    out = tmp_path / "out"
    run_prepare(inputs, out, trained_tokenizer_dir)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".prepare.lock"}
    with OutputLock(out):  # this process is the first prepare, still running
        result = subprocess.run([sys.executable, "-m", "data_prep.cli", "prepare", str(inputs[0]), "--tokenizer",
                                 str(trained_tokenizer_dir), "--out", str(out), "--overwrite", "--no-progress"],
                                capture_output=True, text=True, timeout=120, env=os.environ)
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and f"--out {out} is being written by another prepare" in err
    assert f"pid {os.getpid()} on host" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".prepare.lock"} == before
    # Released: the next prepare proceeds.
    assert run_prepare(inputs, out, trained_tokenizer_dir)["this_run"]["note"] == "already complete"


def test_a_filesystem_without_flock_warns_and_prepares(local_corpus, trained_tokenizer_dir, tmp_path, monkeypatch,
                                                       capsys):
    import errno
    import fcntl

    def unsupported(fh, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    summary = run_prepare([local_corpus / "prose" / "docstrings.jsonl"], tmp_path / "out", trained_tokenizer_dir)
    assert summary["chunks"] > 0
    assert "warning: cannot lock" in capsys.readouterr().err

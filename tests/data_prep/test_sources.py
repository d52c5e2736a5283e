"""Input discovery, work-unit planning and the readers of each format."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from .conftest import read_jsonl_texts, run_prepare
from data_prep.sources import Document, Problem, WorkUnit, expand_inputs, plan_units, read_jsonl, read_unit
from modernbert_train.common.errors import UserError


def _records(local_corpus: Path, n: int) -> list[str]:
    texts = read_jsonl_texts(local_corpus / "prose" / "pydoc_topics.jsonl")
    return [texts[i % len(texts)] + f" #{i}" for i in range(n)]


def test_split_jsonl_ranges_read_every_line_exactly_once(local_corpus, tmp_path):
    texts = _records(local_corpus, 120)
    lines = [json.dumps({"text": t}) for t in texts]
    lines[77] = '{"text": broken'
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    size = path.stat().st_size
    units = plan_units([str(path)], "auto", unit_bytes=size // 7)
    assert len(units) == 8 and units[0].byte_start == 0 and units[-1].byte_end == size
    items = [item for unit in units for item in read_unit(unit)]
    assert [i.text for i in items if isinstance(i, Document)] == texts[:77] + texts[78:]
    (problem,) = [i for i in items if isinstance(i, Problem)]
    assert (problem.reason, problem.line) == ("malformed_json", 78)  # counted from the file start, not the range
    assert sum(i.consumed for i in items) == size


def test_range_boundary_exactly_at_a_line_start(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "aaaa"}\n{"text": "bbbb"}\n{"text": "cccc"}\n')
    line_len = len('{"text": "aaaa"}\n')
    first = list(read_jsonl(str(path), "text", 0, line_len))
    rest = list(read_jsonl(str(path), "text", line_len, None))
    assert [d.text for d in first] == ["aaaa"] and [d.text for d in rest] == ["bbbb", "cccc"]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_jsonl_is_one_unit_and_reads_all_records(suffix, local_corpus, tmp_path):
    texts = _records(local_corpus, 40)
    raw = "".join(json.dumps({"body": t, "meta": 1}) + "\n" for t in texts).encode()
    path = tmp_path / f"docs{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith("gz") else zstandard.ZstdCompressor().compress(raw))
    units = plan_units(expand_inputs([tmp_path]), "auto", unit_bytes=100)
    assert len(units) == 1 and units[0].byte_end is None
    items = list(read_unit(units[0], text_field="body"))
    assert [i.text for i in items] == texts
    assert sum(i.consumed for i in items) == path.stat().st_size  # progress counts compressed bytes


def test_parquet_row_groups_become_units_with_file_row_numbers(local_corpus, tmp_path):
    texts = _records(local_corpus, 30)
    texts[17] = None
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": texts, "n": list(range(30))}), path, row_group_size=10)
    units = plan_units([str(path)], "auto", unit_bytes=1)
    assert [u.row_groups for u in units] == [[0], [1], [2]]
    items = [item for unit in units for item in read_unit(unit, text_field="content")]
    assert [i.text for i in items if isinstance(i, Document)] == [t for t in texts if t is not None]
    (problem,) = [i for i in items if isinstance(i, Problem)]
    assert problem.describe() == f"{path}:18: missing_field: column 'content' is null, not a string"


def test_parquet_missing_column_counts_every_row(tmp_path, trained_tokenizer_dir):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"txt": ["a", "b", "c"]}), path)
    with pytest.raises(UserError, match=r"docs.parquet:1: missing_field: no column 'text' \(did you mean: txt\?\)"):
        run_prepare([path], tmp_path / "out", trained_tokenizer_dir)
    summary = run_prepare([path], tmp_path / "out", trained_tokenizer_dir, on_error="skip")
    assert (summary["read"], summary["skipped"]) == (3, {"missing_field": 3})


def test_code_directories_select_by_language_and_exclude(tmp_path):
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    for rel in ("pkg/a.py", "pkg/b.rs", "pkg/c.txt", "pkg/tests/t.py", ".git/hooks.py", "pkg/.hidden.py"):
        (tmp_path / rel).write_text("x = 1\n")
    assert expand_inputs([tmp_path], "code", languages=["python"]) == [str(tmp_path / "pkg/a.py"),
                                                                        str(tmp_path / "pkg/tests/t.py")]
    assert expand_inputs([tmp_path], "code", languages=["python", "rust"], exclude=["*/tests/*"]) == [
        str(tmp_path / "pkg/a.py"), str(tmp_path / "pkg/b.rs")]
    assert expand_inputs([tmp_path / "pkg"], "code", extensions=["txt"]) == [str(tmp_path / "pkg/c.txt")]
    # auto: code files by extension, plain text by suffix, one document each
    assert [Path(f).name for f in expand_inputs([tmp_path / "pkg"])] == ["a.py", "b.rs", "c.txt", "t.py"]


def test_input_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match=r"input pattern '.*\*.jsonl' matches no files"):
        expand_inputs([str(tmp_path / "*.jsonl")])
    with pytest.raises(UserError, match=r"input .*nothing.jsonl does not exist"):
        expand_inputs([tmp_path / "nothing.jsonl"])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"cannot tell the format of .*data.csv from its name; pass --format"):
        expand_inputs([tmp_path / "data.csv"])
    with pytest.raises(UserError, match=r"--language 'pyhton' is unknown \(did you mean: python\?\)"):
        expand_inputs([tmp_path], "code", languages=["pyhton"])
    with pytest.raises(UserError, match=r"--format 'jsonlines' is unknown \(did you mean: jsonl\?\)"):
        expand_inputs([tmp_path], "jsonlines")
    with pytest.raises(UserError, match=r"input directory .* holds no files ending in \.go"):
        expand_inputs([tmp_path], "code", languages=["go"])


def test_globs_and_duplicates(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    files = expand_inputs([str(tmp_path / "*.jsonl"), tmp_path / "a.jsonl", tmp_path])
    assert [Path(f).name for f in files] == ["a.jsonl", "b.jsonl", "c.txt"]


def test_text_and_code_files_group_into_units_of_the_budget(tmp_path):
    for i in range(10):
        (tmp_path / f"f{i}.txt").write_text("y" * 100)
    units = plan_units(expand_inputs([tmp_path]), "auto", unit_bytes=250)
    assert [len(u.files) for u in units] == [2, 2, 2, 2, 2]
    assert [u.size for u in units] == [200] * 5
    assert isinstance(units[0], WorkUnit) and units[0].identity[0][1] == 100

"""Every bad-input class: the message names file and line, the policy decides, earlier output stays intact."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .conftest import decoded_documents, read_jsonl_texts, run_prepare
from data_prep.local_corpus import stdlib_dir
from data_prep.tokenizer import load_tokenizer
from modernbert_train.common.errors import UserError



@dataclass
class BadCase:
    name: str
    reason: str
    line: int  # 0: the whole file
    message: str  # regex the message must contain after "file:line: reason: "
    policy: str | None  # the PrepareConfig field that decides; None = always skipped
    skipped: int  # records counted as skipped with `reason`
    fmt: str = "auto"


def _good_jsonl(folder: Path, local_corpus: Path) -> tuple[Path, list[str]]:
    texts = read_jsonl_texts(local_corpus / "prose" / "pydoc_topics.jsonl")[:3]
    path = folder / "a_good.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path, texts


def _good_code(folder: Path) -> tuple[Path, list[str]]:
    text = (stdlib_dir() / "textwrap.py").read_text(encoding="utf-8")
    path = folder / "a_good.py"
    path.write_text(text, encoding="utf-8")
    return path, [text]


def _jsonl_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _make_bad(case: BadCase, folder: Path) -> Path:
    ok = b'{"text": "a fine record"}'
    if case.name == "malformed_json":
        bad = folder / "b_bad.jsonl"
        _jsonl_lines(bad, [ok, ok, b'{"text": "cut off'])
    elif case.name == "invalid_utf8_jsonl":
        bad = folder / "b_bad.jsonl"
        _jsonl_lines(bad, [ok, b'{"text": "caf\xe9"}', ok])
    elif case.name == "lone_surrogate":
        bad = folder / "b_bad.jsonl"
        _jsonl_lines(bad, [ok, ok, ok, b'{"text": "x \\ud800 y"}'])
    elif case.name == "invalid_utf8_text":
        bad = folder / "b_bad.txt"
        bad.write_bytes(b"first line\nsecond line\nthird \xff\xfe line\n")
    elif case.name == "missing_field":
        bad = folder / "b_bad.jsonl"
        _jsonl_lines(bad, [b'{"txt": "a record with a misspelt key"}', ok])
    elif case.name == "not_a_string":
        bad = folder / "b_bad.jsonl"
        _jsonl_lines(bad, [ok, b'{"text": 42}'])
    elif case.name == "parquet_null":
        bad = folder / "b_bad.parquet"
        pq.write_table(pa.table({"text": ["fine", None, "fine too"]}), bad)
    elif case.name == "binary_in_code_dir":
        bad = folder / "b_bad.py"
        bad.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00 compiled, not source")
    elif case.name == "empty_documents":
        bad = folder / "b_bad.jsonl"
        _jsonl_lines(bad, [ok, b'{"text": "  \\n\\t "}', b"", ok])
    elif case.name == "empty_code_file":
        bad = folder / "b_bad.py"
        bad.write_bytes(b"\n\n   \n")
    elif case.name == "truncated_gzip":
        payload = gzip.compress(b"".join(ok + b"\n" for _ in range(2000)))
        bad = folder / "b_bad.jsonl.gz"
        bad.write_bytes(payload[: len(payload) // 2])
    elif case.name == "unreadable_link":
        bad = folder / "b_bad.py"
        os.symlink(folder / "vanished.py", bad)
    else:
        raise AssertionError(case.name)
    return bad


CASES = [
    BadCase("malformed_json", "malformed_json", 3, r"not valid JSON: Unterminated string", "on_error", 1),
    BadCase("invalid_utf8_jsonl", "invalid_utf8", 2, r"invalid UTF-8 at byte 13 of the line", "on_error", 1),
    BadCase("lone_surrogate", "invalid_utf8", 4, r"lone surrogate escape", "on_error", 1),
    BadCase("invalid_utf8_text", "invalid_utf8", 3, r"invalid UTF-8 at byte 29", "on_error", 1),
    BadCase("missing_field", "missing_field", 1, r"no field 'text' \(did you mean: txt\?\)", "on_error", 1),
    BadCase("not_a_string", "missing_field", 2, r"field 'text' is int, not a string", "on_error", 1),
    BadCase("parquet_null", "missing_field", 2, r"column 'text' is null, not a string", "on_error", 1),
    BadCase("binary_in_code_dir", "binary", 0, r"NUL byte at offset 7", "on_binary", 1, fmt="code"),
    BadCase("empty_documents", "empty", 2, r"field 'text' is empty or whitespace only", None, 2),
    BadCase("empty_code_file", "empty", 0, r"file is empty or whitespace only", None, 1, fmt="code"),
    BadCase("truncated_gzip", "unreadable", 0, r"cannot read past this line: EOFError", "on_error", 1),
    BadCase("unreadable_link", "unreadable", 0, r"cannot read: No such file or directory", "on_error", 1, fmt="code"),
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_reported_with_file_and_line_and_earlier_output_survives(
        case, tmp_path, local_corpus, trained_tokenizer_dir):
    tok = load_tokenizer(trained_tokenizer_dir)
    data = tmp_path / "data"
    data.mkdir()
    if case.fmt == "code":
        good, good_texts = _good_code(data)
        inputs = [data]
    else:
        good, good_texts = _good_jsonl(data, local_corpus)
        inputs = [good]
    # A unit budget of exactly the good file's size: each file becomes its own work unit (and part).
    unit_bytes = good.stat().st_size
    bad = _make_bad(case, data)
    if case.fmt != "code":
        inputs.append(bad)
    out = tmp_path / "out"
    where = f"{bad}:{case.line}" if case.line else f"{bad}"
    expected = rf"{where}: {case.reason}: .*{case.message}"
    if case.name == "truncated_gzip":
        expected = rf"{bad}:\d+: unreadable: .*{case.message}"

    kept_shards: dict[str, str] = {}
    if case.policy is not None:
        with pytest.raises(UserError, match=expected) as err:
            run_prepare(inputs, out, trained_tokenizer_dir, format=case.fmt, unit_bytes=unit_bytes,
                        **{case.policy: "fail"})
        flag = "--on-error" if case.policy == "on_error" else "--on-binary"
        assert f"pass {flag} skip" in str(err.value) and "re-run the same command to resume" in str(err.value)
        assert "1 of 2 work units are finished" in str(err.value)
        # The unit finished before the bad one is complete on disk; nothing half-written, no merged index.
        assert sorted(p.name for p in out.iterdir() if p.name != ".prepare.lock") == ["part-00000", "plan.json"]
        part = out / "part-00000"
        assert decoded_documents(part, tok) == good_texts
        kept_shards = {p.name: _sha(p) for p in part.glob("shard.*")}

    summary = run_prepare(inputs, out, trained_tokenizer_dir, format=case.fmt, unit_bytes=unit_bytes,
                          on_error="skip", on_binary="skip")
    assert summary["skipped"] == {case.reason: case.skipped}
    assert summary["read"] == summary["written"] + summary["chunked"] + case.skipped
    assert summary["files"][str(bad)]["skipped"] == {case.reason: case.skipped}
    assert any(re.search(expected, p) for p in summary["problems"]), summary["problems"]
    written_summary = json.loads((out / "prep_summary.json").read_text())
    assert written_summary["skipped"] == summary["skipped"] and written_summary["read"] == summary["read"]
    if kept_shards:
        assert summary["this_run"] == dict(summary["this_run"], units_done=1, units_kept=1)
        assert {p.name: _sha(p) for p in (out / "part-00000").glob("shard.*")} == kept_shards
    docs = decoded_documents(out, tok)
    assert docs[: len(good_texts)] == good_texts
    assert len(docs) == summary["documents"]


def test_skipped_records_do_not_shift_the_good_ones(tmp_path, trained_tokenizer_dir):
    tok = load_tokenizer(trained_tokenizer_dir)
    path = tmp_path / "mixed.jsonl"
    _jsonl_lines(path, [b'{"text": "one"}', b"{oops", b'{"text": "two"}', b"", b'{"text": "three"}'])
    summary = run_prepare([path], tmp_path / "out", trained_tokenizer_dir, on_error="skip")
    assert decoded_documents(tmp_path / "out", tok) == ["one", "two", "three"]
    assert (summary["read"], summary["written"], summary["skipped"]) == (5, 3, {"malformed_json": 1, "empty": 1})
    assert summary["problems"] == [f"{path}:2: malformed_json: not valid JSON: Expecting property name enclosed "
                                   f"in double quotes (column 2)", f"{path}:4: empty: blank line"]


def test_a_failing_worker_stops_the_pool_and_leaves_only_whole_parts(local_corpus, trained_tokenizer_dir, tmp_path):
    tok = load_tokenizer(trained_tokenizer_dir)
    data = tmp_path / "data"
    data.mkdir()
    texts = read_jsonl_texts(local_corpus / "prose" / "pydoc_topics.jsonl")
    for i in range(6):
        lines = [json.dumps({"text": t}).encode() for t in texts[i::6]]
        if i == 3:
            lines.insert(2, b'{"text": oops}')
        _jsonl_lines(data / f"f{i}.jsonl", lines)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=rf"{data / 'f3.jsonl'}:3: malformed_json: not valid JSON"):
        run_prepare([data], out, trained_tokenizer_dir, workers=2, unit_bytes=1 << 20)
    names = sorted(p.name for p in out.iterdir())
    assert "index.json" not in names and not [n for n in names if n.startswith(".tmp")]
    assert "part-00003" not in names
    for name in names:
        if name.startswith("part-"):
            i = int(name.split("-")[1])
            assert decoded_documents(out / name, tok) == texts[i::6]
    summary = run_prepare([data], out, trained_tokenizer_dir, workers=2, on_error="skip")
    assert summary["skipped"] == {"malformed_json": 1} and summary["documents"] == len(texts)
    assert summary["this_run"]["units_kept"] == len([n for n in names if n.startswith("part-")])

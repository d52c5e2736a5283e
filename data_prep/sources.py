"""Reading raw inputs: which files, in what format, split into work units, and one document at a time.

Readers never raise on bad data: they yield a `Problem` (reason, file, line, message) and the caller's
policy decides whether it is skipped-and-counted or fatal. That keeps the accounting honest: every record
a reader meets comes out as exactly one `Document` or one `Problem`.
"""
from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

from modernbert_train.common.errors import UserError, did_you_mean

FORMATS = ("auto", "jsonl", "parquet", "text", "code")

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".ndjson", ".ndjson.gz", ".ndjson.zst")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")

LANGUAGE_EXTENSIONS = {
    "python": (".py", ".pyi"),
    "javascript": (".js", ".mjs", ".cjs", ".jsx"),
    "typescript": (".ts", ".tsx"),
    "java": (".java",),
    "kotlin": (".kt", ".kts"),
    "scala": (".scala",),
    "c": (".c", ".h"),
    "cpp": (".cc", ".cpp", ".cxx", ".hpp", ".hh", ".hxx", ".h"),
    "csharp": (".cs",),
    "go": (".go",),
    "rust": (".rs",),
    "ruby": (".rb",),
    "php": (".php",),
    "swift": (".swift",),
    "shell": (".sh", ".bash"),
    "sql": (".sql",),
    "lua": (".lua",),
    "perl": (".pl", ".pm"),
    "r": (".r", ".R"),
    "julia": (".jl",),
    "haskell": (".hs",),
    "html": (".html", ".htm"),
    "css": (".css",),
    "markdown": (".md",),
    "yaml": (".yaml", ".yml"),
    "toml": (".toml",),
    "json": (".json",),
}

_ALL_CODE_EXTENSIONS = tuple(sorted({e for group in LANGUAGE_EXTENSIONS.values() for e in group}))
# `--format auto` treats .json as data (manifests, metadata), not as a code document; --format code takes it.
_AUTO_CODE_EXTENSIONS = tuple(e for e in _ALL_CODE_EXTENSIONS if e != ".json")

# Problem reasons and which policy governs each (see `--on-error` / `--on-binary`).
REASON_POLICY = {
    "malformed_json": "on_error",
    "missing_field": "on_error",
    "invalid_utf8": "on_error",
    "unreadable": "on_error",
    "too_large": "on_error",  # over --max-doc-mb: read in pieces and dropped, never held whole in memory
    "binary": "on_binary",
    "empty": "always_skip",  # nothing to learn from, and not a fault of the data
}
# Bytes sniffed for NUL to call a file binary (git uses the same idea).
BINARY_SNIFF_BYTES = 8192
# Default bound on one document (a jsonl line, a text/code file, a parquet cell); `prepare --max-doc-mb`.
DEFAULT_MAX_DOC_BYTES = 16 << 20
# Pieces an oversized jsonl line is read and dropped in.
_DISCARD_PIECE_BYTES = 1 << 20
_SKIPPED_DIRS = {"__pycache__", "node_modules"}


@dataclass
class Document:
    text: str
    file: str
    line: int  # 1-based line (jsonl; counted from the range start in split files) or row (parquet); 0 = file
    consumed: int = 0  # input bytes this record advanced progress by


@dataclass
class Problem:
    reason: str
    file: str
    line: int
    message: str
    consumed: int = 0

    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    def describe(self) -> str:
        return f"{self.where()}: {self.reason}: {self.message}"


@dataclass
class WorkUnit:
    """A slice of the input that one worker turns into one part folder of shards."""
    index: int
    kind: str  # jsonl | parquet | text | code
    files: list[str]
    byte_start: int = 0  # jsonl ranges of one uncompressed file
    byte_end: int | None = None
    row_groups: list[int] | None = None  # parquet
    size: int = 0  # bytes, for progress and ETA
    identity: list = field(default_factory=list)  # what must be unchanged to keep a finished part

    def to_json(self) -> dict:
        return asdict(self)


def code_extensions(languages: Iterable[str], extensions: Iterable[str]) -> tuple[str, ...]:
    exts: list[str] = []
    for lang in languages:
        key = lang.lower()
        if key not in LANGUAGE_EXTENSIONS:
            raise UserError(f"--language {lang!r} is unknown{did_you_mean(key, LANGUAGE_EXTENSIONS)}; "
                            f"known: {', '.join(sorted(LANGUAGE_EXTENSIONS))} (or give --extension)")
        exts.extend(LANGUAGE_EXTENSIONS[key])
    for ext in extensions:
        exts.append(ext if ext.startswith(".") else "." + ext)
    return tuple(dict.fromkeys(exts)) or _ALL_CODE_EXTENSIONS


def detect_format(path: str) -> str | None:
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(_AUTO_CODE_EXTENSIONS) or path.endswith(_AUTO_CODE_EXTENSIONS):
        return "code"
    return None


def _wanted_in_directory(path: str, fmt: str, exts: tuple[str, ...]) -> bool:
    if fmt == "code":
        return path.endswith(exts)
    if fmt == "text":
        return True
    if fmt == "auto":
        return detect_format(path) is not None
    return detect_format(path) == fmt


def _walk(root: str, fmt: str, exts: tuple[str, ...], exclude: tuple[str, ...],
          skip_dirs: frozenset[str] = frozenset()) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIPPED_DIRS
                             and os.path.realpath(os.path.join(dirpath, d)) not in skip_dirs)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if name.startswith(".") or any(fnmatch.fnmatch(rel, pat) for pat in exclude):
                continue
            if _wanted_in_directory(path, fmt, exts):
                found.append(path)
    return found


def _inside(path: str, folders: frozenset[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == f or real.startswith(f + os.sep) for f in folders)


def expand_inputs(inputs: Iterable[str | os.PathLike], fmt: str = "auto", languages: Iterable[str] = (),
                  extensions: Iterable[str] = (), exclude: Iterable[str] = (),
                  skip_dirs: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Files named by paths, directories (recursively) and globs, in a deterministic order, no duplicates.

    Nothing inside `skip_dirs` is ever an input (prepare passes its --out, which may sit in an input folder).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is unknown{did_you_mean(fmt, FORMATS)}; choose one of {', '.join(FORMATS)}")
    exts = code_extensions(languages, extensions) if fmt == "code" else ()
    exclude = tuple(exclude)
    skip = frozenset(os.path.realpath(d) for d in skip_dirs)
    files: list[str] = []
    for item in map(str, inputs):
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"input pattern {item!r} matches no files")
            for match in matches:
                if not _inside(match, skip):
                    files.extend(_walk(match, fmt, exts, exclude, skip) if os.path.isdir(match) else [match])
        elif _inside(item, skip):
            raise UserError(f"input {item} is inside the output folder {next(iter(skip))}; choose another --out")
        elif os.path.isdir(item):
            found = _walk(item, fmt, exts, exclude, skip)
            if not found:
                wanted = f"files ending in {', '.join(exts)}" if fmt == "code" else f"{fmt} input files"
                raise UserError(f"input directory {item} holds no {wanted}")
            files.extend(found)
        elif os.path.lexists(item):
            files.append(item)  # a broken link is kept so the reader reports it as unreadable
        else:
            raise UserError(f"input {item} does not exist")
    files = list(dict.fromkeys(os.path.normpath(f) for f in files))
    if fmt in ("auto",):
        unknown = [f for f in files if detect_format(f) is None]
        if unknown:
            raise UserError(f"cannot tell the format of {unknown[0]} from its name; pass --format "
                            f"jsonl|parquet|text|code (known: {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES)}"
                            f" and code extensions such as .py .rs .js)")
    return files


def file_kind(path: str, fmt: str) -> str:
    return detect_format(path) if fmt == "auto" else fmt


def _stat_identity(path: str) -> list:
    try:
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, None, None]


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _parquet_row_groups(path: str) -> list[tuple[int, int]] | None:
    """(row group index, uncompressed bytes) per row group, or None if the file cannot be opened."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception:  # reported per record by the worker, with the reason
        return None
    return [(i, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]


def plan_units(files: list[str], fmt: str, unit_bytes: int, max_files_per_unit: int = 20000) -> list[WorkUnit]:
    """Split the inputs into work units of about `unit_bytes`, in input order (deterministic doc order)."""
    units: list[WorkUnit] = []

    def add(kind: str, unit_files: list[str], size: int, **extra) -> None:
        identity = [_stat_identity(f) for f in unit_files] + [sorted(extra.items())]
        units.append(WorkUnit(index=len(units), kind=kind, files=unit_files, size=size, identity=identity, **extra))

    group: list[str] = []
    group_kind, group_size = "", 0

    def flush_group() -> None:
        nonlocal group, group_size
        if group:
            add(group_kind, group, group_size)
        group, group_size = [], 0

    for path in files:
        kind = file_kind(path, fmt)
        size = _file_size(path)
        if kind in ("text", "code"):
            if group and (kind != group_kind or group_size >= unit_bytes or group_size + size > unit_bytes
                          or len(group) >= max_files_per_unit):
                flush_group()
            group_kind = kind
            group.append(path)
            group_size += size
            continue
        flush_group()
        if kind == "jsonl":
            compressed = not path.lower().endswith((".jsonl", ".ndjson"))
            if compressed or size <= unit_bytes:
                add("jsonl", [path], size, byte_start=0, byte_end=None)
            else:
                for start in range(0, size, unit_bytes):
                    add("jsonl", [path], min(unit_bytes, size - start), byte_start=start,
                        byte_end=min(start + unit_bytes, size))
        elif kind == "parquet":
            row_groups = _parquet_row_groups(path)
            if not row_groups:
                add("parquet", [path], size, row_groups=None)
                continue
            total = sum(b for _, b in row_groups) or 1
            batch: list[int] = []
            batch_bytes = 0
            for index, nbytes in row_groups:
                if batch and batch_bytes + nbytes > unit_bytes:
                    add("parquet", [path], size * batch_bytes // total, row_groups=batch)
                    batch, batch_bytes = [], 0
                batch.append(index)
                batch_bytes += nbytes
            add("parquet", [path], size * batch_bytes // total, row_groups=batch)
        else:
            raise UserError(f"unsupported format {kind!r} for {path}")
    flush_group()
    return units


# ---------------------------------------------------------------------------------------------- readers

def _decode_file_text(path: str, data: bytes, kind: str) -> Document | Problem:
    nul = data.find(b"\x00", 0, BINARY_SNIFF_BYTES)
    if nul >= 0:
        return Problem("binary", path, 0, f"NUL byte at offset {nul} (not a text file)", len(data))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        # Code directories treat undecodable files like binary ones: not source we can learn from.
        reason = "binary" if kind == "code" else "invalid_utf8"
        return Problem(reason, path, line, f"invalid UTF-8 at byte {err.start} ({err.reason})", len(data))
    if not text.strip():
        return Problem("empty", path, 0, "file is empty or whitespace only", len(data))
    return Document(text, path, 0, len(data))


def _too_large(path: str, line: int, size: int, limit: int, what: str) -> Problem:
    return Problem("too_large", path, line, f"{what} of {size / (1 << 20):,.1f} MB is over --max-doc-mb "
                                            f"{limit / (1 << 20):g}", size)


def read_whole_files(files: list[str], kind: str,
                     max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Iterator[Document | Problem]:
    """One document per file (code and plain text); a file over max_doc_bytes is reported, never read whole."""
    for path in files:
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                data = b"" if size > max_doc_bytes else fh.read(max_doc_bytes + 1)
        except OSError as err:
            yield Problem("unreadable", path, 0, f"cannot read: {err.strerror or err}", _file_size(path))
            continue
        if size > max_doc_bytes or len(data) > max_doc_bytes:
            yield _too_large(path, 0, max(size, len(data)), max_doc_bytes, "file")
            continue
        yield _decode_file_text(path, data, kind)


def _open_jsonl(path: str):
    """(line iterator over bytes, raw file handle for progress)."""
    raw = open(path, "rb")
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if name.endswith((".zst", ".zstd")):
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(stream, buffer_size=1 << 20), raw
    return raw, raw


class _LineNumbers:
    """Line number of the first line of a byte range, counted only when a problem needs it."""

    def __init__(self, path: str, byte_start: int):
        self.path, self.byte_start, self._base = path, byte_start, None

    def base(self) -> int:
        if self._base is None:
            count = 0
            with open(self.path, "rb") as fh:
                remaining = self.byte_start
                while remaining > 0:
                    block = fh.read(min(remaining, 1 << 24))
                    if not block:
                        break
                    count += block.count(b"\n")
                    remaining -= len(block)
            self._base = count
        return self._base


def parse_jsonl_record(line: bytes, text_field: str, path: str, lineno: int) -> Document | Problem:
    consumed = len(line)
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return Problem("invalid_utf8", path, lineno, f"invalid UTF-8 at byte {err.start} of the line ({err.reason})",
                       consumed)
    if not decoded.strip():
        return Problem("empty", path, lineno, "blank line", consumed)
    try:
        record = json.loads(decoded.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        return Problem("malformed_json", path, lineno, f"not valid JSON: {err.msg} (column {err.colno})", consumed)
    if not isinstance(record, dict):
        return Problem("malformed_json", path, lineno, f"a JSON {type(record).__name__}, not an object", consumed)
    if text_field not in record:
        hint = did_you_mean(text_field, record)
        return Problem("missing_field", path, lineno,
                       f"no field {text_field!r}{hint} (fields: {', '.join(list(record)[:8])}; set --text-field)",
                       consumed)
    text = record[text_field]
    if not isinstance(text, str):
        return Problem("missing_field", path, lineno,
                       f"field {text_field!r} is {type(text).__name__}, not a string", consumed)
    if "\\u" in decoded or "\\U" in decoded:
        # A \ud800-style escape decodes to a lone surrogate that no tokenizer can encode.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return Problem("invalid_utf8", path, lineno,
                           f"field {text_field!r} holds a lone surrogate escape at character {err.start}", consumed)
    if not text.strip():
        return Problem("empty", path, lineno, f"field {text_field!r} is empty or whitespace only", consumed)
    return Document(text, path, lineno, consumed)


def read_jsonl(path: str, text_field: str, byte_start: int = 0, byte_end: int | None = None,
               max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Iterator[Document | Problem]:
    """Records of one jsonl(.gz/.zst) file, or of the lines that start in [byte_start, byte_end).

    A line longer than max_doc_bytes is read and dropped in pieces and reported as too_large: memory stays
    bounded whatever a (highly compressible) file holds.
    """
    try:
        stream, raw = _open_jsonl(path)
    except OSError as err:
        yield Problem("unreadable", path, 0, f"cannot open: {err.strerror or err}", _file_size(path))
        return
    compressed = stream is not raw
    with stream, raw:
        pos, local_line, last_raw = byte_start, 0, 0
        numbers = _LineNumbers(path, 0)
        try:
            if byte_start > 0:
                # The line straddling byte_start belongs to the previous range: skip to the next line start.
                raw.seek(byte_start - 1)
                pos = byte_start - 1 + len(raw.readline())
                numbers = _LineNumbers(path, pos)
            while byte_end is None or pos < byte_end:
                line = stream.readline(max_doc_bytes + 1)
                if not line:
                    break
                line_bytes = len(line)
                oversized = line_bytes > max_doc_bytes
                while oversized and not line.endswith(b"\n"):
                    line = stream.readline(_DISCARD_PIECE_BYTES)
                    if not line:
                        break
                    line_bytes += len(line)
                pos += line_bytes
                local_line += 1
                if compressed:
                    now = raw.tell()
                    consumed, last_raw = now - last_raw, now
                else:
                    consumed = line_bytes
                if oversized:
                    item = _too_large(path, local_line, line_bytes, max_doc_bytes, "line")
                else:
                    item = parse_jsonl_record(line, text_field, path, local_line)
                if isinstance(item, Problem) and byte_start > 0:
                    item.line += numbers.base()
                item.consumed = consumed
                yield item
        except (OSError, EOFError, ValueError) as err:
            # Truncated gzip, corrupt zstd frame, disk error: the rest of this file cannot be read.
            line_no = (numbers.base() if byte_start else 0) + local_line + 1
            left = 0 if compressed else max(0, (byte_end or _file_size(path)) - pos)
            yield Problem("unreadable", path, line_no, f"cannot read past this line: {type(err).__name__}: {err}",
                          left)


def read_parquet(path: str, text_field: str, row_groups: list[int] | None,
                 max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Iterator[Document | Problem]:
    """Rows of the given row groups; `line` is the 1-based row number in the file. Memory is bounded by the
    row group the file was written with; a cell over max_doc_bytes characters is reported as too_large."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        meta = pf.metadata
    except Exception as err:
        yield Problem("unreadable", path, 0, f"not a readable parquet file: {err}", _file_size(path))
        return
    names = pf.schema_arrow.names
    groups = list(range(meta.num_row_groups)) if row_groups is None else row_groups
    first_row = [0]
    for i in range(meta.num_row_groups):
        first_row.append(first_row[-1] + meta.row_group(i).num_rows)
    size = _file_size(path)
    for group in groups:
        rows = meta.row_group(group).num_rows
        per_row = size // max(1, meta.num_rows)
        if text_field not in names:
            message = f"no column {text_field!r}{did_you_mean(text_field, names)} (columns: {', '.join(names[:8])})"
            for r in range(rows):
                yield Problem("missing_field", path, first_row[group] + r + 1, message, per_row)
            continue
        try:
            column = pf.read_row_group(group, columns=[text_field]).column(0).to_pylist()
        except Exception as err:
            yield Problem("unreadable", path, first_row[group] + 1,
                          f"cannot read row group {group}: {err}", per_row * rows)
            continue
        for r, text in enumerate(column):
            row = first_row[group] + r + 1
            if not isinstance(text, str):
                kind = "null" if text is None else type(text).__name__
                yield Problem("missing_field", path, row, f"column {text_field!r} is {kind}, not a string", per_row)
            elif len(text) > max_doc_bytes:
                problem = _too_large(path, row, len(text), max_doc_bytes, "cell")
                problem.consumed = per_row
                yield problem
            elif not text.strip():
                yield Problem("empty", path, row, f"column {text_field!r} is empty or whitespace only", per_row)
            else:
                yield Document(text, path, row, per_row)


def read_unit(unit: WorkUnit, text_field: str = "text",
              max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Iterator[Document | Problem]:
    if unit.kind in ("text", "code"):
        yield from read_whole_files(unit.files, unit.kind, max_doc_bytes)
    elif unit.kind == "jsonl":
        yield from read_jsonl(unit.files[0], text_field, unit.byte_start, unit.byte_end, max_doc_bytes)
    elif unit.kind == "parquet":
        yield from read_parquet(unit.files[0], text_field, unit.row_groups, max_doc_bytes)
    else:
        raise ValueError(f"unknown unit kind {unit.kind}")

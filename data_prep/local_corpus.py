"""A real corpus built offline from this machine: Python standard library code + English prose.

    OUT/code/...            the running interpreter's stdlib .py files (tests and site-packages left out),
                            copied byte for byte: a `--format code` source
    OUT/prose/pydoc_topics.jsonl   the language reference topics shipped in `pydoc_data.topics`
    OUT/prose/docstrings.jsonl     per stdlib module, its module/class/function docstrings
    OUT/prose/python_docs/*.txt    the reStructuredText sources of the Python docs, when the Debian
                                   package python3.11-doc is installed
    OUT/corpus_info.json           what was written, with byte counts

Every prose file is jsonl or .txt, so the prose folder is a `--format auto` source.

The stdlib files `reserved_for_eval` picks are left out of both parts: the local evaluation tasks
(modernbert_train/eval/local_tasks.py) are built from them only, so no evaluation text is pretrained on.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sysconfig
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from modernbert_train.errors import UserError

PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
# Directories of the stdlib that are tests, third-party installs or build leftovers, not library code.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled",
                 "lib2to3_tests"}


# Reserved for evaluation: every module of the packages the topic task classifies (turtle and _pydecimal are
# single modules, which a share of files could not split), and this share of the other files, picked by a
# stable hash of their path under the stdlib root. The share is what gives every local task its full default
# sizes (the retrieval pool needs 1,200 functions with docstrings from the other files).
EVAL_TOPIC_PACKAGES = ("asyncio", "email", "logging", "tkinter", "turtle", "_pydecimal")
EVAL_FILE_SHARE = 0.35
# Recorded with what was built, so that a corpus or task folder made under another rule is recognisable.
EVAL_RESERVATION = f"packages {','.join(EVAL_TOPIC_PACKAGES)} + sha256(path) share {EVAL_FILE_SHARE}"


def reserved_for_eval(relative_path: str | os.PathLike) -> bool:
    """Whether a stdlib file (path relative to the stdlib root) belongs to the evaluation tasks, never to the
    pretraining corpus. The one place that decides it: the corpus and the local tasks both ask here."""
    path = PurePosixPath(Path(relative_path).as_posix())
    if path.parts[0].removesuffix(".py") in EVAL_TOPIC_PACKAGES:
        return True
    digest = hashlib.sha256(f"eval-reserved:{path}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < EVAL_FILE_SHARE


def documents_reserved_module(page: str | os.PathLike, root: Path | None = None) -> bool:
    """Whether a page of the Python docs (path under PYTHON_DOC_SOURCES) documents a module reserved for
    evaluation: library/asyncio-task.rst.txt documents asyncio, library/decimal.rst.txt decimal and its
    pure-Python implementation _pydecimal, whose docstrings the page repeats."""
    page = PurePosixPath(Path(page).as_posix())
    if page.parts[0] != "library":
        return False
    root = root or stdlib_dir()
    parts = page.name.split(".rst")[0].split(".txt")[0].split("-")[0].split(".")
    candidates = ["/".join(parts) + ".py", "/".join(parts) + "/__init__.py", f"_py{parts[0]}.py"]
    return any((root / name).is_file() and reserved_for_eval(name) for name in candidates)


def python_doc_pages(root: Path | None = None) -> list[Path]:
    """The pages of the Python docs (when installed) the corpus may take: all but those of reserved modules."""
    if not PYTHON_DOC_SOURCES.is_dir():
        return []
    return [page for page in sorted(PYTHON_DOC_SOURCES.rglob("*.txt"))
            if not documents_reserved_module(page.relative_to(PYTHON_DOC_SOURCES), root)]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_python_files(root: Path | None = None, reserved: bool | None = None) -> list[Path]:
    """The stdlib's .py files in a deterministic order, test directories and site-packages excluded;
    `reserved` True / False keeps only the files reserved / not reserved for evaluation."""
    root = root or stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(("config-", ".")))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    if reserved is not None:
        found = [path for path in found if reserved_for_eval(path.relative_to(root)) == reserved]
    return found


def _docstrings_of(source: str) -> list[str]:
    tree = ast.parse(source)
    docs = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                docs.append(doc)
    return list(dict.fromkeys(docs))  # the module appears twice (tree and ast.walk's first node)


# Below this many bytes left, stop looking for items small enough to fit (and stop parsing modules for them).
NEARLY_FULL_BYTES = 2048


class _Budget:
    def __init__(self, max_bytes: int | None):
        self.left = max_bytes

    def nearly_full(self) -> bool:
        return self.left is not None and self.left < NEARLY_FULL_BYTES

    def take(self, nbytes: int) -> bool:
        if self.left is None:
            return True
        if nbytes > self.left:
            return False  # skipped; smaller items later in the (sorted, deterministic) order may still fit
        self.left -= nbytes
        return True


def _write_jsonl(path: Path, records: Iterable[dict], budget: _Budget) -> tuple[int, int]:
    written = nbytes = 0
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            if budget.nearly_full():
                break
            line = json.dumps(record, ensure_ascii=False) + "\n"
            size = len(line.encode("utf-8"))
            if not budget.take(size):
                continue
            fh.write(line)
            written += 1
            nbytes += size
    return written, nbytes


def build_code(out: Path, max_bytes: int | None = None) -> dict:
    root = stdlib_dir()
    return _copy_within_budget(stdlib_python_files(root, reserved=False), root, out, _Budget(max_bytes))


def _copy_within_budget(sources, root: Path, dest_dir: Path, budget: "_Budget") -> dict:
    """Copy files (keeping their paths under `root`) while the byte budget lasts; what was copied."""
    files = nbytes = 0
    for src in sources:
        size = src.stat().st_size
        if not budget.take(size):
            continue
        dest = dest_dir / src.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        files += 1
        nbytes += size
    return {"files": files, "bytes": nbytes, "from": str(root)}


def build_prose(out: Path, max_bytes: int | None = None) -> dict:
    from pydoc_data.topics import topics

    out.mkdir(parents=True, exist_ok=True)
    budget = _Budget(max_bytes)
    info: dict = {}
    records = [{"text": topics[name], "id": f"pydoc_topics/{name}"} for name in sorted(topics)]
    # Under a cap the reference topics get at most half, so docstrings (a different register) are in too.
    docs, nbytes = _write_jsonl(out / "pydoc_topics.jsonl", records, _Budget(max_bytes and max_bytes // 2))
    budget.take(nbytes)
    info["pydoc_topics"] = {"documents": docs, "bytes": nbytes}

    root = stdlib_dir()
    unparsable = []

    def docstring_records() -> Iterator[dict]:  # lazy: a capped corpus parses only the modules it needs
        for src in stdlib_python_files(root, reserved=False):
            try:
                docstrings = _docstrings_of(src.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                unparsable.append(str(src))
                continue
            if docstrings:
                yield {"text": "\n\n".join(docstrings), "id": str(src.relative_to(root))}

    docs, nbytes = _write_jsonl(out / "docstrings.jsonl", docstring_records(), budget)
    info["docstrings"] = {"documents": docs, "bytes": nbytes, "modules_unparsable": len(unparsable)}

    if PYTHON_DOC_SOURCES.is_dir():
        info["python_docs"] = _copy_within_budget(python_doc_pages(root), PYTHON_DOC_SOURCES, out / "python_docs",
                                                  budget)
    return info


def build_local_corpus(out_dir: str | os.PathLike, max_bytes: int | None = None, overwrite: bool = False) -> dict:
    """Write the demo corpus under out_dir (code/ and prose/); `max_bytes` caps each of the two separately."""
    out = Path(out_dir)
    if max_bytes is not None and max_bytes <= 0:
        raise UserError(f"--max-mb must be positive (got {max_bytes} bytes)")
    existing = [p for p in ("code", "prose", "corpus_info.json") if (out / p).exists()]
    if existing:
        if not overwrite:
            raise UserError(f"{out} already holds {', '.join(existing)}; pass --overwrite to rebuild it")
        for name in existing:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    info = {"code": build_code(out / "code", max_bytes), "prose": build_prose(out / "prose", max_bytes),
            "max_bytes_per_kind": max_bytes, "reserved_for_eval": EVAL_RESERVATION}
    (out / "corpus_info.json").write_text(json.dumps(info, indent=1))
    return info

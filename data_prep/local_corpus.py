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
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from modernbert_train.common.errors import UserError
from modernbert_train.eval import heldout
from modernbert_train.eval.heldout import (EVAL_FILE_SHARE, EVAL_RESERVATION, EVAL_TOPIC_PACKAGES,  # noqa: F401
                                           documents_reserved_module, python_doc_pages, reserved_for_eval,
                                           stdlib_dir, stdlib_python_files)

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

    if heldout.PYTHON_DOC_SOURCES.is_dir():
        info["python_docs"] = _copy_within_budget(python_doc_pages(root), heldout.PYTHON_DOC_SOURCES, out / "python_docs",
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
        from modernbert_train.common.safety import remove_tree

        # corpus_info.json is written last: without it, code/ and prose/ may be anyone's folders of that name.
        marker = None if (out / "corpus_info.json").is_file() else (
            "has no corpus_info.json beside it (not built by build-local-corpus, or a build that was interrupted: "
            "delete it yourself)")
        for name in existing:
            remove_tree(out / name, label=f"--out's {name}", recognise=lambda folder: marker)
    out.mkdir(parents=True, exist_ok=True)
    info = {"code": build_code(out / "code", max_bytes), "prose": build_prose(out / "prose", max_bytes),
            "max_bytes_per_kind": max_bytes, "reserved_for_eval": EVAL_RESERVATION}
    (out / "corpus_info.json").write_text(json.dumps(info, indent=1))
    return info

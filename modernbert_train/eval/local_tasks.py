"""Real evaluation tasks built offline from this machine's Python standard library, written in the same
formats users bring (jsonl splits, BEIR folders), so the same suite code reads both.

- `stdlib-topic` (classification): a function's docstring -> the package it documents (tkinter, asyncio,
  email, logging, decimal, turtle); train / dev / test jsonl with `text` and `label`.
- `stdlib-code-search` (retrieval, a small CodeSearchNet): a function's docstring (first paragraph) as the
  query, the function's source with its docstring removed as the document; BEIR folder with train and test
  qrels over one corpus.
- `heldout.jsonl`: prose for the fixed-mask MLM evaluation.
Deterministic: the same interpreter gives the same files.
"""
from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from data_prep.local_corpus import stdlib_dir, stdlib_python_files

TOPICS = {"tkinter": "tkinter", "asyncio": "asyncio", "email": "email", "logging": "logging",
          "_pydecimal": "decimal", "turtle": "turtle"}
INFO_FILE = "tasks_info.json"


def _stable_fraction(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8


def _functions_with_docstrings():
    """(top-level package, docstring, source without docstring) for stdlib functions, in a fixed order."""
    root = stdlib_dir()
    for path in stdlib_python_files(root):
        package = path.relative_to(root).parts[0].removesuffix(".py")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc) < 40:
                continue
            node.body = node.body[1:] or [ast.Pass()]  # drop the docstring: the query must not be in the document
            yield package, doc, ast.unparse(node)


def _write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        count = 0
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def build_local_tasks(out_dir: str | Path, per_topic: int = 120, retrieval_train: int = 800,
                      retrieval_test: int = 200, corpus_size: int = 1200, heldout: int = 200) -> dict:
    """Write the three tasks under out_dir; returns counts. Skips work when `tasks_info.json` matches."""
    out = Path(out_dir)
    settings = dict(per_topic=per_topic, retrieval_train=retrieval_train, retrieval_test=retrieval_test,
                    corpus_size=corpus_size, heldout=heldout)
    info_file = out / INFO_FILE
    if info_file.exists() and json.loads(info_file.read_text()).get("settings") == settings:
        return json.loads(info_file.read_text())
    functions, seen_docs, seen_code = [], set(), set()
    for package, doc, code in _functions_with_docstrings():
        if doc in seen_docs or code in seen_code:
            continue  # overrides repeating a docstring would make ambiguous labels and queries
        seen_docs.add(doc)
        seen_code.add(code)
        functions.append((package, doc, code))
    functions.sort(key=lambda f: _stable_fraction(f[1]))  # a fixed shuffle

    # Classification: docstring -> package, balanced, 60/15/25 split.
    by_topic: dict[str, list[str]] = {}
    for package, doc, _ in functions:
        if package in TOPICS and len(by_topic.setdefault(package, [])) < per_topic:
            by_topic[package].append(doc)
    splits = {"train": [], "dev": [], "test": []}
    for package, docs in by_topic.items():
        for i, doc in enumerate(docs):
            split = "train" if i < 0.6 * len(docs) else "dev" if i < 0.75 * len(docs) else "test"
            splits[split].append({"text": doc[:600], "label": TOPICS[package]})
    topic_dir = out / "stdlib-topic"
    counts = {f"topic_{s}": _write_jsonl(topic_dir / f"{s}.jsonl", sorted(rows, key=lambda r: _stable_fraction(r["text"])))
              for s, rows in splits.items()}

    # Retrieval: first docstring paragraph -> code. Train and test queries share one corpus (distractors
    # are further functions), as BEIR datasets with a train split do.
    code_search = out / "stdlib-code-search"
    pool = [f for f in functions if f[0] not in TOPICS]  # keep the two tasks' texts apart
    corpus_rows, queries, qrels = [], [], {"train": [], "test": []}
    for index, (package, doc, code) in enumerate(pool[:max(corpus_size, retrieval_train + retrieval_test)]):
        doc_id = f"d{index}"
        corpus_rows.append({"_id": doc_id, "title": "", "text": code[:4000]})
        split = "train" if index < retrieval_train else "test" if index < retrieval_train + retrieval_test else None
        if split:
            query_id = f"q{index}"
            queries.append({"_id": query_id, "text": doc.split("\n\n")[0]})
            qrels[split].append((query_id, doc_id))
    counts["corpus"] = _write_jsonl(code_search / "corpus.jsonl", corpus_rows)
    _write_jsonl(code_search / "queries.jsonl", queries)
    (code_search / "qrels").mkdir(parents=True, exist_ok=True)
    for split, pairs in qrels.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, d in pairs]
        (code_search / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        counts[f"retrieval_{split}"] = len(pairs)

    # Held-out prose for MLM: docstrings of functions used by neither task.
    rest = pool[max(corpus_size, retrieval_train + retrieval_test):]
    counts["heldout"] = _write_jsonl(out / "heldout.jsonl", ({"text": doc} for _, doc, _ in rest[:heldout]))
    info = {"settings": settings, "counts": counts}
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return info

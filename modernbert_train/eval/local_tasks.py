"""Real evaluation tasks built offline from this machine's Python standard library, written in the same
formats users bring (jsonl splits, BEIR folders), so the same suite code reads both.

- `stdlib-topic` (classification): a function's docstring -> the package it documents (tkinter, asyncio,
  email, logging, decimal, turtle); train / dev / test jsonl with `text` and `label`.
- `stdlib-code-search` (retrieval, a small CodeSearchNet): a function's docstring (first paragraph) as the
  query, the function's source with its docstring removed as the document; BEIR folder with train and test
  qrels over one corpus.
- `stdlib-code-search-noname` (retrieval with fewer shared names): the same queries with the function's
  name and argument names (and their snake/camel-case parts) removed, over the same corpus, with a dev
  split to choose the learning rate on.
- `stdlib-code-search-nooverlap` (retrieval across a vocabulary mismatch): the same queries with every word
  removed that shares a stem with a word of the code, so a bag-of-words matcher is at chance.
- `stdlib-code-search-train` (training pairs only): signature-less docstring -> code pairs from the stdlib
  files the corpus pretrains on, for fine-tuning as MS MARCO is in the paper's DPR setting; never scored.
- `stdlib-code-continuation` (retrieval, as CoIR's CodeSearchNet-CCR): the first 40-70% of a function's lines
  (docstring removed) as the query, the rest as the document; train / dev / test qrels over one corpus.
- `stdlib-shuffled-lines` (classification that word identity cannot decide): a function body as written,
  or with its lines shuffled; both classes have the same bag of words, so only order and structure tell.
- `heldout.jsonl`: prose for the fixed-mask MLM evaluation.
Every text a task scores comes from the stdlib files reserved for evaluation
(`modernbert_train.eval.heldout.reserved_for_eval`), which the local pretraining corpus leaves out. Deterministic:
the same interpreter gives the same files.
"""
from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import textwrap
from pathlib import Path

from modernbert_train.eval.heldout import (EVAL_RESERVATION, EVAL_TOPIC_PACKAGES, python_doc_pages, stdlib_dir,
                                   stdlib_python_files)

# package -> label; the packages are reserved for evaluation whole, so none of their text is pretrained on
TOPICS = {package: {"_pydecimal": "decimal"}.get(package, package) for package in EVAL_TOPIC_PACKAGES}
INFO_FILE = "tasks_info.json"
TRANSFER_TRAIN = "stdlib-code-search-train"  # training pairs only, from the pretraining side
TASK_SET = 2  # raised when a task is added or built another way: folders built before are rebuilt


def _stable_fraction(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8


def _functions_with_docstrings(reserved: bool = True):
    """(top-level package, docstring, code without docstring, source as written) for the functions of the
    stdlib files reserved for evaluation (or, reserved=False, of those the corpus pretrains on), in a fixed
    order."""
    root = stdlib_dir()
    for path in stdlib_python_files(root, reserved=reserved):
        package = path.relative_to(root).parts[0].removesuffix(".py")
        try:
            text = path.read_text(encoding="utf-8")
            tree, lines = ast.parse(text), text.splitlines()
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc) < 40:
                continue
            source = "\n".join(lines[node.lineno - 1:node.end_lineno])
            node.body = node.body[1:] or [ast.Pass()]  # drop the docstring: the query must not be in the document
            yield package, doc, ast.unparse(node), source


# A docstring line of at least this many words found in the pretraining text marks a copied docstring
# (gzip, bz2 and lzma share theirs; email.mime.image copies imghdr's); shorter lines are common phrases.
COPIED_LINE_WORDS = 5
_QUOTES = re.compile(r"""^[rRbBuU]?(\"\"\"|''')|(\"\"\"|''')$""")


def _normal_lines(text: str) -> list[str]:
    """Non-empty lines, stripped of indentation and of docstring quotes, as they are compared."""
    lines = (_QUOTES.sub("", line.strip()).strip() for line in text.splitlines())
    return [line for line in lines if line]


class PretrainingText:
    """The text the local corpus may pretrain on (the stdlib files not reserved for evaluation, the language
    reference topics and the pages of the Python docs it takes), indexed by line: does a text appear in it
    as a run of whole lines (indentation and docstring quotes aside)?"""

    def __init__(self, texts: list[str]):
        self.documents = [_normal_lines(text) for text in texts]
        self.where: dict[str, list[tuple[int, int]]] = {}
        for d, lines in enumerate(self.documents):
            for i, line in enumerate(lines):
                self.where.setdefault(line, []).append((d, i))

    @classmethod
    def of_stdlib(cls) -> "PretrainingText":
        from pydoc_data.topics import topics

        files = stdlib_python_files(reserved=False) + python_doc_pages()
        return cls([path.read_text(encoding="utf-8", errors="replace") for path in files] + list(topics.values()))

    def has_run(self, text: str) -> bool:
        lines = _normal_lines(text)
        starts = self.where.get(lines[0], ()) if lines else ()
        return any(self.documents[d][i:i + len(lines)] == lines for d, i in starts)

    def has_line(self, text: str, min_words: int = COPIED_LINE_WORDS) -> bool:
        return any(len(line.split()) >= min_words and line in self.where for line in _normal_lines(text))


def _write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        count = 0
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def _write_beir(folder: Path, corpus: list[dict], queries: list[dict], qrels: dict[str, list[tuple[str, str]]],
                count_prefix: str) -> dict[str, int]:
    """A BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); returns '<prefix>_<split>' pair counts."""
    _write_jsonl(folder / "corpus.jsonl", corpus)
    _write_jsonl(folder / "queries.jsonl", queries)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, pairs in qrels.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, d in pairs]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        counts[f"{count_prefix}_{split}"] = len(pairs)
    return counts


def _name_parts(names) -> set[str]:
    """Lower-cased names and their snake/camel-case parts (`read_file` -> read_file, read, file)."""
    words = set()
    for name in names:
        words.add(name.lower())
        words.update(part.lower() for part in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+", name))
    return words


def _without_signature(query: str, code: str) -> str:
    """The query with the function's own name and its arguments' names (and their parts) removed: the
    words a query would share with the code's signature."""
    node = ast.parse(code).body[0]
    arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs + [
        a for a in (node.args.vararg, node.args.kwarg) if a is not None]
    names = _name_parts([node.name, *(a.arg for a in arguments)]) - {"self", "cls"}
    kept = [w for w in query.split()
            if not any(part.lower() in names for part in re.findall(r"[A-Za-z0-9_]+", w))]
    return " ".join(kept)


def _shares_stem(a: str, b: str) -> bool:
    """Do two lower-cased words share a stem (`file`/`files`, `read`/`reading`) or one hold the other
    (`lines`/`readlines`), as a subword tokenizer would give them common tokens?"""
    short, long = sorted((a, b), key=len)
    return short == long or (len(short) >= 4 and short in long) or (len(short) >= 5 and short[:5] == long[:5])


def _without_shared_words(query: str, code: str) -> str:
    """The query with every word removed that shares a stem with a word of the code (identifiers split into
    their snake/camel-case parts, keywords, strings, comments): what is left names what the code does in
    other words than the code's, the vocabulary mismatch a bag-of-words matcher cannot bridge."""
    code_words = {w for w in _name_parts(re.findall(r"[A-Za-z0-9_]+", code)) if len(w) >= 2}
    kept = []
    for word in query.split():
        parts = [p.lower() for p in re.findall(r"[A-Za-z0-9]+", word)]
        if parts and not any(_shares_stem(p, c) for p in parts for c in code_words):
            kept.append(word)
    return " ".join(kept)


def _body_lines(code: str, max_lines: int) -> list[str] | None:
    """The first `max_lines` non-empty lines of a function's body (its `def` line dropped: it would mark the
    start), indented as written; None when the body is too short to shuffle."""
    lines = [line for line in textwrap.dedent("\n".join(code.splitlines()[1:])).splitlines() if line.strip()]
    lines = lines[:max_lines]
    return lines if len(lines) >= 5 and len(set(lines)) >= 3 else None


def _shuffled(lines: list[str], key: str) -> list[str]:
    """A fixed permutation of `lines` (seeded by `key`) that differs from the original order."""
    rng = random.Random(key)
    order = list(range(len(lines)))
    while True:
        rng.shuffle(order)
        shuffled = [lines[i] for i in order]
        if shuffled != lines:
            return shuffled


def build_local_tasks(out_dir: str | Path, per_topic: int = 120, retrieval_train: int = 800,
                      retrieval_test: int = 200, corpus_size: int = 1200, heldout: int = 200,
                      retrieval_dev: int = 100, shuffle_split: tuple[int, int, int] = (480, 120, 200),
                      shuffle_max_lines: int = 12, continuation_split: tuple[int, int, int] = (760, 100, 200),
                      continuation_min_lines: int = 6) -> dict:
    """Write the tasks under out_dir; returns counts. Skips work when `tasks_info.json` matches."""
    out = Path(out_dir)
    settings = dict(per_topic=per_topic, retrieval_train=retrieval_train, retrieval_test=retrieval_test,
                    corpus_size=corpus_size, heldout=heldout, retrieval_dev=retrieval_dev,
                    shuffle_split=list(shuffle_split), shuffle_max_lines=shuffle_max_lines,
                    continuation_split=list(continuation_split), continuation_min_lines=continuation_min_lines,
                    reserved_files=EVAL_RESERVATION,  # tasks built from other files are rebuilt
                    task_set=TASK_SET)
    info_file = out / INFO_FILE
    if info_file.exists() and json.loads(info_file.read_text()).get("settings") == settings:
        return json.loads(info_file.read_text())
    functions, seen_docs, seen_code = [], set(), set()
    pretraining = PretrainingText.of_stdlib()
    for package, doc, code, source in _functions_with_docstrings():
        if doc in seen_docs or code in seen_code:
            continue  # overrides repeating a docstring would make ambiguous labels and queries
        if pretraining.has_line(doc) or pretraining.has_run(source) or pretraining.has_run(code):
            continue  # copied into a file the corpus pretrains on (same docstring or function): not held out
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
    counts["corpus"] = len(corpus_rows)
    counts.update(_write_beir(code_search, corpus_rows, queries, qrels, "retrieval"))

    # Retrieval with fewer shared words, over the same corpus: `noname` drops the signature's names from the
    # query, `nooverlap` every word that shares a stem with the code. Train and test queries as above, dev
    # queries from the distractors after them (a query is kept when 3+ words remain).
    dev_end = retrieval_train + retrieval_test + retrieval_dev
    for name, shorten in (("noname", _without_signature), ("nooverlap", _without_shared_words)):
        short_queries, short_qrels = [], {"train": [], "dev": [], "test": []}
        for index, (package, doc, code) in enumerate(pool[:min(len(corpus_rows), dev_end)]):
            split = "train" if index < retrieval_train else "test" if index < retrieval_train + retrieval_test else "dev"
            query = shorten(doc.split("\n\n")[0], code)
            if len(query.split()) >= 3 and not pretraining.has_run(query):  # shortened into another docstring's line
                short_queries.append({"_id": f"q{index}", "text": query})
                short_qrels[split].append((f"q{index}", f"d{index}"))
        counts.update(_write_beir(out / f"stdlib-code-search-{name}", corpus_rows, short_queries, short_qrels, name))

    # Training pairs from the other side (MS MARCO's role in the paper's DPR setting): signature-less
    # docstring -> code pairs of the functions the corpus pretrains on, for fine-tuning only; the held-out
    # tasks above score the result.
    # Split `train` has the queries without the signature's names, `train-nooverlap` without shared words.
    transfer_corpus, transfer_queries, transfer_qrels = [], [], {"train": [], "train-nooverlap": []}
    for package, doc, code, _ in _functions_with_docstrings(reserved=False):
        if doc in seen_docs or code in seen_code:
            continue
        seen_docs.add(doc)
        seen_code.add(code)
        doc_id = f"t{len(transfer_corpus)}"
        transfer_corpus.append({"_id": doc_id, "title": "", "text": code[:4000]})
        first_paragraph = doc.split("\n\n")[0]
        for split, query in (("train", _without_signature(first_paragraph, code)),
                             ("train-nooverlap", _without_shared_words(first_paragraph, code))):
            if len(query.split()) >= 3:
                query_id = f"{split}-{doc_id}"
                transfer_queries.append({"_id": query_id, "text": query})
                transfer_qrels[split].append((query_id, doc_id))
    counts.update(_write_beir(out / TRANSFER_TRAIN, transfer_corpus, transfer_queries, transfer_qrels, "transfer"))

    # Code continuation: a function cut after 40-70% of its lines (fixed per function); the head is the query,
    # the tail the document. Splits in order: train, dev, test.
    continuation = out / "stdlib-code-continuation"
    heads, tails, continuation_qrels = [], [], {"train": [], "dev": [], "test": []}
    split_ends = {"train": continuation_split[0], "dev": sum(continuation_split[:2]), "test": sum(continuation_split)}
    for package, doc, code in functions:  # any held-out function: the tasks are scored apart
        lines = [line for line in code.splitlines() if line.strip()]
        if len(lines) < continuation_min_lines:
            continue
        cut = round(len(lines) * (0.4 + 0.3 * _stable_fraction("cut:" + code)))
        head, tail = "\n".join(lines[:cut]), "\n".join(lines[cut:])
        if pretraining.has_run(head) or pretraining.has_run(tail):
            continue  # a common head or ending ("return result") the corpus holds too: not a held-out text
        index = len(tails)
        split = next(name for name, end in split_ends.items() if index < end)
        heads.append({"_id": f"q{index}", "text": head})
        tails.append({"_id": f"d{index}", "title": "", "text": tail})
        continuation_qrels[split].append((f"q{index}", f"d{index}"))
        if len(tails) == split_ends["test"]:
            break
    counts.update(_write_beir(continuation, tails, heads, continuation_qrels, "continuation"))

    # Shuffled lines: one example per function body, intact or shuffled by a fixed coin; splits in order.
    examples = []
    for package, doc, code in functions:
        lines = _body_lines(code, shuffle_max_lines)
        if lines is None:
            continue
        shuffle = _stable_fraction("shuffle:" + code) < 0.5
        text = "\n".join(_shuffled(lines, code) if shuffle else lines)
        examples.append({"text": text, "label": "shuffled" if shuffle else "intact"})
        if len(examples) == sum(shuffle_split):
            break
    n_train, n_dev, _ = shuffle_split
    shuffle_dir = out / "stdlib-shuffled-lines"
    for split, rows in (("train", examples[:n_train]), ("dev", examples[n_train:n_train + n_dev]),
                        ("test", examples[n_train + n_dev:])):
        counts[f"shuffle_{split}"] = _write_jsonl(shuffle_dir / f"{split}.jsonl", rows)

    # Held-out prose for MLM: docstrings of functions used by neither the topic nor the retrieval tasks.
    used = {doc for docs in by_topic.values() for doc in docs} | {doc for _, doc, _ in pool[:len(corpus_rows)]}
    rest = [doc for _, doc, _ in functions if doc not in used]
    counts["heldout"] = _write_jsonl(out / "heldout.jsonl", ({"text": doc} for doc in rest[:heldout]))
    info = {"settings": settings, "counts": counts}
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return info

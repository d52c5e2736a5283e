"""Task data: rows from local files (jsonl, json, csv, tsv, parquet), `save_to_disk` folders (read with
pyarrow, no `datasets` needed) or any `datasets` hub name; BEIR folders for retrieval.

Every error names the suite file and the key that led to it.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from modernbert_train.common.errors import UserError

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _read_table_file(path: Path, where: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and _looks_like_jsonl(path)):
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise UserError(f"{where}: {path}:{number}: not a JSON line ({err.msg})") from None
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else data.get("data", [])
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise UserError(f"{where}: {path} has an unknown format (use one of {', '.join(TABLE_SUFFIXES)}, a "
                    f"save_to_disk folder or a datasets name)")


def _looks_like_jsonl(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        first = f.readline().strip()
    return first.startswith("{") and first.endswith("}")


def _read_saved_split(folder: Path, where: str) -> list[dict]:
    """One split written by `Dataset.save_to_disk`: arrow stream files listed in state.json."""
    import pyarrow as pa

    state = json.loads((folder / "state.json").read_text())
    rows = []
    for entry in state.get("_data_files", []):
        with pa.memory_map(str(folder / entry["filename"])) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    if not rows and not state.get("_data_files"):
        raise UserError(f"{where}: {folder}/state.json lists no data files")
    return rows


def load_split(dataset: str | None, config: str | None, split: str, where: str) -> list[dict]:
    """Rows of one split. `split` is a local file, or a split name of `dataset` (a save_to_disk folder or a
    datasets hub name, loaded with `datasets.load_dataset(dataset, config)`)."""
    candidate = Path(split)
    if candidate.suffix.lower() in TABLE_SUFFIXES:
        if not candidate.exists():
            raise UserError(f"{where}: file {split} does not exist")
        return _read_table_file(candidate, where)
    if dataset is None:
        raise UserError(f"{where}: {split!r} is neither a data file ({', '.join(TABLE_SUFFIXES)}) nor a split "
                        f"name (set data.dataset to read splits from a dataset)")
    folder = Path(dataset)
    if folder.is_dir():
        if (folder / "state.json").exists():  # a single Dataset: one split
            return _read_saved_split(folder, where)
        if (folder / split / "state.json").exists():  # a DatasetDict
            return _read_saved_split(folder / split, where)
        if candidate.exists():
            return _read_table_file(candidate, where)
        found = sorted(p.name for p in folder.iterdir() if (p / "state.json").exists())
        raise UserError(f"{where}: save_to_disk folder {dataset} has no split {split!r} (found: {found})")
    try:
        import datasets
    except ImportError:
        raise UserError(f"{where}: reading the hub dataset {dataset!r} needs the `datasets` package "
                        f"(pip install datasets) and network access") from None
    try:
        return datasets.load_dataset(dataset, config, split=split).to_list()
    except Exception as err:  # noqa: BLE001 - the hub's errors are many; the user needs the name and reason
        raise UserError(f"{where}: datasets.load_dataset({dataset!r}, {config!r}, split={split!r}) failed: "
                        f"{type(err).__name__}: {err}") from None


def select_columns(rows: list[dict], columns: dict[str, str | None], where: str) -> dict[str, list]:
    """{role: values} for each role mapped to a column; a column absent from the data is a clear error."""
    if not rows:
        raise UserError(f"{where}: no rows")
    out = {}
    for role, column in columns.items():
        if column is None:
            continue
        if column not in rows[0]:
            raise UserError(f"{where}: column {column!r} (key columns.{role}) is not in the data; its columns "
                            f"are {sorted(rows[0])}")
        out[role] = [row[column] for row in rows]
    return out


@dataclass
class BeirData:
    corpus: dict[str, str]  # doc id -> "title text"
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}


def load_beir(folder: str, split: str, where: str) -> BeirData:
    """A BEIR folder: corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/<split>.tsv."""
    root = Path(folder)
    needed = [root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{split}.tsv"]
    for path in needed:
        if not path.exists():
            raise UserError(f"{where}: {path} does not exist (a BEIR folder holds corpus.jsonl, queries.jsonl "
                            f"and qrels/<split>.tsv)")
    corpus = {}
    for row in _read_table_file(needed[0], where):
        title = (row.get("title") or "").strip()
        corpus[str(row["_id"])] = f"{title} {row.get('text', '')}".strip() if title else row.get("text", "")
    queries = {str(row["_id"]): row["text"] for row in _read_table_file(needed[1], where)}
    qrels: dict[str, dict[str, int]] = {}
    with needed[2].open(encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        for number, fields in enumerate(reader, start=1):
            if number == 1 and not fields[-1].lstrip("-").isdigit():
                continue  # header: query-id corpus-id score
            if len(fields) < 3:
                raise UserError(f"{where}: {needed[2]}:{number}: expected query-id, corpus-id, score")
            qrels.setdefault(fields[0], {})[fields[1]] = int(fields[2])
    unknown = [q for q in qrels if q not in queries]
    if unknown:
        raise UserError(f"{where}: {needed[2]} names query {unknown[0]!r}, which queries.jsonl lacks")
    return BeirData(corpus=corpus, queries=queries, qrels=qrels)

"""Real shards for the data-pipeline tests: three sources of real text on this machine, a quickly trained
byte-level BPE, streaming's MDSWriter with the contract-2 columns and prep_meta.json.

Sources: `code` (standard-library modules: long documents, many 1024-token chunks), `prose` (the language
reference topics of pydoc_data), `docstrings` (module docstrings: many short documents).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

SHARD_CHUNK_LEN = 1024  # chunk length the shards are prepared with (the loader re-splits to shorter ones)
SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
REPO_ROOT = Path(__file__).resolve().parents[2]


def _code_documents(limit: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("test"))
    docs = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(text)
        if len(docs) >= limit:
            break
    return docs


def _prose_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics) if topics[key].strip()]


def _docstring_documents(limit: int) -> list[str]:
    import ast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 20:
                    docs.append(doc)
        if len(docs) >= limit:
            break
    return docs[:limit]


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return tok


def write_source(out: Path, name: str, docs: list[str], tok, tokenizer_sha: str, chunk_len: int) -> dict:
    """MDS shards of one source: each document tokenized, split into [CLS] ... [SEP] chunks of <= chunk_len."""
    from streaming import MDSWriter

    vocab = tok.get_vocab_size()
    dtype = "ndarray:uint16" if vocab <= 65536 else "ndarray:uint32"
    columns = {"input_ids": dtype, "doc_id": "int64", "chunk_index": "int32", "source": "str"}
    counts = {"documents": 0, "chunks": 0, "tokens": 0}
    np_dtype = np.uint16 if vocab <= 65536 else np.uint32
    from modernbert_train.data.shards import SHARD_HASH

    with MDSWriter(out=str(out), columns=columns, compression="zstd", size_limit=1 << 17,
                   hashes=[SHARD_HASH]) as writer:
        for doc_id, encoding in enumerate(tok.encode_batch(docs, add_special_tokens=False)):
            body = encoding.ids
            step = chunk_len - 2
            for chunk_index, start in enumerate(range(0, max(len(body), 1), step)):
                ids = np.array([1] + body[start:start + step] + [2], dtype=np_dtype)
                writer.write({"input_ids": ids, "doc_id": doc_id, "chunk_index": chunk_index, "source": name})
                counts["chunks"] += 1
                counts["tokens"] += int(ids.size)
            counts["documents"] += 1
    meta = {"tokenizer_sha256": tokenizer_sha, "vocab_size": vocab, "max_seq_len": chunk_len,
            "special_token_ids": {"cls_id": 1, "sep_id": 2, "pad_id": 3, "mask_id": 4, "unk_id": 0}, **counts}
    (out / "prep_meta.json").write_text(json.dumps(meta, indent=1))
    return meta


@pytest.fixture(scope="session")
def prepared_corpus(tmp_path_factory) -> dict:
    """Tokenizer + three MDS sources (read-only: tests copy them with `corpus_copy`)."""
    root = tmp_path_factory.mktemp("corpus")
    sources = {
        "code": _code_documents(120),
        "prose": _prose_documents(),
        "docstrings": _docstring_documents(1500),
    }
    tok = _train_tokenizer([d for docs in sources.values() for d in docs[:400]], vocab_size=3000)
    tok_path = root / "tokenizer.json"
    tok.save(str(tok_path))
    sha = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    metas = {name: write_source(root / "shards" / name, name, docs, tok, sha, SHARD_CHUNK_LEN)
             for name, docs in sources.items()}
    return {"root": root, "tokenizer": str(tok_path), "meta": metas}


@pytest.fixture
def corpus_copy(prepared_corpus, tmp_path, monkeypatch) -> dict:
    """A private copy of the shards (streaming forbids two live datasets on one folder in one host), and a
    private temp dir for streaming's file locks."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shards = tmp_path / "shards"
    shutil.copytree(prepared_corpus["root"] / "shards", shards)
    return {"shards": shards, "tokenizer": prepared_corpus["tokenizer"], "meta": prepared_corpus["meta"],
            "tmp": tmp_path}


def write_manifest(path: Path, shards: Path, weights: dict[str, dict] | None = None, **top) -> Path:
    import yaml

    weights = weights or {}
    sources = [{"name": name, "local": str(shards / name), **weights.get(name, {})}
               for name in ("code", "prose", "docstrings")]
    path.write_text(yaml.safe_dump({"name": "test-mix", "description": "stdlib code, reference prose, docstrings",
                                    **top, "sources": sources}))
    return path


@pytest.fixture
def python_exe() -> str:
    return sys.executable

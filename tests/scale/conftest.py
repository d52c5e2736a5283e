"""The rehearsal's real services and data: a SLURM cluster on 127.0.0.1 and tiny shards of local text.

These tests start and stop their own daemons (tests/scale/slurm_cluster.py); they skip, naming the reason, only
where slurm-wlm and munge are not installed or cannot run (not root). `make test-scale` installs them first.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from .slurm_cluster import SlurmCluster, missing_reason


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    # Short: munged's socket path must fit a Unix socket name (108 bytes).
    root = Path(tmp_path_factory.mktemp("slurm"))
    with SlurmCluster(root) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def scale_data(tmp_path_factory) -> dict[str, Path]:
    """Shards of the local corpus (stdlib code, Python prose) and a small BPE, as tests/train/conftest.py builds."""
    from data_prep.local_corpus import build_local_corpus
    from data_prep.prepare import PrepareConfig, prepare
    from data_prep.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("scale_data")
    build_local_corpus(root / "corpus", max_bytes=200_000)
    files = sorted(p for p in (root / "corpus").rglob("*") if p.is_file() and p.suffix in (".py", ".jsonl", ".txt"))
    tokenizer = save_tokenizer(train_tokenizer((p.read_text(errors="ignore") for p in files), vocab_size=700,
                                               show_progress=False), root / "tokenizer")
    prose = sorted((root / "corpus" / "prose").glob("*.jsonl"))
    for name, inputs in {"code": [root / "corpus" / "code"], "prose": prose}.items():
        prepare(PrepareConfig(inputs=[str(p) for p in inputs], out=str(root / "shards" / name),
                              tokenizer=str(tokenizer), source=name, format="code" if name == "code" else "auto",
                              max_seq_len=512, progress=False))
    manifest = root / "mix.yaml"
    manifest.write_text("name: mix\nsources:\n" + "".join(
        f"  - name: {s}\n    local: {root / 'shards' / s}\n    proportion: 0.5\n" for s in ("code", "prose")))
    return {"root": root, "manifest": manifest, "tokenizer": tokenizer.parent}

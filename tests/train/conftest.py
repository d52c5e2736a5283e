"""Real local data for the training tests: stdlib code + Python prose, a small BPE, MDS shards, manifests.

Built once per test session (about 10 s) under pytest's temp dir, so streaming gets its own folders.
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    from data_prep.local_corpus import build_local_corpus
    from data_prep.prepare import PrepareConfig, prepare
    from data_prep.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    build_local_corpus(root / "corpus", max_bytes=300_000)
    files = sorted(p for p in (root / "corpus").rglob("*") if p.is_file() and p.suffix in (".py", ".jsonl", ".txt"))
    tokenizer = save_tokenizer(train_tokenizer((p.read_text(errors="ignore") for p in files), vocab_size=700,
                                               show_progress=False), root / "tokenizer")
    prose = sorted((root / "corpus" / "prose").glob("*.jsonl"))
    held_out = [p for p in prose if p.name.startswith("pydoc")]
    sources = {"code": [root / "corpus" / "code"], "prose": [p for p in prose if p not in held_out],
               "heldout": held_out}
    for name, inputs in sources.items():
        prepare(PrepareConfig(inputs=[str(p) for p in inputs], out=str(root / "shards" / name),
                              tokenizer=str(tokenizer), source=name, format="code" if name == "code" else "auto",
                              max_seq_len=512, progress=False))

    def manifest(name: str, weights: dict[str, float]) -> Path:
        lines = [f"name: {name}", "sources:"]
        for source, weight in weights.items():
            lines += [f"  - name: {source}", f"    local: {root / 'shards' / source}", f"    proportion: {weight}"]
        path = root / f"{name}.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    return {"root": root, "tokenizer": tokenizer.parent,
            "mix": manifest("mix", {"code": 0.5, "prose": 0.5}),
            "decay": manifest("decay", {"code": 0.8, "prose": 0.2}),
            "eval": manifest("heldout", {"heldout": 1.0})}


@pytest.fixture(scope="session")
def data_overrides(tiny_data):
    """Recipe overrides that point a tiny recipe at the test data: data_overrides('decay')."""
    def overrides(manifest: str = "mix") -> list[str]:
        return [f"data.manifest={tiny_data[manifest]}", f"data.tokenizer={tiny_data['tokenizer']}",
                "logging.progress_bar=false"]
    return overrides


@pytest.fixture(scope="session")
def trained_tiny_run(tiny_data, data_overrides, tmp_path_factory) -> Path:
    """A tiny phase-1 run of 16 steps with a checkpoint every 4 steps, all kept (ba4, ba8, ba12, ba16)."""
    from modernbert_train.train.recipe import load_recipe
    from modernbert_train.train.trainer import train

    run_dir = tmp_path_factory.mktemp("trained_tiny") / "run"
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "yamls/tiny/phase1.yaml", data_overrides() + [
        f"save_folder={run_dir}", "max_duration=16ba", "checkpoint.interval=4ba", "checkpoint.keep_last=-1",
        "batch_warmup.tokens=2000"])
    train(recipe)
    return run_dir

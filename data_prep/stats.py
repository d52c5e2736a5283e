"""Reading prepared shard folders back: sample iteration, per-source statistics, length histograms.

`iter_samples` reads MDS shards directly (decompressing zstd in memory) so stats and round-trip checks need
neither a StreamingDataset nor its shared memory; column decoding is streaming's own.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

from modernbert_train.errors import UserError


class Histogram:
    """Counts of lengths in power-of-two bins (upper bound b holds lengths in (b/2, b]); the smallest bin is <= 16."""

    MIN_BOUND = 16

    def __init__(self, counts: dict[int, int] | None = None):
        self.counts: dict[int, int] = {int(b): n for b, n in (counts or {}).items()}

    @classmethod
    def bound(cls, length: int) -> int:
        return max(cls.MIN_BOUND, 1 << max(0, int(length) - 1).bit_length())

    def add(self, length: int, n: int = 1) -> None:
        b = self.bound(length)
        self.counts[b] = self.counts.get(b, 0) + n

    def merge(self, other: "Histogram | dict") -> None:
        items = other.counts.items() if isinstance(other, Histogram) else other.items()
        for b, n in items:
            self.counts[int(b)] = self.counts.get(int(b), 0) + n

    def to_json(self) -> dict[str, int]:
        return {str(b): self.counts[b] for b in sorted(self.counts)}

    def total(self) -> int:
        return sum(self.counts.values())

    def render(self, width: int = 40, unit: str = "tokens") -> list[str]:
        if not self.counts:
            return ["    (empty)"]
        peak = max(self.counts.values())
        lines = []
        for b in sorted(self.counts):
            n = self.counts[b]
            lo = b // 2 + 1 if b > self.MIN_BOUND else 1
            bar = "#" * max(1, round(width * n / peak))
            lines.append(f"    {lo:>9,}-{b:<9,} {unit} {n:>12,}  {bar}")
        return lines


def _load_index(folder: Path) -> dict:
    index_file = folder / "index.json"
    if not index_file.is_file():
        hint = " (prepare did not finish: re-run it to resume)" if (folder / "plan.json").is_file() else ""
        raise UserError(f"{folder} has no index.json{hint}")
    return json.loads(index_file.read_text())


def _shard_bytes(folder: Path, shard: dict) -> bytes:
    """Uncompressed bytes of one shard: the raw file if present (streaming may have unpacked it), else unzip."""
    raw = folder / shard["raw_data"]["basename"]
    if raw.is_file():
        return raw.read_bytes()
    zip_info = shard.get("zip_data")
    if not zip_info:
        raise UserError(f"shard {raw} is missing")
    zipped = folder / zip_info["basename"]
    if not zipped.is_file():
        raise UserError(f"shard {zipped} is missing")
    compression = shard.get("compression") or ""
    if not compression.startswith("zstd"):
        from streaming.base.compression import decompress

        return decompress(compression, zipped.read_bytes())
    import zstandard

    return zstandard.ZstdDecompressor().decompress(zipped.read_bytes(), max_output_size=shard["raw_data"]["bytes"])


def iter_samples(folder: str | os.PathLike, progress: bool = False) -> Iterator[dict]:
    """Every sample of an MDS folder in index order, as streaming decodes it."""
    from streaming.base.format import reader_from_json

    from modernbert_train.progress import track

    folder = Path(folder)
    index = _load_index(folder)
    for shard in track(index["shards"], f"scan {folder}", unit="shard", mode=None if progress else "none"):
        reader = reader_from_json(str(folder), None, shard)
        data = _shard_bytes(folder, shard)
        n = shard["samples"]
        offsets = np.frombuffer(data, np.uint32, count=n + 1, offset=4)
        for i in range(n):
            yield reader.decode_sample(data[offsets[i]:offsets[i + 1]])


def read_meta(folder: str | os.PathLike) -> dict:
    meta_file = Path(folder) / "prep_meta.json"
    if not meta_file.is_file():
        raise UserError(f"{folder} has no prep_meta.json (not written by `modernbert-data prepare`, or unfinished)")
    return json.loads(meta_file.read_text())


def scan_folder(folder: str | os.PathLike, progress: bool = False) -> dict:
    """Recount documents, chunks, tokens and histograms from the shards themselves."""
    chunk_hist, doc_hist = Histogram(), Histogram()
    doc_tokens: dict[int, int] = defaultdict(int)
    doc_chunks: dict[int, list[int]] = defaultdict(list)
    chunks = tokens = 0
    sources: set[str] = set()
    for sample in iter_samples(folder, progress):
        ids = sample["input_ids"]
        chunks += 1
        tokens += int(ids.size)
        chunk_hist.add(int(ids.size))
        doc_tokens[int(sample["doc_id"])] += int(ids.size) - 2
        doc_chunks[int(sample["doc_id"])].append(int(sample["chunk_index"]))
        sources.add(sample["source"])
    for count in doc_tokens.values():
        doc_hist.add(count)
    broken = [d for d, ks in doc_chunks.items() if ks != list(range(len(ks)))]
    return {"documents": len(doc_tokens), "chunks": chunks, "tokens": tokens,
            "content_tokens": sum(doc_tokens.values()), "sources": sorted(sources),
            "documents_with_broken_chunk_order": len(broken),
            "length_histograms": {"chunk_tokens": chunk_hist.to_json(), "document_tokens": doc_hist.to_json()}}


def folder_stats(folder: str | os.PathLike, scan: bool = False, progress: bool = False) -> dict:
    meta = read_meta(folder)
    _load_index(Path(folder))
    stats = {"folder": str(folder), "source": meta["source"], "documents": meta["documents"],
             "chunks": meta["chunks"], "tokens": meta["tokens"], "content_tokens": meta["content_tokens"],
             "max_seq_len": meta["max_seq_len"], "vocab_size": meta["vocab_size"],
             "length_histograms": meta["length_histograms"]}
    summary_file = Path(folder) / "prep_summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        stats["read"], stats["skipped"] = summary["read"], summary["skipped"]
    if scan:
        scanned = scan_folder(folder, progress)
        mismatched = [k for k in ("documents", "chunks", "tokens", "content_tokens") if scanned[k] != meta[k]]
        stats["scan"] = scanned
        stats["scan_matches_meta"] = not mismatched and scanned["documents_with_broken_chunk_order"] == 0
        stats["length_histograms"] = scanned["length_histograms"]
    return stats


def format_stats(all_stats: list[dict]) -> str:
    lines = [f"{'source':<16} {'documents':>12} {'chunks':>12} {'tokens':>16} {'tok/doc':>9} {'skipped':>9}  folder"]
    total_tokens = 0
    for s in all_stats:
        per_doc = s["content_tokens"] / max(1, s["documents"])
        skipped = sum(s.get("skipped", {}).values())
        lines.append(f"{s['source']:<16} {s['documents']:>12,} {s['chunks']:>12,} {s['tokens']:>16,} "
                     f"{per_doc:>9,.0f} {skipped:>9,}  {s['folder']}")
        total_tokens += s["tokens"]
    if len(all_stats) > 1:
        lines.append(f"{'total':<16} {'':>12} {'':>12} {total_tokens:>16,}")
    for s in all_stats:
        lines.append("")
        lines.append(f"{s['source']}: document length (content tokens)")
        lines.extend(Histogram(s["length_histograms"]["document_tokens"]).render())
        lines.append(f"{s['source']}: chunk length (tokens incl. [CLS]/[SEP], max {s['max_seq_len']:,})")
        lines.extend(Histogram(s["length_histograms"]["chunk_tokens"]).render())
        if s.get("skipped"):
            lines.append(f"{s['source']}: skipped " + ", ".join(f"{r} {n:,}" for r, n in sorted(s["skipped"].items())))
        if "scan" in s:
            verdict = "matches prep_meta.json" if s["scan_matches_meta"] else "DOES NOT MATCH prep_meta.json"
            lines.append(f"{s['source']}: scan of the shards {verdict}")
    return "\n".join(lines)

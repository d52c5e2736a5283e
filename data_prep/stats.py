"""Reading prepared shard folders back: sample iteration, per-source statistics, length histograms.

`iter_samples` reads MDS shards directly (decompressing zstd in memory) so stats and round-trip checks need
neither a StreamingDataset nor its shared memory; column decoding is streaming's own, and the safety checks
(no pickle columns, shard hashes) are modernbert_train.data.shards'.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from modernbert_train.data import shards as shard_reader
from modernbert_train.common.errors import UserError


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


def iter_samples(folder: str | os.PathLike, progress: bool = False, allow_unsafe_types: bool = False) -> Iterator[dict]:
    """Every sample of an MDS folder in index order: pickle columns refused unless allowed, hashes verified."""
    return shard_reader.iter_samples(folder, progress, allow_unsafe_types)


def read_meta(folder: str | os.PathLike) -> dict:
    meta_file = Path(folder) / "prep_meta.json"
    if not meta_file.is_file():
        raise UserError(f"{folder} has no prep_meta.json (not written by `modernbert-data prepare`, or unfinished)")
    return shard_reader.read_json_file(meta_file)


def scan_folder(folder: str | os.PathLike, progress: bool = False, allow_unsafe_types: bool = False) -> dict:
    """Recount documents, chunks, tokens and histograms from the shards themselves."""
    chunk_hist, doc_hist = Histogram(), Histogram()
    doc_tokens: dict[int, int] = defaultdict(int)
    doc_chunks: dict[int, list[int]] = defaultdict(list)
    chunks = tokens = 0
    sources: set[str] = set()
    for sample in iter_samples(folder, progress, allow_unsafe_types):
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


def folder_stats(folder: str | os.PathLike, scan: bool = False, progress: bool = False,
                 allow_unsafe_types: bool = False) -> dict:
    meta = read_meta(folder)
    shard_reader.check_column_safety(folder, shard_reader.load_index(folder), allow_unsafe_types)
    stats = {"folder": str(folder), "source": meta["source"], "documents": meta["documents"],
             "chunks": meta["chunks"], "tokens": meta["tokens"], "content_tokens": meta["content_tokens"],
             "max_seq_len": meta["max_seq_len"], "vocab_size": meta["vocab_size"],
             "length_histograms": meta["length_histograms"]}
    summary_file = Path(folder) / "prep_summary.json"
    if summary_file.is_file():
        summary = shard_reader.read_json_file(summary_file)
        stats["read"], stats["skipped"] = summary["read"], summary["skipped"]
    if scan:
        scanned = scan_folder(folder, progress, allow_unsafe_types)
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

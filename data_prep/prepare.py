"""`prepare`: raw inputs -> tokenized, chunked MDS shards (contract 2), in parallel, resumable per work unit.

Layout of an output folder (one per source):
    plan.json               settings + work units of the run (what a resume is checked against)
    part-00000/ ...         one folder per work unit: its own MDS index.json, shards, unit_summary.json;
                            each attempt writes its own .tmp-part-00000.<attempt> and renames it when complete,
                            only if no attempt did before, so a part is all or nothing and never mixed
    prep_meta.json          tokenizer hash, vocab, max_seq_len, special ids, documents, chunks, tokens, histograms
    prep_summary.json       every input record accounted: read = written + chunked + skipped (per reason, per file)
    index.json              merged MDS index over all parts, with each shard's hash (written last: its presence
                            means complete)
    .prepare.lock           held (flock) by the prepare writing this folder; names its host and pid
Every bookkeeping file is written to a temporary name and renamed, so none is ever seen half-written.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from data_prep.sources import (DEFAULT_MAX_DOC_BYTES, REASON_POLICY, Document, Problem, WorkUnit, expand_inputs,
                               plan_units, read_unit)
from data_prep.bookkeeping import (INDEX_FILE, META_FILE, PART_PREFIX, PLAN_FILE, SUMMARY_FILE, TMP_PREFIX,
                                   UNIT_SUMMARY_FILE, OutputLock, merged_index, reconcile_output,
                                   refuse_foreign_output, remove_own_entry, write_json_atomic)
from data_prep.stats import Histogram
from data_prep.tokenizer import load_tokenizer, special_token_ids, tokenizer_sha256, vocab_size
from modernbert_train.data.shards import SHARD_HASH
from modernbert_train.common.errors import UserError

LAYOUT_VERSION = 1
POLICIES = ("skip", "fail")
# doc_id = unit index * 2**32 + order of the document inside its unit: unique, deterministic, and assignable
# by each worker without knowing how many documents the units before it hold.
DOC_ID_UNIT_STRIDE = 1 << 32
# Texts handed to one encode_batch call: large enough to amortize the call, small enough to stream.
BATCH_TEXT_BYTES = 4 << 20
BATCH_MAX_DOCS = 4096
MAX_PROBLEMS_KEPT = 20
MIN_AUTO_UNIT_BYTES, MAX_AUTO_UNIT_BYTES = 1 << 20, 64 << 20
DEFAULT_MAX_DOC_MB = DEFAULT_MAX_DOC_BYTES / (1 << 20)


def token_dtype(vocab: int) -> str:
    return "uint16" if vocab <= 65536 else "uint32"


def mds_columns(vocab: int) -> dict[str, str]:
    return {"input_ids": f"ndarray:{token_dtype(vocab)}", "doc_id": "int64", "chunk_index": "int32", "source": "str"}


@dataclass
class PrepareConfig:
    inputs: list[str]
    out: str
    tokenizer: str
    source: str | None = None  # the `source` column and manifest name; default: the --out folder name
    format: str = "auto"
    text_field: str = "text"
    languages: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_seq_len: int = 8192
    workers: int = 1
    on_error: str = "fail"  # malformed json, missing field, invalid UTF-8, unreadable file
    on_binary: str = "skip"  # binary (or undecodable) files met in code/text directories
    overwrite: bool = False
    unit_bytes: int | None = None  # None: reuse the existing plan's, else auto_unit_bytes()
    shard_size_limit: int = 1 << 26
    progress: bool = True
    max_doc_mb: float = DEFAULT_MAX_DOC_MB  # larger documents (jsonl lines, files, parquet cells) follow on_error

    def validate(self) -> None:
        if self.on_error not in POLICIES:
            raise UserError(f"--on-error must be skip or fail, not {self.on_error!r}")
        if self.on_binary not in POLICIES:
            raise UserError(f"--on-binary must be skip or fail, not {self.on_binary!r}")
        if self.max_seq_len < 3:
            raise UserError(f"--max-seq-len {self.max_seq_len} leaves no room for a token between [CLS] and [SEP]")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, not {self.workers}")
        if self.unit_bytes is not None and self.unit_bytes < 1:
            raise UserError("--unit-mb must be positive")
        if not self.inputs:
            raise UserError("prepare needs at least one input file, directory or glob")
        if not self.max_doc_mb > 0:
            raise UserError(f"--max-doc-mb must be positive, not {self.max_doc_mb}")


@dataclass
class UnitResult:
    index: int
    identity: list
    read: int = 0
    written: int = 0  # documents that fit one chunk
    chunked: int = 0  # documents split into several chunks
    skipped: dict = field(default_factory=dict)  # reason -> count
    chunks: int = 0
    tokens: int = 0  # ids in the shards, [CLS]/[SEP] included
    content_tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    files: dict = field(default_factory=dict)  # file -> {read, written, chunked, skipped}; see _file_entry
    problems: list = field(default_factory=list)  # the first MAX_PROBLEMS_KEPT, as text
    chunk_hist: dict = field(default_factory=dict)
    doc_hist: dict = field(default_factory=dict)


def attempt_id() -> str:
    """Unique among every attempt of every unit on every machine writing one --out."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class _Stopped(Exception):
    """Another worker failed; this one abandons its unit."""


def _file_entry(result: UnitResult, path: str) -> dict:
    entry = result.files.get(path)
    if entry is None:
        entry = result.files[path] = {"read": 0, "written": 0, "chunked": 0, "skipped": {}}
    return entry


class UnitWriter:
    """Tokenizes the records of one work unit and writes them as one MDS part folder."""

    def __init__(self, tok, specials, settings: dict, out: Path, report: Callable[[int, int], None],
                 should_stop: Callable[[], bool] = lambda: False):
        self.tok, self.specials, self.settings, self.out = tok, specials, settings, out
        self.report, self.should_stop = report, should_stop
        self.dtype = np.dtype(settings["dtype"])
        self.content_len = settings["max_seq_len"] - 2

    def run(self, unit: WorkUnit) -> dict:
        from streaming import MDSWriter

        start = time.perf_counter()
        result = UnitResult(index=unit.index, identity=unit.identity)
        chunk_hist, doc_hist = Histogram(), Histogram()
        # Two attempts of one unit can run at once (Spark speculation, a retry while a lost executor still
        # runs): each writes its own folder, so neither deletes or mixes into the other's files.
        tmp = self.out / f"{TMP_PREFIX}{unit.index:05d}.{attempt_id()}"
        final = self.out / f"{PART_PREFIX}{unit.index:05d}"
        self.published = False
        batch: list[Document] = []
        batch_bytes = 0
        pending_progress = 0
        try:
            with MDSWriter(out=str(tmp), columns=mds_columns(self.settings["vocab_size"]), compression="zstd",
                           hashes=[SHARD_HASH], size_limit=self.settings["shard_size_limit"]) as writer:
                for item in read_unit(unit, self.settings["text_field"], self.settings["max_doc_bytes"]):
                    result.read += 1
                    result.input_bytes += item.consumed
                    pending_progress += item.consumed
                    entry = _file_entry(result, item.file)
                    entry["read"] += 1
                    if isinstance(item, Problem):
                        self._handle_problem(item, result, entry)
                        continue
                    batch.append(item)
                    batch_bytes += len(item.text)
                    if batch_bytes >= BATCH_TEXT_BYTES or len(batch) >= BATCH_MAX_DOCS:
                        self._write_batch(batch, writer, result, chunk_hist, doc_hist, pending_progress)
                        batch, batch_bytes, pending_progress = [], 0, 0
                self._write_batch(batch, writer, result, chunk_hist, doc_hist, pending_progress)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        result.seconds = time.perf_counter() - start
        result.chunk_hist, result.doc_hist = chunk_hist.to_json(), doc_hist.to_json()
        # Code/text sources can hold millions of files: keep per-file entries only where something was skipped.
        if unit.kind in ("text", "code"):
            result.files = {f: e for f, e in result.files.items() if e["skipped"]}
        summary = asdict(result)
        write_json_atomic(tmp / UNIT_SUMMARY_FILE, summary)
        return self._publish(tmp, final, summary)

    def _publish(self, tmp: Path, final: Path, summary: dict) -> dict:
        """Rename this attempt's folder to the part, unless another attempt's complete part is there already
        (a rename onto a non-empty folder fails atomically): then this attempt's copy goes, theirs stays."""
        try:
            os.rename(tmp, final)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (final / UNIT_SUMMARY_FILE).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # this attempt's own folder (attempt-unique name)
            return json.loads((final / UNIT_SUMMARY_FILE).read_text())
        self.published = True
        return json.loads(json.dumps(summary))  # as a reader of unit_summary.json (or the losing attempt) sees it

    def _handle_problem(self, problem: Problem, result: UnitResult, entry: dict) -> None:
        policy = REASON_POLICY[problem.reason]
        if policy != "always_skip" and self.settings["policies"][policy] == "fail":
            flag = "--on-error" if policy == "on_error" else "--on-binary"
            raise UserError(f"{problem.describe()} (pass {flag} skip to skip and count such records)")
        result.skipped[problem.reason] = result.skipped.get(problem.reason, 0) + 1
        entry["skipped"][problem.reason] = entry["skipped"].get(problem.reason, 0) + 1
        if len(result.problems) < MAX_PROBLEMS_KEPT:
            result.problems.append(problem.describe())

    def _write_batch(self, batch: list[Document], writer, result: UnitResult, chunk_hist: "Histogram",
                     doc_hist: "Histogram", progress_bytes: int) -> None:
        if self.should_stop():
            raise _Stopped()
        tokens_before = result.tokens
        if batch:
            encodings = self.tok.encode_batch_fast([doc.text for doc in batch], add_special_tokens=False)
            source = self.settings["source"]
            cls_id, sep_id = self.specials.cls_id, self.specials.sep_id
            for doc, encoding in zip(batch, encodings):
                ids = np.asarray(encoding.ids, dtype=self.dtype)
                entry = result.files[doc.file]
                if ids.size == 0:
                    self._handle_problem(Problem("empty", doc.file, doc.line, "text encodes to no tokens"),
                                         result, entry)
                    continue
                doc_id = result.index * DOC_ID_UNIT_STRIDE + result.written + result.chunked
                n_chunks = -(-ids.size // self.content_len)
                for k in range(n_chunks):
                    piece = ids[k * self.content_len:(k + 1) * self.content_len]
                    chunk = np.empty(piece.size + 2, dtype=self.dtype)
                    chunk[0], chunk[1:-1], chunk[-1] = cls_id, piece, sep_id
                    writer.write({"input_ids": chunk, "doc_id": doc_id, "chunk_index": k, "source": source})
                    chunk_hist.add(chunk.size)
                result.chunks += n_chunks
                result.tokens += ids.size + 2 * n_chunks
                result.content_tokens += ids.size
                doc_hist.add(int(ids.size))
                kind = "written" if n_chunks == 1 else "chunked"
                setattr(result, kind, getattr(result, kind) + 1)
                entry[kind] += 1
        self.report(progress_bytes, result.tokens - tokens_before)


# ------------------------------------------------------------------------------------------ worker processes

_WORKER: dict = {}
# fork starts workers in milliseconds with streaming already imported (spawn re-imports torch: seconds per
# worker). It is safe here because workers never use tokenizers' thread pool (TOKENIZERS_PARALLELISM=false,
# and tokenizers disables a pool inherited across fork); elsewhere spawn is the only choice.
START_METHOD = "fork" if sys.platform == "linux" else "spawn"


def _init_worker(tokenizer_path: str, settings: dict, out: str, queue, stop_event) -> None:
    # Each worker is one core: tokenizers' own thread pool would oversubscribe the machine.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tokenizer_path)
    tok.encode_special_tokens = True  # "[MASK]" written in a document is text, never the mask id
    _WORKER["writer"] = UnitWriter(tok, special_token_ids(tok, tokenizer_path), settings, Path(out),
                                   report=lambda b, t: queue.put((b, t)), should_stop=stop_event.is_set)


def _run_unit_in_worker(unit_json: dict) -> dict:
    return _WORKER["writer"].run(WorkUnit(**unit_json))


def _describe_units(units: list[WorkUnit]) -> str:
    parts = []
    for unit in units:
        files = ", ".join(unit.files[:3]) + (f" and {len(unit.files) - 3} more files" if len(unit.files) > 3 else "")
        parts.append(f"work unit {unit.index} ({files})")
    return ("one of " if len(parts) > 1 else "") + "; ".join(parts)


def _units_in_progress(out: Path, units_by_index: dict[int, WorkUnit]) -> list[WorkUnit]:
    """Units whose .tmp-part folder exists: begun, neither finished (renamed) nor cleaned up after an error.

    A killed worker cleans up nothing, so its unit is among these (the pool stops the others mid-unit too).
    """
    found = []
    for path in out.glob(f"{TMP_PREFIX}*"):
        index = int(path.name[len(TMP_PREFIX):].split(".")[0])
        if index in units_by_index:
            found.append(units_by_index[index])
    return sorted(found, key=lambda u: u.index)


class _Progress:
    """Input bytes done and tokens written: a bar on a terminal, else a line every few seconds with an ETA."""

    def __init__(self, total_bytes: int, enabled: bool, desc: str):
        from modernbert_train.common.progress import Progress

        self.progress = Progress(desc, total_bytes, "B", mode=None if enabled else "none")

    def update(self, nbytes: int, ntokens: int) -> None:
        self.progress.update(nbytes, tok=ntokens)

    def close(self) -> None:
        self.progress.close()


def _part_done(summary: dict, out: Path, hooks) -> dict:
    if hooks is not None:
        hooks.on_unit_done(out / f"{PART_PREFIX}{summary['index']:05d}")
    return summary


def _run_in_process(units: list[WorkUnit], tok, settings: dict, out: Path, progress: _Progress,
                    hooks=None) -> list[dict]:
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # same one-core-per-worker rule as the pool
    try:
        writer = UnitWriter(tok, special_token_ids(tok), settings, out, report=progress.update)
        return [_part_done(writer.run(unit), out, hooks) for unit in units]
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _run_in_pool(units: list[WorkUnit], workers: int, tokenizer_path: str, settings: dict, out: Path,
                 progress: _Progress, hooks=None) -> list[dict]:
    import multiprocessing as mp
    import queue as queue_module
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context(START_METHOD)
    progress_queue, stop_event = ctx.Queue(), ctx.Event()
    results: list[dict] = []

    def drain() -> None:
        while True:
            try:
                progress.update(*progress_queue.get_nowait())
            except queue_module.Empty:
                return

    import streaming  # noqa: F401 - imported once here so forked workers start with it loaded

    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(tokenizer_path, settings, str(out), progress_queue, stop_event)) as pool:
        units_by_index = {unit.index: unit for unit in units}
        pending = {pool.submit(_run_unit_in_worker, unit.to_json()) for unit in units}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                drain()
                for future in done:
                    try:
                        results.append(_part_done(future.result(), out, hooks))  # re-raises a worker's UserError
                    except BrokenProcessPool:
                        running = _units_in_progress(out, units_by_index)
                        raise UserError(
                            f"a prepare worker died (killed, e.g. by the out-of-memory killer) while preparing "
                            f"{_describe_units(running) or 'a work unit'}; lower --max-doc-mb or --workers, or "
                            f"--exclude the file") from None
        except BaseException:
            stop_event.set()
            for future in pending:
                future.cancel()
            raise
        finally:
            drain()
    return results


# ----------------------------------------------------------------------------------------------- prepare

def _sum_counts(summaries: list[dict]) -> dict:
    totals = {"read": 0, "written": 0, "chunked": 0, "skipped": {}, "chunks": 0, "tokens": 0,
              "content_tokens": 0, "input_bytes": 0}
    for s in summaries:
        for key in ("read", "written", "chunked", "chunks", "tokens", "content_tokens", "input_bytes"):
            totals[key] += s[key]
        for reason, n in s["skipped"].items():
            totals["skipped"][reason] = totals["skipped"].get(reason, 0) + n
    return totals


def _merge_files(summaries: list[dict]) -> dict:
    files: dict = {}
    for s in summaries:
        for path, entry in s["files"].items():
            merged = files.setdefault(path, {"read": 0, "written": 0, "chunked": 0, "skipped": {}})
            for key in ("read", "written", "chunked"):
                merged[key] += entry[key]
            for reason, n in entry["skipped"].items():
                merged["skipped"][reason] = merged["skipped"].get(reason, 0) + n
    return files


def auto_unit_bytes(files: list[str], workers: int) -> int:
    """About 4 units per worker (so all workers stay busy to the end), between 1 MiB and 64 MiB."""
    total = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    return int(min(MAX_AUTO_UNIT_BYTES, max(MIN_AUTO_UNIT_BYTES, total // (4 * workers))))


def _previous_unit_bytes(out: Path) -> int | None:
    """A resumed run keeps the unit size it was planned with, whatever --workers is now."""
    try:
        return int(json.loads((out / PLAN_FILE).read_text())["settings"]["unit_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare(cfg: PrepareConfig, hooks=None) -> dict:
    """Run (or resume) one source's preparation; return the summary also written to prep_summary.json.

    Holds --out's lock throughout, so a second prepare on the same folder is refused rather than deleting
    this one's work in progress.

    hooks (optional): on_start() once the output is marked incomplete, on_unit_done(part folder) as each work
    unit finishes, on_finish() after the index and metadata are written (data_prep/remote.py uploads with them);
    run_units(units, settings, out) -> summaries, when present, runs the units instead of the local pool
    (data_prep/distributed.py hands them to Spark).
    """
    cfg.validate()
    out = Path(cfg.out)
    refuse_foreign_output(out)  # before the lock file is created in it
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        return _prepare_locked(cfg, hooks)


def _remove_abandoned_attempts(out: Path) -> None:
    """Every unit is published: what is left of attempts that died (a killed worker, a lost executor) goes,
    through the guard. One still writing (a lost executor that lives on) may race the removal: it then finds
    its part published, or its folder gone, and ends; either way the published part is whole."""
    for path in out.glob(f"{TMP_PREFIX}*"):
        try:
            remove_own_entry(path, "--out's temporary part")
        except OSError:
            continue


def _completed_summary(out: Path) -> dict | None:
    """prep_summary.json of a complete output (index.json present), or None if incomplete or unreadable."""
    if not (out / INDEX_FILE).is_file():
        return None
    try:
        return json.loads((out / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None  # a finished run's summary lost: the final steps run again and rewrite it


def _prepare_locked(cfg: PrepareConfig, hooks=None) -> dict:
    tok = load_tokenizer(cfg.tokenizer)
    tok.encode_special_tokens = True  # "[MASK]" written in a document is text, never the mask id
    specials = special_token_ids(tok, cfg.tokenizer)
    vocab = vocab_size(tok)
    out = Path(cfg.out)
    source = cfg.source or out.resolve().name
    settings = {
        "layout_version": LAYOUT_VERSION, "source": source, "tokenizer_sha256": tokenizer_sha256(cfg.tokenizer),
        "vocab_size": vocab, "dtype": token_dtype(vocab), "max_seq_len": cfg.max_seq_len,
        "special_token_ids": specials.as_dict(), "format": cfg.format, "text_field": cfg.text_field,
        "shard_size_limit": cfg.shard_size_limit,
    }
    # --out inside an input folder: its shards and bookkeeping are never inputs.
    files = expand_inputs(cfg.inputs, cfg.format, cfg.languages, cfg.extensions, cfg.exclude, skip_dirs=(out,))
    settings["unit_bytes"] = (cfg.unit_bytes or (None if cfg.overwrite else _previous_unit_bytes(out))
                              or auto_unit_bytes(files, cfg.workers))
    units = plan_units(files, cfg.format, settings["unit_bytes"])
    kept = reconcile_output(out, settings, units, cfg.overwrite)
    todo = [u for u in units if u.index not in kept]
    summary = _completed_summary(out) if not todo else None
    if summary is not None:
        summary["this_run"] = {"units_done": 0, "units_kept": len(kept), "note": "already complete"}
        return summary
    for name in (INDEX_FILE, META_FILE, SUMMARY_FILE):
        (out / name).unlink(missing_ok=True)  # the folder is incomplete until the end of this run
    plan = {"settings": settings, "inputs": files, "units": [u.to_json() for u in units]}
    write_json_atomic(out / PLAN_FILE, plan, indent=1)
    if hooks is not None:
        hooks.on_start()

    run_settings = dict(settings, policies={"on_error": cfg.on_error, "on_binary": cfg.on_binary},
                        max_doc_bytes=int(cfg.max_doc_mb * (1 << 20)))
    progress = _Progress(sum(u.size for u in todo), cfg.progress, desc=f"prepare {source}")
    start = time.perf_counter()
    try:
        if hooks is not None and getattr(hooks, "run_units", None) is not None:
            # A distributed engine runs the units (data_prep/distributed.py); same writer, same parts.
            new = [_part_done(s, out, hooks) for s in hooks.run_units(todo, run_settings, out)]
        elif cfg.workers == 1 or len(todo) <= 1:
            new = _run_in_process(todo, tok, run_settings, out, progress, hooks)
        else:
            new = _run_in_pool(todo, min(cfg.workers, len(todo)), cfg.tokenizer, run_settings, out, progress, hooks)
    except UserError as err:
        finished = sum(1 for p in out.iterdir() if p.name.startswith(PART_PREFIX))
        raise UserError(f"{err}. {finished} of {len(units)} work units are finished and kept in {out}; "
                        f"re-run the same command to resume") from None
    finally:
        progress.close()
    elapsed = time.perf_counter() - start
    _remove_abandoned_attempts(out)

    summaries = sorted(list(kept.values()) + new, key=lambda s: s["index"])
    totals = _sum_counts(summaries)
    accounted = totals["written"] + totals["chunked"] + sum(totals["skipped"].values())
    if accounted != totals["read"]:
        raise RuntimeError(f"accounting bug: read {totals['read']} but accounted {accounted}")
    index = merged_index(out, len(units))
    samples = sum(s["samples"] for s in index["shards"])
    if samples != totals["chunks"]:
        raise RuntimeError(f"index lists {samples} samples but {totals['chunks']} chunks were written")

    chunk_hist, doc_hist = Histogram(), Histogram()
    for s in summaries:
        chunk_hist.merge(s["chunk_hist"])
        doc_hist.merge(s["doc_hist"])
    new_tokens = sum(s["tokens"] for s in new)
    meta = dict(
        settings, documents=totals["written"] + totals["chunked"], chunks=totals["chunks"], tokens=totals["tokens"],
        content_tokens=totals["content_tokens"], tokenizer_path=str(cfg.tokenizer),
        tokens_count="all ids in the shards, [CLS] and [SEP] of every chunk included",
        doc_id_scheme=f"unit index * {DOC_ID_UNIT_STRIDE} + document order within the unit",
        input_files=len(files), units=len(units),
        length_histograms={"chunk_tokens": chunk_hist.to_json(), "document_tokens": doc_hist.to_json()},
    )
    write_json_atomic(out / META_FILE, meta, indent=1)
    problems = [p for s in summaries for p in s["problems"]]
    summary = {
        "source": source, **{k: totals[k] for k in ("read", "written", "chunked", "skipped")},
        "documents": meta["documents"], "chunks": totals["chunks"], "tokens": totals["tokens"],
        "input_bytes": totals["input_bytes"], "input_files": len(files), "units": len(units),
        "problems": problems[:200], "files": _merge_files(summaries),
        "this_run": {"units_done": len(new), "units_kept": len(kept), "seconds": round(elapsed, 3),
                     "tokens": new_tokens, "tokens_per_s": round(new_tokens / max(elapsed, 1e-9), 1),
                     "workers": cfg.workers},
    }
    write_json_atomic(out / SUMMARY_FILE, summary, indent=1)
    write_json_atomic(out / INDEX_FILE, index)  # the completion marker: last
    if hooks is not None:
        hooks.on_finish()
    return summary


def format_summary(summary: dict) -> str:
    """Human-readable accounting printed at the end of `prepare`."""
    skipped = summary["skipped"]
    run = summary["this_run"]
    lines = [
        f"source {summary['source']}: {summary['documents']:,} documents -> {summary['chunks']:,} chunks, "
        f"{summary['tokens']:,} tokens from {summary['input_files']:,} files ({summary['units']} work units; "
        f"this run: {run['units_done']} done, {run['units_kept']} kept)",
        f"  read {summary['read']:,} = written {summary['written']:,} + chunked {summary['chunked']:,} "
        f"+ skipped {sum(skipped.values()):,}" + (
            f" ({', '.join(f'{r} {n:,}' for r, n in sorted(skipped.items()))})" if skipped else ""),
    ]
    if run.get("tokens"):
        lines.append(f"  {run['tokens_per_s'] / 1e3:,.1f}k tokens/s over {run['seconds']:.1f}s "
                     f"with {run['workers']} worker(s)")
    for problem in summary["problems"][:10]:
        lines.append(f"  skipped {problem}")
    if len(summary["problems"]) > 10:
        lines.append(f"  ... see prep_summary.json for all {sum(skipped.values()):,} skipped records")
    return "\n".join(lines)

"""`prepare --engine spark`: Apache Spark schedules prepare's own deterministic work units.

The driver plans the units exactly as a single-machine `prepare` does (same plan.json, same doc ids); each
unit becomes one Spark task that runs the same `UnitWriter` and writes one part folder (as
.tmp-part-N.<attempt>, renamed when complete). Spark retries a failed or killed task (spark.task.maxFailures, or
local[N,F]) and may run a second attempt beside a slow one (speculation): every attempt writes its own temporary
folder and publishes it only if no attempt has, so no document is written twice or lost and no part is mixed. The driver
then merges the parts exactly as `prepare` does: output, prep_meta.json and stats equal the single-machine run.

--out must be visible to every executor (a shared filesystem); with an object-store --out, --staging must be.
With an object-store --out each task uploads the part it wrote as soon as it is complete (shards, the part's
index.json, unit_summary.json last; credentials from the executor's environment, as on the driver) and frees
its shards on --staging; the driver only uploads plan.json at the start and the metadata and index.json at
the end. A part left on --staging un-uploaded (its task died after finishing it) is uploaded on the resume.
Bad input keeps prepare's contract: a UserError in a task (`file:line: reason`) is not retried but returned
to the driver, which stops with that line and keeps the finished parts for a resume.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from modernbert_train.common.errors import UserError

DEFAULT_MAX_FAILURES = 4  # attempts per task, as spark.task.maxFailures counts them
# Environment variables streaming's storage clients read (credentials, endpoints, profiles).
STORAGE_ENV_PREFIXES = ("AWS_", "S3_", "GOOGLE_", "GCS_", "OCI_", "AZURE_", "HF_", "DATABRICKS_")
_TOKENIZERS: dict = {}  # per Python worker: loading the tokenizer once per worker, not per task
_REMOTE_OUTPUTS: dict = {}  # per Python worker: one storage client per (remote, staging)


def local_master(workers: int, max_failures: int = DEFAULT_MAX_FAILURES) -> str:
    """Spark's local mode with retries (plain local[N] never retries a task)."""
    return f"local[{workers},{max_failures}]"


def _upload_part(remote: str, staging: str, part: Path) -> None:
    from data_prep.remote import RemoteOutput

    if (remote, staging) not in _REMOTE_OUTPUTS:
        _REMOTE_OUTPUTS[remote, staging] = RemoteOutput(remote, Path(staging))
    _REMOTE_OUTPUTS[remote, staging].upload_part(part)


def _run_unit(unit_json: dict, tokenizer_path: str, settings: dict, out: str,
              report: Callable[[int, int], None] | None, remote: str | None = None) -> dict:
    """One Spark task: the unit's part folder (uploaded to `remote` if given), or {"error": line} for bad input
    or an upload that failed past its retries (not worth a retry of the whole unit)."""
    from data_prep.bookkeeping import PART_PREFIX
    from data_prep.prepare import UnitWriter
    from data_prep.sources import WorkUnit
    from data_prep.tokenizer import load_tokenizer, special_token_ids

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per task, as in prepare's pool
    if tokenizer_path not in _TOKENIZERS:
        tok = load_tokenizer(tokenizer_path)
        tok.encode_special_tokens = True  # "[MASK]" written in a document is text, never the mask id
        _TOKENIZERS[tokenizer_path] = (tok, special_token_ids(tok, tokenizer_path))
    tok, specials = _TOKENIZERS[tokenizer_path]
    writer = UnitWriter(tok, specials, settings, Path(out), report=report or (lambda nbytes, ntokens: None))
    try:
        summary = writer.run(WorkUnit(**unit_json))
        if remote is not None and writer.published:  # the attempt that published the part uploads it
            _upload_part(remote, out, Path(out) / f"{PART_PREFIX}{summary['index']:05d}")
        return summary
    except UserError as err:
        return {"error": str(err), "index": unit_json["index"]}


class SparkEngine:
    """prepare hooks whose run_units hands the work units to Spark (other hooks go to `inner`, if any).

    master: a Spark master URL (local[N,F], spark://host:7077, yarn, k8s://...), or None to use the active
    session (Databricks, spark-submit). report: progress callback run inside each task (bytes, tokens).
    remote: the object-store URL each task uploads its finished part to (then `inner` gets no on_unit_done).
    """

    def __init__(self, master: str | None, tokenizer: str, inner=None, report=None, app_name="modernbert-prepare",
                 remote: str | None = None):
        self.master, self.tokenizer, self.inner, self.report, self.app_name = master, tokenizer, inner, report, app_name
        self.remote = remote

    def on_start(self) -> None:
        if self.inner is not None:
            self.inner.on_start()

    def on_unit_done(self, part: Path) -> None:
        if self.inner is not None and self.remote is None:  # else the task has uploaded the part already
            self.inner.on_unit_done(part)

    def on_finish(self) -> None:
        if self.inner is not None:
            if self.remote is not None:  # a part whose publishing attempt died before its upload finished
                self.inner.output.upload_unuploaded_parts()
            self.inner.on_finish()

    def _session(self):
        try:
            from pyspark.sql import SparkSession
        except ImportError as err:
            raise UserError("--engine spark needs pyspark (pip install 'modernbert-train[spark]') and Java 17+")\
                from err
        # Workers fork from a daemon that has streaming imported already (data_prep/spark_daemon.py).
        builder = SparkSession.builder.appName(self.app_name).config("spark.python.daemon.module",
                                                                     "data_prep.spark_daemon")
        if self.master:
            builder = builder.master(self.master)
            if self.master.startswith("local"):
                # Workers are this interpreter (with this project importable), bound to this machine only.
                os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
                builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.ui.enabled", "false")
        active = SparkSession.getActiveSession()
        return builder.getOrCreate(), active is None

    def run_units(self, units, settings: dict, out: Path) -> list[dict]:
        if not units:
            return []
        session, owned = self._session()
        try:
            from functools import partial

            task = partial(_run_unit, tokenizer_path=str(self.tokenizer), settings=settings, out=str(out),
                           report=self.report, remote=self.remote)
            if self.master and self.master.startswith("local"):
                # Local workers fork from a JVM that may have started before this process's storage variables
                # were set (an earlier job in the same process): hand them the current ones with each task.
                session.sparkContext.environment.update(
                    {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)})
            rdd = session.sparkContext.parallelize([u.to_json() for u in units], numSlices=len(units))
            results = rdd.map(task).collect()
        finally:
            if owned:
                session.stop()
        errors = sorted((r for r in results if "error" in r), key=lambda r: r["index"])
        if errors:
            raise UserError(errors[0]["error"])
        return results


def prepare_on_spark(cfg, master: str | None, staging: str | None = None, report=None) -> dict:
    """`prepare` (local folder or object store) with Spark running the work units."""
    from data_prep.prepare import prepare
    from data_prep.remote import is_remote, prepare_remote

    if is_remote(cfg.out):
        return prepare_remote(cfg, staging, engine=lambda inner: SparkEngine(master, cfg.tokenizer, inner, report,
                                                                             remote=cfg.out.rstrip("/")))
    return prepare(cfg, hooks=SparkEngine(master, cfg.tokenizer, None, report))

"""`prepare --engine spark` in Spark's local mode (2 cores, 4 attempts per task) on real local data.

A Python worker is SIGKILLed in the middle of a work unit; Spark retries the task and the output still equals
the single-machine `prepare`'s sample for sample (same documents, chunks, tokens, prep_meta/prep_summary counts).
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from data_prep.cli import main as data_cli
from data_prep.distributed import local_master, prepare_on_spark
from data_prep.prepare import PrepareConfig
from data_prep.stats import iter_samples

from .conftest import run_prepare

pytestmark = pytest.mark.slow
UNIT_BYTES = 60_000


def _kill_first_task_once(marker: str):
    """Progress callback run inside Spark tasks: the first task to report kills its own worker process."""
    def report(nbytes: int, ntokens: int) -> None:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)  # mid-unit: its .tmp-part folder is half written
    return report


def _samples(folder):
    return [(s["doc_id"], s["chunk_index"], s["source"], s["input_ids"].tolist()) for s in iter_samples(folder)]


def test_spark_output_equals_single_machine_prepare_despite_a_killed_worker(local_corpus, trained_tokenizer_dir,
                                                                            tmp_path):
    inputs = [local_corpus / "code", local_corpus / "prose"]
    single = tmp_path / "single"
    run_prepare(inputs, single, trained_tokenizer_dir, max_seq_len=512, unit_bytes=UNIT_BYTES, source="mix")

    marker = tmp_path / "killed-once"
    spark_out = tmp_path / "spark"
    cfg = PrepareConfig(inputs=[str(i) for i in inputs], out=str(spark_out), tokenizer=str(trained_tokenizer_dir),
                        max_seq_len=512, unit_bytes=UNIT_BYTES, source="mix", workers=2, progress=False)
    summary = prepare_on_spark(cfg, local_master(2), report=_kill_first_task_once(str(marker)))
    assert marker.exists()  # a worker really died mid-task

    assert summary["units"] > 4 and summary["this_run"]["units_done"] == summary["units"]
    assert _samples(spark_out) == _samples(single)  # no duplicate, nothing lost, same order and doc ids
    got = json.loads((spark_out / "prep_meta.json").read_text())
    want = json.loads((single / "prep_meta.json").read_text())
    for key in ("documents", "chunks", "tokens", "content_tokens", "length_histograms", "units", "input_files"):
        assert got[key] == want[key], key
    got_summary = json.loads((spark_out / "prep_summary.json").read_text())
    want_summary = json.loads((single / "prep_summary.json").read_text())
    for key in ("read", "written", "chunked", "skipped", "documents", "files"):
        assert got_summary[key] == want_summary[key], key
    assert not [p for p in spark_out.iterdir() if p.name.startswith(".tmp-part-")]


def test_spark_bad_input_is_one_line_with_file_and_line_and_keeps_finished_parts(local_corpus, trained_tokenizer_dir,
                                                                                tmp_path, capsys):
    good, bad = tmp_path / "in" / "a_good.jsonl", tmp_path / "in" / "b_bad.jsonl"
    good.parent.mkdir()
    good.write_text((local_corpus / "prose").joinpath(sorted(os.listdir(local_corpus / "prose"))[0]).read_text())
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    args = ["prepare", str(good.parent), "--tokenizer", str(trained_tokenizer_dir), "--out", str(tmp_path / "out"),
            "--engine", "spark", "--workers", "2", "--unit-mb", "0.05", "--no-progress"]
    assert data_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:2:" in err[0] and "re-run the same command to resume" in err[0]
    finished = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("part-")]
    assert finished  # the good file's units are kept for the resume
    assert data_cli(args + ["--on-error", "skip"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_cluster_recipe_dry_run_submits_prepare_on_the_active_session():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DRY_RUN="1", SPARK_MASTER="spark://head:7077", NUM_EXECUTORS="16", EXECUTOR_CORES="64",
               PYTHON=sys.executable)
    out = subprocess.run([str(repo / "launch" / "spark_prepare.sh"), "raw/web", "--tokenizer", "tok", "--out",
                          "s3://corpus/web"], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("spark-submit --master spark://head:7077 --num-executors 16 --executor-cores 64")
    assert "data_prep/cli.py prepare raw/web --tokenizer tok --out s3://corpus/web --engine spark " \
           "--spark-master active --workers 1024" in out


def _see_uploaded_part_from_a_task(marker: str, endpoint: str, bucket: str):
    """Progress callback run inside Spark tasks: records when a task sees a complete part already in the bucket
    (so parts are uploaded while other tasks still run, not by the driver after all of them)."""
    def report(nbytes: int, ntokens: int) -> None:
        import boto3

        if os.path.exists(marker):
            return
        listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
        if any(o["Key"].endswith("/unit_summary.json") for o in listing.get("Contents", [])):
            open(marker, "w").close()
    return report


def test_spark_tasks_upload_their_parts_to_s3_and_the_output_equals_a_local_prepare(
        s3_server, local_corpus, trained_tokenizer_dir, tmp_path, monkeypatch):
    from data_prep.remote import RemoteOutput, fetch_metadata

    client, bucket = s3_server.client(), "spark-remote"
    out = s3_server.bucket(bucket) + "/mix"
    driver_uploads = []  # the driver must upload no part itself (Spark's Python workers are other processes)
    monkeypatch.setattr(RemoteOutput, "upload_part", lambda self, part: driver_uploads.append(part.name))
    marker = tmp_path / "saw-an-uploaded-part"
    staging = tmp_path / "staging"
    inputs = [local_corpus / "prose"]
    cfg = PrepareConfig(inputs=[str(i) for i in inputs], out=out, tokenizer=str(trained_tokenizer_dir),
                        max_seq_len=256, unit_bytes=UNIT_BYTES, source="mix", workers=2, progress=False)
    summary = prepare_on_spark(cfg, local_master(2), staging=str(staging),
                               report=_see_uploaded_part_from_a_task(str(marker), s3_server.endpoint, bucket))
    assert summary["units"] > 3 and driver_uploads == []
    assert marker.exists()  # a task saw another task's part complete in the bucket

    keys = [o["Key"] for p in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="mix/")
            for o in p.get("Contents", [])]
    assert {k.split("/")[1] for k in keys if k.endswith("/unit_summary.json")} == \
        {f"part-{i:05d}" for i in range(summary["units"])}
    assert not list(staging.rglob("*.mds*"))  # every finished part's shards were freed on --staging

    local = tmp_path / "local"
    run_prepare(inputs, local, trained_tokenizer_dir, max_seq_len=256, unit_bytes=UNIT_BYTES, source="mix")
    remote_copy = fetch_metadata(out, tmp_path / "fetched", with_shards=True)
    assert _samples(remote_copy) == _samples(local)
    got = json.loads((remote_copy / "prep_meta.json").read_text())
    want = json.loads((local / "prep_meta.json").read_text())
    for key in ("documents", "chunks", "tokens", "content_tokens", "length_histograms", "units"):
        assert got[key] == want[key], key

    # Resume from a fresh --staging after losing one part and the index: only that part is redone and uploaded.
    lost = [k for k in keys if k.startswith("mix/part-00002/")] + ["mix/index.json"]
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in lost]})
    stamps = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    time.sleep(1.1)  # S3 LastModified has one-second resolution: a re-upload would show
    resumed = prepare_on_spark(cfg, local_master(2), staging=str(tmp_path / "staging2"))
    assert (resumed["this_run"]["units_done"], resumed["this_run"]["units_kept"]) == (1, summary["units"] - 1)
    after = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {k: after[k] for k in stamps if k.startswith("mix/part-")} == \
        {k: v for k, v in stamps.items() if k.startswith("mix/part-")}
    assert set(after) >= set(keys) and driver_uploads == []
    assert _samples(fetch_metadata(out, tmp_path / "fetched2", with_shards=True)) == _samples(local)

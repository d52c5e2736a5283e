"""`prepare --out s3://...` and `stats s3://...` against a real S3-protocol server (moto) on 127.0.0.1.

The prepare run is killed with SIGKILL after some parts are uploaded; the remote then has no index.json (readers
never see a half-written source), and the re-run uploads only the missing parts. The result equals a local
prepare of the same inputs sample for sample.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.cli import main as data_cli
from data_prep.remote import fetch_metadata
from data_prep.stats import iter_samples

from .conftest import run_prepare

REPO = Path(__file__).resolve().parents[2]
UNIT_BYTES = 40_000  # many small work units, so the kill lands between uploads


def _objects(client, bucket: str, prefix: str) -> dict[str, tuple]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix) + 1:]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])}


def _complete_parts(objects: dict) -> set[str]:
    return {k.split("/")[0] for k in objects if k.endswith("/unit_summary.json")}


def _prepare_args(corpus: Path, tokenizer: Path, out: str, staging: Path) -> list[str]:
    return ["prepare", str(corpus / "prose"), "--tokenizer", str(tokenizer), "--out", out, "--staging", str(staging),
            "--max-seq-len", "256", "--workers", "1", "--unit-mb", str(UNIT_BYTES / (1 << 20)), "--no-progress"]


def test_killed_upload_resumes_without_reuploading_and_equals_local_prepare(s3_server, local_corpus,
                                                                             trained_tokenizer_dir, tmp_path, capsys):
    client, bucket = s3_server.client(), "prep-resume"
    out = s3_server.bucket(bucket) + "/shards/prose"
    command = [sys.executable, "-m", "data_prep.cli",
               *_prepare_args(local_corpus, trained_tokenizer_dir, out, tmp_path / "staging")]
    victim = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(_complete_parts(_objects(client, bucket, "shards/prose"))) < 2:
        assert victim.poll() is None, victim.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no part was uploaded in time"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()

    before = _objects(client, bucket, "shards/prose")
    finished = _complete_parts(before)
    assert "index.json" not in before and "prep_meta.json" not in before  # never a half-published source
    assert "plan.json" in before
    time.sleep(1.1)  # S3 LastModified has one-second resolution: a re-upload would show

    # Resume from a fresh staging folder, as on another machine: the remote alone says what is done.
    capsys.readouterr()
    assert data_cli(_prepare_args(local_corpus, trained_tokenizer_dir, out, tmp_path / "staging2")) == 0
    resumed = capsys.readouterr().out
    after = _objects(client, bucket, "shards/prose")
    for key, stamp in before.items():
        if key.split("/")[0] in finished:
            assert after[key] == stamp, f"{key} was uploaded again"
    assert "index.json" in after
    total_units = len(json.loads((tmp_path / "staging2" / "plan.json").read_text())["units"])
    assert _complete_parts(after) == {f"part-{i:05d}" for i in range(total_units)} and total_units > len(finished)
    assert f"this run: {total_units - len(finished)} done, {len(finished)} kept" in resumed

    local = tmp_path / "local"
    run_prepare([local_corpus / "prose"], local, trained_tokenizer_dir, max_seq_len=256, unit_bytes=UNIT_BYTES,
                source="prose")
    remote_copy = fetch_metadata(out, tmp_path / "fetched", with_shards=True)
    got = [(s["doc_id"], s["chunk_index"], s["source"], s["input_ids"].tolist()) for s in iter_samples(remote_copy)]
    want = [(s["doc_id"], s["chunk_index"], s["source"], s["input_ids"].tolist()) for s in iter_samples(local)]
    assert got == want and len(got) > 50
    remote_meta = json.loads((remote_copy / "prep_meta.json").read_text())
    local_meta = json.loads((local / "prep_meta.json").read_text())
    for key in ("documents", "chunks", "tokens", "content_tokens", "length_histograms", "tokenizer_sha256"):
        assert remote_meta[key] == local_meta[key], key
    # Staging keeps only each part's two small JSON files once uploaded.
    assert not list((tmp_path / "staging2").rglob("*.mds*"))

    # Nothing to do on a third run: it says so and uploads nothing.
    assert data_cli(_prepare_args(local_corpus, trained_tokenizer_dir, out, tmp_path / "staging2")) == 0
    assert f"this run: 0 done, {total_units} kept" in capsys.readouterr().out
    assert _objects(client, bucket, "shards/prose") == after


def test_stats_reads_remote_metadata_and_scans_remote_shards(s3_server, local_corpus, trained_tokenizer_dir,
                                                             tmp_path, capsys):
    out = s3_server.bucket("prep-stats") + "/code"
    assert data_cli(["prepare", str(local_corpus / "code"), "--format", "code", "--tokenizer",
                     str(trained_tokenizer_dir), "--out", out, "--staging", str(tmp_path / "staging"),
                     "--max-seq-len", "512", "--workers", "1", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "staging" / "prep_meta.json").read_text())
    capsys.readouterr()
    manifest = tmp_path / "remote.yaml"
    manifest.write_text(f"name: remote\nsources:\n  - name: code\n    local: {tmp_path / 'cache'}\n"
                        f"    remote: {out}\n")
    assert data_cli(["stats", out, "--scan", "--json"]) == 0
    [stats] = json.loads(capsys.readouterr().out)
    assert stats["folder"] == out and stats["source"] == "code"
    assert (stats["documents"], stats["chunks"], stats["tokens"]) == (meta["documents"], meta["chunks"], meta["tokens"])
    assert stats["scan_matches_meta"] is True
    assert data_cli(["stats", str(manifest)]) == 0
    assert f"{meta['tokens']:,}" in capsys.readouterr().out


def test_remote_errors_are_one_line(s3_server, local_corpus, trained_tokenizer_dir, tmp_path, capsys):
    missing = data_cli(["stats", "s3://no-such-bucket/x"])
    err = capsys.readouterr().err.strip()
    assert missing == 2 and len(err.splitlines()) == 1 and "s3://no-such-bucket/x" in err
    assert data_cli(["prepare", str(local_corpus / "prose"), "--tokenizer", str(trained_tokenizer_dir), "--out",
                     str(tmp_path / "local"), "--staging", str(tmp_path / "s")]) == 2
    assert "--staging only applies" in capsys.readouterr().err
    assert data_cli(["prepare", str(local_corpus / "prose"), "--tokenizer", str(trained_tokenizer_dir), "--out",
                     str(tmp_path / "local"), "--spark-master", "local[2]"]) == 2
    assert "--spark-master only applies with --engine spark" in capsys.readouterr().err
    assert data_cli(["prepare", str(local_corpus / "prose"), "--tokenizer", str(trained_tokenizer_dir), "--out",
                     "s3://no-such-bucket/x", "--staging", str(tmp_path / "s"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-bucket" in err and "S3_ENDPOINT_URL" in err


def test_other_settings_are_refused_then_overwrite_replaces_every_object(s3_server, local_corpus,
                                                                         trained_tokenizer_dir, tmp_path, capsys):
    client, bucket = s3_server.client(), "prep-overwrite"
    out = s3_server.bucket(bucket) + "/p"
    first_file = sorted((local_corpus / "prose").iterdir())[0]
    args = ["prepare", str(first_file), "--tokenizer", str(trained_tokenizer_dir), "--out", out, "--staging",
            str(tmp_path / "staging"), "--workers", "1", "--no-progress", "--unit-mb", "0.02"]
    assert data_cli(args + ["--max-seq-len", "64"]) == 0
    before = _objects(client, bucket, "p")
    capsys.readouterr()
    assert data_cli(args + ["--max-seq-len", "256"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--out {out} was prepared with different settings (max_seq_len" in err
    assert _objects(client, bucket, "p") == before  # refused: nothing changed
    assert data_cli(args + ["--max-seq-len", "256", "--overwrite", "--unit-mb", "1"]) == 0
    after = _objects(client, bucket, "p")
    assert _complete_parts(after) == {"part-00000"} and len(_complete_parts(before)) > 1  # old parts deleted
    meta = json.loads((fetch_metadata(out, tmp_path / "fetched") / "prep_meta.json").read_text())
    assert meta["max_seq_len"] == 256


class _FolderStore:
    """An object store for a scheme with no local test server (oci://, azure://), kept in a folder and put in at
    streaming's storage boundary (CloudUploader.get / CloudDownloader.direct_download): everything of ours runs.

    `can_list=False` behaves like streaming's Azure/HF/DBFS uploaders, whose list_objects is not implemented.
    """

    def __init__(self, root: Path, can_list: bool):
        self.root, self.can_list = root, can_list

    def path(self, url: str) -> Path:
        from urllib.parse import urlparse

        parsed = urlparse(url)
        return self.root / parsed.netloc / parsed.path.strip("/")

    def files(self) -> dict[str, int]:
        return {str(p.relative_to(self.root)): p.stat().st_mtime_ns for p in self.root.rglob("*") if p.is_file()}

    def install(self, monkeypatch) -> None:
        import shutil
        from streaming.base.storage import download, upload

        store = self

        class Uploader:
            def __init__(self, local: str, remote: str):
                self.local, self.remote = Path(local), remote

            def upload_file(self, name: str) -> None:
                target = store.path(f"{self.remote}/{name}")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.local / name, target)

            def list_objects(self):
                if not store.can_list:
                    raise NotImplementedError("list_objects is not implemented")
                bucket = store.path(self.remote.split("/", 3)[0] + "//" + self.remote.split("/", 3)[2])
                return sorted(str(p.relative_to(bucket)) for p in bucket.rglob("*") if p.is_file())

        def direct_download(remote, local, timeout=60.0):
            source = store.path(remote)
            if not source.is_file():
                raise FileNotFoundError(remote)
            shutil.copyfile(source, local)

        real_get = upload.CloudUploader.get

        def get(cls, out, *args, **kwargs):  # the MDS writer's own local uploader stays streaming's
            return Uploader(*out) if isinstance(out, tuple) else real_get(out, *args, **kwargs)

        monkeypatch.setattr(upload.CloudUploader, "get", classmethod(get))
        monkeypatch.setattr(download.CloudDownloader, "direct_download", classmethod(
            lambda cls, remote, local, timeout=60.0: direct_download(remote, local, timeout)))


@pytest.mark.parametrize("scheme,can_list", [("oci", True), ("azure", False)])
def test_prepare_out_on_a_scheme_without_delete_starts_resumes_and_refuses_a_needed_delete(
        scheme, can_list, local_corpus, trained_tokenizer_dir, tmp_path, monkeypatch):
    from data_prep.prepare import PrepareConfig
    from data_prep.remote import prepare_remote
    from modernbert_train.common.errors import UserError

    store = _FolderStore(tmp_path / "store", can_list)
    store.install(monkeypatch)
    out = f"{scheme}://bucket/shards/prose"
    first_file = sorted((local_corpus / "prose").iterdir())[0]

    def run(staging: str) -> dict:
        cfg = PrepareConfig(inputs=[str(first_file)], out=out, tokenizer=str(trained_tokenizer_dir), max_seq_len=128,
                            unit_bytes=20_000, workers=1, progress=False)
        return prepare_remote(cfg, tmp_path / staging)

    summary = run("staging")  # fresh output: no index.json to withdraw, nothing to delete
    units = summary["units"]
    remote = store.path(out)
    assert units > 2 and (remote / "index.json").is_file() and (remote / "prep_meta.json").is_file()
    assert sorted(p.name for p in remote.glob("part-*/unit_summary.json")) == ["unit_summary.json"] * units

    # Interrupted run (index not yet published, one part missing), resumed from a fresh staging folder.
    for name in ("index.json", "prep_meta.json", "prep_summary.json"):
        (remote / name).unlink()
    shutil.rmtree(remote / "part-00001")
    before = store.files()
    summary = run("staging2")
    assert (summary["this_run"]["units_done"], summary["this_run"]["units_kept"]) == (1, units - 1)
    after = store.files()
    kept_parts = {k: v for k, v in before.items() if "/part-" in k}
    assert kept_parts and {k: after[k] for k in kept_parts} == kept_parts  # finished parts not uploaded again
    assert (remote / "index.json").is_file() and (remote / "part-00001" / "unit_summary.json").is_file()
    local = tmp_path / "local"
    run_prepare([first_file], local, trained_tokenizer_dir, max_seq_len=128, unit_bytes=20_000, source="prose")
    remote_copy = fetch_metadata(out, tmp_path / "fetched", with_shards=True)
    assert [s["input_ids"].tolist() for s in iter_samples(remote_copy)] == \
        [s["input_ids"].tolist() for s in iter_samples(local)]

    # A published source with a part to redo: its index.json must be withdrawn, which this scheme cannot do.
    (remote / "part-00002" / "unit_summary.json").unlink()
    before = store.files()
    with pytest.raises(UserError) as err:
        run("staging3")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and f"{out}/index.json must be deleted" in message
    assert f"{scheme}://" in message and "nothing was changed" in message
    assert store.files() == before
    cfg = PrepareConfig(inputs=[str(first_file)], out=out, tokenizer=str(trained_tokenizer_dir), overwrite=True,
                        progress=False)
    with pytest.raises(UserError) as err:  # --overwrite must delete every object: refused the same way
        prepare_remote(cfg, tmp_path / "staging2")
    assert len(str(err.value).splitlines()) == 1 and "more objects under" in str(err.value)
    assert store.files() == before and (tmp_path / "staging2" / "plan.json").is_file()

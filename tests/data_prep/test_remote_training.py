"""Training streams from a real S3 server (moto, 127.0.0.1) through a cache much smaller than the data:
the server goes away for a few seconds mid-run and the run rides it out; the run is then killed with SIGKILL
and relaunched, and its per-step losses equal (bit for bit) those of an uninterrupted run on local disk."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.prepare import PrepareConfig
from data_prep.remote import prepare_remote

from .conftest import run_prepare

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
STEPS, CHECKPOINT_EVERY, KILL_AFTER, OUTAGE_AT, OUTAGE_S = 12, 4, 9, 3, 6.0
SHARD_BYTES = 8 << 10  # small shards, so twelve steps read through many of them and the cache must evict


def _launch(args: list[str], log: Path, tmp: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "modernbert_train.train", str(REPO / "yamls/tiny/phase1.yaml"), *args]
    return subprocess.Popen(command, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, TMPDIR=str(tmp)))


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_for_step(proc, run_dir: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + 300
    while step not in _steps(run_dir):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the run never reached step {step}"
        time.sleep(0.05)


def _manifest(path: Path, local: Path, remote: str | None = None) -> Path:
    path.write_text(f"name: code\nsources:\n  - name: code\n    local: {local}\n"
                    + (f"    remote: {remote}\n" if remote else ""))
    return path


def test_remote_training_survives_an_outage_and_a_kill_bit_identically(s3_server, local_corpus,
                                                                       trained_tokenizer_dir, tmp_path):
    settings = dict(max_seq_len=128, shard_size_limit=SHARD_BYTES, unit_bytes=1 << 20, workers=1)
    remote = s3_server.bucket("train-stream") + "/code"
    prepare_remote(PrepareConfig(inputs=[str(local_corpus / "code")], out=remote, tokenizer=str(trained_tokenizer_dir),
                                 source="code", format="code", progress=False, **settings), tmp_path / "staging")
    run_prepare([local_corpus / "code"], tmp_path / "local_code", trained_tokenizer_dir, source="code",
                format="code", **settings)
    index = json.loads((tmp_path / "staging" / "index.json").read_text())
    largest = max(s["raw_data"]["bytes"] + s["zip_data"]["bytes"] for s in index["shards"])
    cache_limit = 6 * largest
    assert len(index["shards"]) > 20

    # A shuffle window of about two shards and a short download-ahead, so the small cache can hold them.
    common = [f"data.tokenizer={trained_tokenizer_dir}", "logging.progress_bar=false", f"max_duration={STEPS}ba",
              f"checkpoint.interval={CHECKPOINT_EVERY}ba", "scheduler.warmup=4ba", "batch_warmup.tokens=3000",
              "run_name=remote-resume", "data.loader_options.shuffle_block_size=64", "data.loader_options.predownload=8"]
    reference_dir, killed_dir, cache = tmp_path / "reference", tmp_path / "killed", tmp_path / "cache" / "code"
    reference = _launch(common + [f"data.manifest={_manifest(tmp_path / 'local.yaml', tmp_path / 'local_code')}",
                                  f"save_folder={reference_dir}"], tmp_path / "reference.log", tmp_path)
    killed_args = common + [f"data.manifest={_manifest(tmp_path / 'remote.yaml', cache, remote)}",
                            f"save_folder={killed_dir}", f"data.loader_options.cache_limit={cache_limit}"]
    victim = _launch(killed_args, tmp_path / "killed-1.log", tmp_path)

    _wait_for_step(victim, killed_dir, OUTAGE_AT, tmp_path / "killed-1.log")
    s3_server.stop()  # the object store goes away for a few seconds: downloads are retried
    cached_at_outage = {str(p.relative_to(cache)) for p in cache.rglob("shard.*.mds")}
    time.sleep(OUTAGE_S)
    s3_server.start()
    _wait_for_step(victim, killed_dir, KILL_AFTER, tmp_path / "killed-1.log")
    assert {str(p.relative_to(cache)) for p in cache.rglob("shard.*.mds")} - cached_at_outage  # it went on downloading
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert max(_steps(killed_dir)) < STEPS

    relaunch = _launch(killed_args, tmp_path / "killed-2.log", tmp_path)
    assert relaunch.wait(timeout=300) == 0, (tmp_path / "killed-2.log").read_text()[-3000:]
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    ref = [json.loads(line) for line in (reference_dir / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
    assert [r["train/loss"] for r in got] == [r["train/loss"] for r in ref]  # bit-identical floats
    # The cache stayed under its limit (give or take the shard in flight: streaming counts a shard once it has
    # landed), and shards were evicted along the way (fewer present than read).
    present = list(cache.rglob("shard.*"))
    assert sum(p.stat().st_size for p in present) <= cache_limit + largest
    assert 0 < len({str(p).split(".mds")[0] for p in present}) < len(index["shards"])


def test_store_gone_past_the_retry_budget_stops_with_one_clear_line(s3_server, local_corpus, trained_tokenizer_dir,
                                                                    tmp_path, monkeypatch):
    import tempfile

    from modernbert_train.data.dataset import build_streaming_dataset
    from modernbert_train.data.manifest import load_manifest
    from modernbert_train.common.errors import UserError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # streaming's file locks
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: streaming's budget alone
    remote = s3_server.bucket("train-outage") + "/prose"
    prepare_remote(PrepareConfig(inputs=[str(local_corpus / "prose")], out=remote, tokenizer=str(trained_tokenizer_dir),
                                 max_seq_len=128, shard_size_limit=SHARD_BYTES, workers=1, progress=False),
                   tmp_path / "staging")
    manifest = load_manifest(_manifest(tmp_path / "m.yaml", tmp_path / "cache", remote))
    dataset = build_streaming_dataset(manifest, batch_size=8, shuffle=False, seed=1, predownload=8, download_retry=1)
    samples = iter(dataset)
    next(samples)
    s3_server.stop()
    try:
        with pytest.raises(UserError) as err:
            for _ in samples:
                pass
    finally:
        s3_server.start()
    message = str(err.value)
    assert len(message.splitlines()) == 1 and remote in message and "re-run the same command" in message

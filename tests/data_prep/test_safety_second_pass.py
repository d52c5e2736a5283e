"""Issue 24 (safety review, second pass), data preparation: files planted as an attacker or an unlucky user
would leave them, and what each command does with them. Every test here lost data or mixed a part before the
fix; each now checks that nothing outside the command's own files is touched."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from data_prep.cli import main as data_cli
from modernbert_train.common.errors import UserError


def _all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _home_with_work(root: Path) -> Path:
    home = root / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "chapter1.tex").write_text("three years of work")
    (home / "notes.md").write_text("notes")
    return home


# -- finding 1: --staging ~ --overwrite ----------------------------------------------------------------------------
def test_staging_at_home_or_holding_user_files_is_never_deleted(s3_server, tmp_path, monkeypatch, capsys):
    """`prepare --out s3://... --staging ~ --overwrite` ran shutil.rmtree(~). Now the guard refuses first and
    nothing is deleted, neither locally nor in the bucket."""
    home = _home_with_work(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    client = s3_server.client()
    out = s3_server.bucket("staging-guard") + "/shards/web"
    client.put_object(Bucket="staging-guard", Key="shards/web/plan.json", Body=b"{}")
    before = _all_files(home)
    args = ["prepare", str(tmp_path / "none.jsonl"), "--tokenizer", str(tmp_path / "tok"), "--out", out,
            "--overwrite", "--no-progress"]
    assert data_cli(args + ["--staging", str(home)]) == 2
    assert _all_files(home) == before
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --staging {home} is your home directory; refusing to replace it — choose a new folder"]
    # Not a home, but a folder holding the user's files: not prepare's, so not deleted either.
    assert data_cli(args + ["--staging", str(home / "thesis")]) == 2
    assert "holds chapter1.tex, which prepare does not write" in capsys.readouterr().err
    assert _all_files(home) == before
    assert [o["Key"] for o in client.list_objects_v2(Bucket="staging-guard")["Contents"]] == ["shards/web/plan.json"]


def test_remote_overwrite_of_a_prefix_holding_other_objects_deletes_nothing(s3_server, tmp_path, capsys):
    """`--out s3://bucket --overwrite` deleted every object under the prefix (a whole bucket with an empty
    prefix). Now it deletes only a prefix that holds nothing but prepare's own objects."""
    client = s3_server.client()
    out = s3_server.bucket("foreign-objects")
    for key in ("plan.json", "part-00000/unit_summary.json", "photos/cat.jpg"):
        client.put_object(Bucket="foreign-objects", Key=key, Body=b"{}")
    args = ["prepare", str(tmp_path / "none.jsonl"), "--tokenizer", str(tmp_path / "tok"), "--out", out,
            "--staging", str(tmp_path / "staging"), "--overwrite", "--no-progress"]
    assert data_cli(args) == 2
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="foreign-objects").get("Contents", []))
    assert keys == ["part-00000/unit_summary.json", "photos/cat.jpg", "plan.json"]
    assert "holds photos/cat.jpg, which prepare does not write; refusing --overwrite" in capsys.readouterr().err


def test_overwrite_of_a_staging_folder_of_ours_still_works(s3_server, local_corpus, trained_tokenizer_dir, tmp_path):
    out = s3_server.bucket("staging-ours") + "/prose"
    staging = tmp_path / "staging"
    args = ["prepare", str(local_corpus / "prose"), "--tokenizer", str(trained_tokenizer_dir), "--out", out,
            "--staging", str(staging), "--max-seq-len", "128", "--unit-mb", "4", "--no-progress"]
    assert data_cli(args) == 0
    (staging / "part-00000" / "stale.tmp").write_text("")  # a temporary file of an interrupted write: ours
    assert data_cli(args + ["--overwrite"]) == 0
    assert not (staging / "part-00000" / "stale.tmp").exists() and (staging / "index.json").is_file()


# -- finding 3: two attempts of one work unit ----------------------------------------------------------------------
def _unit_and_writer(corpus: Path, tokenizer: Path, out: Path, gate=None):
    from data_prep.prepare import UnitWriter
    from data_prep.sources import expand_inputs, plan_units
    from data_prep.tokenizer import load_tokenizer, special_token_ids, vocab_size

    files = expand_inputs([str(corpus / "prose")], "auto", (), (), ())
    unit = plan_units(files, "auto", 1 << 30)[0]
    tok = load_tokenizer(tokenizer)
    vocab = vocab_size(tok)
    settings = {"source": "prose", "vocab_size": vocab, "dtype": "uint16", "max_seq_len": 128,
                "text_field": "text", "shard_size_limit": 1 << 16, "max_doc_bytes": 1 << 24,
                "policies": {"on_error": "fail", "on_binary": "skip"}}
    out.mkdir(parents=True, exist_ok=True)
    return unit, lambda: UnitWriter(tok, special_token_ids(tok), settings, out, report=lambda *a: None,
                                    should_stop=gate or (lambda: False))


def _part_is_whole(part: Path) -> int:
    """Samples of a part whose every shard is listed by its index with the bytes it has (nothing mixed)."""
    index = json.loads((part / "index.json").read_text())
    listed = {s["zip_data"]["basename"]: s["zip_data"]["bytes"] for s in index["shards"]}
    on_disk = {p.name: p.stat().st_size for p in part.iterdir() if p.name.startswith("shard.")}
    assert on_disk == listed, (on_disk, listed)
    summary = json.loads((part / "unit_summary.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == summary["chunks"]
    return summary["chunks"]


def test_two_concurrent_attempts_of_one_unit_publish_one_whole_part(local_corpus, trained_tokenizer_dir, tmp_path):
    """Spark speculation, or a retry while a lost executor still runs: two attempts of one unit at once. They
    shared .tmp-part-N, so one's rmtree wiped the other's files and the rename could publish a mixed part."""
    reference_out = tmp_path / "reference"
    unit, make = _unit_and_writer(local_corpus, trained_tokenizer_dir, reference_out)
    expected = make().run(unit)

    out = tmp_path / "out"
    both_writing = threading.Barrier(2, timeout=60)
    calls = threading.local()

    def gate() -> bool:  # the first batch of each attempt waits until the other attempt has started writing too
        if not getattr(calls, "seen", False):
            calls.seen = True
            both_writing.wait()
        return False

    _, make = _unit_and_writer(local_corpus, trained_tokenizer_dir, out, gate)
    writers, results, errors = [make(), make()], [None, None], []

    def attempt(i: int) -> None:
        try:
            results[i] = writers[i].run(unit)
        except BaseException as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert sorted(w.published for w in writers) == [False, True]  # exactly one attempt published
    assert results[0] == results[1] and results[0]["chunks"] == expected["chunks"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["part-00000"]  # no attempt's temporary folder is left
    assert _part_is_whole(out / "part-00000") == expected["chunks"]
    published, reference = _all_files(out / "part-00000"), _all_files(reference_out / "part-00000")
    summaries = [json.loads(files.pop("unit_summary.json")) for files in (published, reference)]
    assert published == reference and len(published) >= 3  # index.json and every shard, byte for byte
    assert [{k: v for k, v in s.items() if k != "seconds"} for s in summaries] == [
        {k: v for k, v in summaries[1].items() if k != "seconds"}] * 2


def test_a_late_attempt_never_replaces_a_published_part(local_corpus, trained_tokenizer_dir, tmp_path):
    """A retried attempt finishing after the first published used to rmtree the complete part and rename its
    own in its place (a window with no part, and a reader of the old files losing them)."""
    out = tmp_path / "out"
    unit, make = _unit_and_writer(local_corpus, trained_tokenizer_dir, out)
    first = make()
    summary = first.run(unit)
    part = out / "part-00000"
    inode, files = part.stat().st_ino, _all_files(part)
    late = make()
    assert late.run(unit) == summary and first.published and not late.published
    assert part.stat().st_ino == inode and _all_files(part) == files
    assert sorted(p.name for p in out.iterdir()) == ["part-00000"]


# -- finding 4 (prepare side): names from a synced part's index.json ----------------------------------------------
def test_a_crafted_shard_name_in_a_synced_part_index_is_one_error(tmp_path):
    from data_prep.bookkeeping import merged_index
    from data_prep.remote import RemoteOutput

    out = tmp_path / "staging"
    (out / "part-00000").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    index = {"version": 2, "shards": [{"zip_data": {"basename": "../../victim.txt", "bytes": 7}, "samples": 1,
                                        "raw_data": {"basename": "x", "bytes": 1}}]}
    (out / "part-00000" / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"part-00000/index.json: '../../victim.txt' is not a plain file name"):
        merged_index(out, 1)
    with pytest.raises(UserError, match=r"'../../victim.txt' is not a plain file name"):
        RemoteOutput._has_all_shards(out / "part-00000")
    assert victim.read_text() == "keep me"


# -- the same guard for the demo corpus builder ------------------------------------------------------------------
def test_build_local_corpus_overwrite_keeps_a_users_code_folder(tmp_path):
    """`build-local-corpus --out ~/project --overwrite` deleted ~/project/code and ~/project/prose, whatever
    they held. Now only folders with the corpus's corpus_info.json marker beside them."""
    from data_prep.local_corpus import build_local_corpus

    project = tmp_path / "project"
    (project / "code").mkdir(parents=True)
    (project / "code" / "main.py").write_text("print('mine')")
    with pytest.raises(UserError, match=r"--out's code .*has no corpus_info.json beside it"):
        build_local_corpus(project, max_bytes=20_000, overwrite=True)
    assert (project / "code" / "main.py").read_text() == "print('mine')"
    built = tmp_path / "built"
    build_local_corpus(built, max_bytes=20_000)
    (built / "code" / "stale.py").write_text("")
    build_local_corpus(built, max_bytes=20_000, overwrite=True)  # a corpus of ours is rebuilt
    assert not (built / "code" / "stale.py").exists() and (built / "corpus_info.json").is_file()


def test_prepare_overwrite_of_a_part_holding_a_users_file_deletes_nothing(local_corpus, trained_tokenizer_dir,
                                                                          tmp_path):
    from tests.data_prep.conftest import run_prepare

    out = tmp_path / "out"
    run_prepare([local_corpus / "prose"], out, trained_tokenizer_dir, max_seq_len=128, unit_bytes=1 << 22)
    (out / "part-00000" / "my-notes.txt").write_text("mine")  # a user kept notes in the output's part
    with pytest.raises(UserError, match=r"part-00000 holds my-notes.txt, which prepare does not write in a part"):
        run_prepare([local_corpus / "prose"], out, trained_tokenizer_dir, max_seq_len=128, unit_bytes=1 << 22,
                    overwrite=True)
    assert (out / "part-00000" / "my-notes.txt").read_text() == "mine"
    assert os.path.isfile(out / "part-00000" / "unit_summary.json")


def test_stats_of_a_remote_index_with_a_crafted_name_writes_nothing_outside(s3_server, tmp_path, capsys):
    """`stats s3://... --scan` downloads each shard the remote index.json names into a temporary folder: a
    '../' name wrote outside it. Now one line names the index and the name, and nothing is downloaded."""
    client = s3_server.client()
    out = s3_server.bucket("crafted-index") + "/web"
    index = {"version": 2, "shards": [{"raw_data": {"basename": "../../../../tmp-planted", "bytes": 3},
                                        "samples": 1, "column_names": [], "column_encodings": []}]}
    for key, body in (("web/index.json", json.dumps(index)), ("web/prep_meta.json", "{}"), ("web/prep_summary.json", "{}"),
                      ("tmp-planted", "payload")):
        client.put_object(Bucket="crafted-index", Key=key, Body=body.encode())
    assert data_cli(["stats", out, "--scan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "web/index.json: '../../../../tmp-planted' is not a plain file name" in err[0]

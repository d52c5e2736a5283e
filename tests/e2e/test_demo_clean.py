"""Issue 17, finding 1 for the demo's clean-up (`make clean-demo` = `modernbert-train demo --clean`)."""
import os
import subprocess
import sys
from pathlib import Path

from modernbert_train.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def test_clean_removes_a_demo_folder_and_refuses_anything_else(tmp_path, monkeypatch, capsys):
    demo = tmp_path / "demo_out"
    for name in ("corpus", "runs/tiny-phase1", "hf", "report"):
        (demo / name).mkdir(parents=True)
    (demo / "demo.yaml").write_text("name: demo\n")
    (demo / "runs" / "tiny-phase1" / "metrics.jsonl").write_text("{}\n")
    assert main(["demo", "--clean", "--out", str(demo)]) == 0
    assert not demo.exists()

    mixed = tmp_path / "mixed"
    (mixed / "runs").mkdir(parents=True)
    (mixed / "thesis.tex").write_text("mine")
    assert main(["demo", "--clean", "--out", str(mixed)]) == 2
    assert "holds thesis.tex, which the demo does not write" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    assert main(["demo", "--clean", "--out", "."]) == 2
    assert "is the current directory" in capsys.readouterr().err
    assert (mixed / "thesis.tex").exists() and (tmp_path / "corpus").exists()


def test_make_clean_demo_goes_through_the_guard(tmp_path):
    """`make clean-demo` was `rm -rf demo_out`, whatever demo_out held; now it is the guarded command."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    dry = subprocess.run(["make", "-n", "clean-demo"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "demo --clean --out demo_out" in dry.stdout and "rm -rf" not in dry.stdout
    link = tmp_path / "demo_out"
    link.symlink_to(target)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "modernbert_train.cli.main", "demo", "--clean", "--out",
                             "demo_out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "symbolic link" in result.stderr  # neither the link nor its target
    assert link.is_symlink() and (target / "keep.txt").exists()


def test_a_demo_folder_whose_corpus_holds_the_eval_texts_is_not_reused(tmp_path, capsys):
    """A corpus built before the evaluation's files were held out of pretraining is refused, naming the way out;
    nothing in the folder is touched."""
    import json

    corpus = tmp_path / "demo_out" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "corpus_info.json").write_text(json.dumps({"max_bytes_per_kind": 6 << 20}))
    assert main(["demo", "--out", str(tmp_path / "demo_out")]) == 2
    err = capsys.readouterr().err
    assert "did not hold the evaluation's files out of pretraining" in err and "demo --clean" in err
    assert sorted(p.name for p in (tmp_path / "demo_out").rglob("*")) == ["corpus", "corpus_info.json"]

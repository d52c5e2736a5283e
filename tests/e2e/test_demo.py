"""The README's main command, end to end on a small budget: local corpus to a Hugging Face model and a report."""
import json

import matplotlib.image
import pytest
import torch
import transformers

from modernbert_train.run.demo import SIZES, run_demo

pytestmark = pytest.mark.slow


def test_demo_runs_every_step_and_reuses_them(tmp_path, capsys):
    out = tmp_path / "demo"
    hf_dir = run_demo(out, size="small")
    captured = capsys.readouterr()
    printed = captured.out
    # Its console, as a log file gets it (stderr is no terminal here): plain lines, no bar refreshes, short.
    log = captured.out + captured.err
    assert "\r" not in log and "\033[" not in log and len(log.splitlines()) < 200
    assert "train tiny-phase1: step 12/12 (100%)" in captured.err and " ETA " in captured.err

    # Shards for both sources, every document accounted for.
    for source in ("code", "prose"):
        meta = json.loads((out / "shards" / source / "prep_meta.json").read_text())
        assert meta["documents"] > 0 and meta["tokens"] > 10_000
        assert (out / "shards" / source / "index.json").exists()

    # Three phases, each with the planned number of steps; phase 2 and 3 at the longer context.
    for phase, steps in zip(("phase1", "phase2", "phase3"), SIZES["small"].steps):
        rows = [json.loads(line) for line in (out / "runs" / f"tiny-{phase}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "train/loss" in r][-1] == steps
    config = json.loads((out / "runs" / "tiny-phase2" / "model_config.json").read_text())
    assert config["max_position_embeddings"] == 512 and config["global_rope_theta"] == 160_000.0

    # The export loads in transformers and fills masks.
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    batch = tokenizer(["import os\nimport [MASK]\n"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    assert printed.count("fill-mask ") == 3

    # Report: valid PNG images and the summary.
    pngs = sorted((out / "report").glob("*.png"))
    assert len(pngs) >= 3
    for png in pngs:
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert "tiny-phase3" in (out / "report" / "report.md").read_text()

    # Evaluation: every phase and a random init side by side, in the report and at the end of the output.
    results = json.loads((out / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == [f"tiny-{p}" for p in ("phase1", "phase2", "phase3")] + [
        "random init (tiny-phase3)"]
    assert {s["task"] for s in results["summary"]} >= {"stdlib-topic", "stdlib-code-search", "heldout-mlm"}
    report = (out / "report" / "report.md").read_text()
    assert "Downstream evaluation" in report and "| stdlib-topic | accuracy |" in report
    assert "random init (tiny-phase3)" in printed.split("evaluation (local tasks")[-1]

    # Re-running reuses every finished step.
    run_demo(out, size="small")
    again = capsys.readouterr().out
    assert again.count("reusing") >= 7 and "$ modernbert-train train" not in again

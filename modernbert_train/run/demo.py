"""The whole job on a built-in default: local corpus -> tokenizer -> shards -> three tiny phases -> HF -> fill-mask
-> evaluation of each phase against random init on local tasks.

Each step is the same CLI a user would type (printed before it runs), and each is skipped when its output
is already complete, so re-running the demo resumes where it stopped. Everything lands under `out_dir`.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from modernbert_train.common.errors import UserError

REPO = Path(__file__).resolve().parents[2]
PHASES = ("phase1", "phase2", "phase3")
FILL_MASK_PROMPTS = (
    "The [MASK] statement is used to leave a loop early.",
    "import os\nimport [MASK]\n",
    "def __init__(self, [MASK]):",
)


@dataclass(frozen=True)
class DemoSize:
    corpus_mb: float  # cap on code and on prose, each
    vocab_size: int
    steps: tuple[int, int, int]  # optimizer steps of phase 1, 2, 3
    phase1_batch_rows: int  # global batch of phase 1 (rows of 128 tokens) after its batch-size warmup
    eval_overrides: tuple[str, ...] = ()  # changes to yamls/eval/local.yaml for this size


SIZES = {
    "default": DemoSize(corpus_mb=6.0, vocab_size=8192, steps=(1500, 100, 80), phase1_batch_rows=16),
    "small": DemoSize(corpus_mb=0.6, vocab_size=1024, steps=(12, 6, 6), phase1_batch_rows=8,
                      eval_overrides=("tasks.0.sweep.seeds=[0]", "tasks.0.sweep.epochs=[1]", "tasks.0.limit=64",
                                      "tasks.1.sweep.seeds=[0]", "tasks.1.limit=64", "tasks.4.sweep.seeds=[0]",
                                      "tasks.4.sweep.lr=[3.0e-3]", "tasks.4.sweep.epochs=[1]")),
}
EVAL_SUITE = REPO / "yamls" / "eval" / "local.yaml"


def _say(text: str) -> None:
    # Bold on a terminal only: escape codes are noise in a log file.
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print(f"\n{bold}== {text}{plain}", flush=True)


def _run_cli(argv: list[str]) -> None:
    """Run one of our CLIs exactly as typed; a failure stops the demo with its message.

    Data preparation runs as its own process (`python -m data_prep.cli`): data_prep builds on this package,
    never the other way round, and the demo shows what a user types."""
    print("$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    program, args = argv[0], argv[1:]
    if program == "modernbert-data":
        code = subprocess.call([sys.executable, "-m", "data_prep.cli", *args])
    else:
        from modernbert_train.cli.main import main

        code = main(args)
    if code:
        raise UserError(f"demo step failed (exit {code}): {' '.join(argv)}")


def _finished_steps(run_dir: Path) -> int:
    """Optimizer steps recorded in a run's metrics.jsonl (0 when absent)."""
    metrics = run_dir / "metrics.jsonl"
    steps = 0
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                steps = max(steps, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                continue
    return steps


def fill_mask_examples(hf_dir: Path, prompts=FILL_MASK_PROMPTS, top_k: int = 5) -> list[tuple[str, list[tuple[str, float]]]]:
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(hf_dir), tokenizer=str(hf_dir), device="cpu")
    mask = fill.tokenizer.mask_token
    results = []
    for prompt in prompts:
        predictions = fill(prompt.replace("[MASK]", mask), top_k=top_k)
        results.append((prompt, [(p["token_str"], float(p["score"])) for p in predictions]))
    return results


def _check_corpus_is_held_out(corpus: Path) -> None:
    """A corpus built before the evaluation files were reserved holds the evaluation's texts: everything
    trained on it would be scored on what it saw. Refuse to reuse it (nothing is deleted here)."""
    from modernbert_train.eval.heldout import EVAL_RESERVATION

    info = json.loads((corpus / "corpus_info.json").read_text())
    if info.get("reserved_for_eval") != EVAL_RESERVATION:
        raise UserError(f"{corpus} was built by an older version that did not hold the evaluation's files out "
                        f"of pretraining; start over with `make clean-demo` (modernbert-train demo --clean "
                        f"--out {corpus.parent}) and run the demo again")


# Everything run_demo writes under its folder (the manifests are named after yamls/data/*.yaml).
DEMO_ENTRIES = frozenset({"corpus", "tokenizer", "shards", "runs", "hf", "hf.rejected", "report"})


def _demo_entry(name: str) -> bool:
    return name in DEMO_ENTRIES or (name.endswith(".yaml") and (REPO / "yamls" / "data" / name).is_file())


def clean_demo(out_dir: str | Path = "demo_out") -> bool:
    """Delete a demo's output folder, only if it holds nothing but what the demo writes; False if absent."""
    from modernbert_train.common.safety import only_these_entries, remove_tree

    return remove_tree(out_dir, label="demo folder", recognise=only_these_entries(_demo_entry, (), "the demo"),
                       keep=(REPO,))


def run_demo(out_dir: str | Path = "demo_out", size: str = "default", workers: int | None = None) -> Path:
    if size not in SIZES:
        raise UserError(f"--size {size!r}: choose one of {sorted(SIZES)}")
    plan = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1)
    started = time.perf_counter()
    corpus, tokenizer_dir, shards, runs = out / "corpus", out / "tokenizer", out / "shards", out / "runs"

    _say("1/7 corpus: Python standard library (code) + Python's own documentation (prose), from this machine")
    if not (corpus / "corpus_info.json").exists():
        _run_cli(["modernbert-data", "build-local-corpus", "--out", str(corpus), "--max-mb", str(plan.corpus_mb),
                  "--overwrite"])
    else:
        _check_corpus_is_held_out(corpus)
        print(f"reusing {corpus}")

    _say("2/7 tokenizer: byte-level BPE with [CLS] [SEP] [MASK] [PAD] [UNK]")
    if not (tokenizer_dir / "tokenizer.json").exists():
        _run_cli(["modernbert-data", "train-tokenizer", str(corpus), "--vocab-size", str(plan.vocab_size),
                  "--out", str(tokenizer_dir)])
    else:
        print(f"reusing {tokenizer_dir / 'tokenizer.json'}")

    _say("3/7 shards: tokenized MDS shards per source (resumes by itself)")
    for source in ("code", "prose"):
        if (shards / source / "prep_meta.json").exists():
            print(f"reusing {shards / source}")
            continue
        _run_cli(["modernbert-data", "prepare", str(corpus / source), "--tokenizer", str(tokenizer_dir),
                  "--out", str(shards / source), "--source", source, "--max-seq-len", "512",
                  "--workers", str(workers)])

    _say("4-6/7 training: the three tiny phases (1: 128 tokens; 2: 512 tokens, theta 160k; 3: decay)")
    previous = None
    for phase, steps in zip(PHASES, plan.steps):
        run_dir = runs / f"tiny-{phase}"
        recipe = REPO / "yamls" / "tiny" / f"{phase}.yaml"
        manifest = _rerooted_manifest(recipe, out)
        if _finished_steps(run_dir) >= steps:
            print(f"reusing {run_dir} ({steps} steps done)")
        else:
            # About 15 progress lines per phase in a log file, whatever the phase's length.
            overrides = [f"run_name=tiny-{phase}", f"save_folder={run_dir}", f"max_duration={steps}ba",
                         f"data.manifest={manifest}", f"data.tokenizer={tokenizer_dir}",
                         f"logging.console_interval={max(1, steps // 15)}ba"]
            if previous is not None:
                overrides.append(f"model.init_from={previous}")
            else:
                overrides.append(f"data.global_batch_size={plan.phase1_batch_rows}")
            _run_cli(["modernbert-train", "train", str(recipe), *overrides])
        previous = run_dir

    _say("7/7 export to Hugging Face, fill-mask, report")
    hf_dir = out / "hf"
    _run_cli(["modernbert-train", "export", str(previous), "--out", str(hf_dir), "--overwrite"])
    eval_dir = _evaluate_phases(out, runs, plan)
    report_dir = out / "report"
    _run_cli(["modernbert-train", "report", *[str(runs / f"tiny-{p}") for p in PHASES], "--out", str(report_dir),
              "--eval", str(eval_dir)])
    for prompt, predictions in fill_mask_examples(hf_dir):
        shown = ", ".join(f"{token!r} {score:.2f}" for token, score in predictions)
        print(f"fill-mask {prompt!r}: {shown}")
    print(f"\nevaluation (local tasks; {eval_dir / 'results.md'}):\n" + (eval_dir / "results.md").read_text()
          .split("\n\n", 2)[-1])
    minutes = (time.perf_counter() - started) / 60
    print(f"\ndone in {minutes:.1f} min. Hugging Face model: {hf_dir}  report: {report_dir / 'report.md'}"
          f"\nload it with: transformers.AutoModelForMaskedLM.from_pretrained({str(hf_dir)!r})")
    return hf_dir


def _evaluate_phases(out: Path, runs: Path, plan: DemoSize) -> Path:
    """Every phase's newest checkpoint and a random init of the same architecture, fine-tuned and scored on
    the local tasks (stdlib topic classification, docstring -> code retrieval, fixed-mask MLM)."""
    eval_dir = out / "eval"
    models = [str(runs / f"tiny-{p}") for p in PHASES] + [f"random:{runs / 'tiny-phase3'}"]
    argv = ["modernbert-train", "eval", str(EVAL_SUITE), "--build-local-tasks", "--out", str(eval_dir),
            *[arg for model in models for arg in ("--model", model)], f"data_root={out / 'eval_data'}",
            *plan.eval_overrides]
    _say("evaluation: each phase against random init, fine-tuned on local tasks (mean +- std over seeds)")
    done = eval_dir / "results.json"
    if done.exists() and json.loads(done.read_text()).get("command") == argv[1:] and all(
            (runs / f"tiny-{p}" / "metrics.jsonl").stat().st_mtime < done.stat().st_mtime for p in PHASES):
        print(f"reusing {eval_dir}")
        return eval_dir
    _run_cli(argv)
    results = json.loads(done.read_text())
    results["command"] = argv[1:]  # what these results answer: reused only for the same command and runs
    done.write_text(json.dumps(results, indent=2) + "\n")
    return eval_dir


def _rerooted_manifest(recipe: Path, out: Path) -> Path:
    """The recipe's demo manifest (paths under demo_out/) re-rooted at this demo's output folder."""
    import yaml

    manifest = REPO / yaml.safe_load(recipe.read_text())["data"]["manifest"]
    spec = yaml.safe_load(manifest.read_text())
    for source in spec["sources"]:
        source["local"] = str(out / Path(source["local"]).relative_to("demo_out"))
    target = out / manifest.name
    target.write_text(yaml.safe_dump(spec, sort_keys=False))
    return target

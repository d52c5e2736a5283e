#!/usr/bin/env python
"""The trainer itself on one GPU: real shards prepared on the machine, `modernbert-train train`, measured.

Builds a corpus from the machine's own files (Python stdlib code + Python's documentation), trains a tokenizer,
prepares MDS shards, then runs the base phase-1 recipe (`yamls/phase1.yaml`, bf16, StableAdamW, the loader,
metrics, one checkpoint save) twice: plain (DDP-less single process) and under FSDP2 on the same GPU. Prints a
table of end-to-end real tokens/s and MFU from each run's metrics.jsonl, next to the model-only step figure
when `--step-bench` names a bench/step_bench.py output.

Same commands a user types (`python -m data_prep.cli ...`, `python -m modernbert_train.cli.main train ...`),
run as subprocesses so each run is a fresh process as in production.

examples:
  python bench/trainer_bench.py --out /tmp/gtc --tiny-cpu          # the whole path on CPU, tiny shapes
  python bench/trainer_bench.py --out "$OUT/train" --steps 300     # on the GPU machine (bench/gpu_check.sh)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(argv: list[str], log: Path, timeout: float) -> float:
    """Run a command with its output in `log`; raise with the log's tail if it fails. Returns seconds."""
    print("$ " + " ".join(argv), flush=True)
    started = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        result = subprocess.run(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    seconds = time.perf_counter() - started
    if result.returncode:
        tail = log.read_text().splitlines()[-25:]
        raise SystemExit(f"failed (exit {result.returncode}) after {seconds:.0f}s: {' '.join(argv)}\n" + "\n".join(tail))
    return seconds


def prepare_data(out: Path, corpus_mb: float, vocab: int, max_seq_len: int, workers: int, log: Path) -> Path:
    corpus, tok, shards = out / "corpus", out / "tokenizer", out / "shards"
    data = [sys.executable, "-m", "data_prep.cli"]
    if not (corpus / "corpus_info.json").exists():
        run([*data, "build-local-corpus", "--out", str(corpus), "--max-mb", str(corpus_mb), "--overwrite"], log, 900)
    if not (tok / "tokenizer.json").exists():
        run([*data, "train-tokenizer", str(corpus), "--vocab-size", str(vocab), "--max-mb", str(min(corpus_mb, 20)),
             "--out", str(tok), "--no-progress"], log, 900)
    manifest = {"name": "gpu-check", "sources": []}
    for source, proportion in (("code", 0.6), ("prose", 0.4)):
        if not (shards / source / "prep_meta.json").exists():
            run([*data, "prepare", str(corpus / source), "--tokenizer", str(tok), "--out", str(shards / source),
                 "--source", source, "--max-seq-len", str(max_seq_len), "--workers", str(workers), "--no-progress"],
                log, 900)
        manifest["sources"].append({"name": source, "local": str(shards / source), "proportion": proportion})
    path = out / "manifest.yaml"
    import yaml

    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def summarize(run_dir: Path, skip: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r for r in rows if r["step"] > skip] or rows
    tps = [r["throughput/tokens_per_s"] for r in steady if r.get("throughput/tokens_per_s")]
    mfu = [r["throughput/mfu"] for r in steady if r.get("throughput/mfu")]
    losses = [r["train/loss"] for r in rows if r.get("train/loss") is not None]
    return {"steps": rows[-1]["step"], "tokens": rows[-1]["tokens"],
            "median_tokens_per_s": statistics.median(tps) if tps else float("nan"),
            "median_mfu": statistics.median(mfu) if mfu else float("nan"),
            "first_loss": losses[0] if losses else float("nan"), "last_loss": losses[-1] if losses else float("nan"),
            "checkpoints": sorted(p.name for p in run_dir.glob("ep*-ba*"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="work folder (corpus, shards, runs, results.json)")
    parser.add_argument("--tiny-cpu", action="store_true", help="tiny preset, fp32 on CPU: checks the path runs")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the plain run (300)")
    parser.add_argument("--fsdp-steps", type=int, default=120, help="optimizer steps of the FSDP2 run (120)")
    parser.add_argument("--corpus-mb", type=float, default=40.0, help="corpus size per kind in MB (40)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--step-bench", type=Path, default=None,
                        help="bench/step_bench.py output to compare against (model-only tokens/s)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"

    if args.tiny_cpu:
        shape = dict(recipe="yamls/tiny/phase1.yaml", vocab=2048, seq=128, micro=4, corpus_mb=min(args.corpus_mb, 1.0),
                     extra=["device=cpu", "precision=fp32", "model.config.attn_backend=sdpa"])
    else:
        shape = dict(recipe="yamls/phase1.yaml", vocab=50368, seq=1024, micro=64, corpus_mb=args.corpus_mb,
                     extra=["device=gpu", "precision=amp_bf16", "compile=true"])
    started = time.perf_counter()
    manifest = prepare_data(out, shape["corpus_mb"], shape["vocab"], shape["seq"], args.workers, log)
    prep_s = time.perf_counter() - started

    common = [f"data.manifest={manifest}", f"data.tokenizer={out / 'tokenizer'}", f"data.max_seq_len={shape['seq']}",
              f"data.micro_batch_size={shape['micro']}", f"data.global_batch_size={shape['micro']}",
              "batch_warmup.start_batch_size=null", "scheduler.warmup=0.1dur", "logging.wandb.enabled=false",
              "logging.progress_bar=false", "logging.console_interval=20ba", "data.num_workers=2",
              f"model.config.max_position_embeddings={shape['seq']}", *shape["extra"]]
    train = [sys.executable, "-m", "modernbert_train.cli.main", "train", shape["recipe"]]
    results: dict = {"prepare_s": round(prep_s, 1)}
    runs = {
        "plain": (args.steps, []),
        "fsdp2": (args.fsdp_steps, ["parallelism.fsdp={version: 2, state_dict_type: sharded}"]),
    }
    for name, (steps, extra) in runs.items():
        run_dir = out / "runs" / name
        seconds = run([*train, f"run_name=gpu-{name}", f"save_folder={run_dir}", f"max_duration={steps}ba",
                       f"checkpoint.interval={max(1, steps - 10)}ba", *common, *extra], log, 1200)
        results[name] = {"wall_s": round(seconds, 1), **summarize(run_dir, skip=max(2, steps // 5))}

    if args.step_bench and args.step_bench.exists():
        results["step_bench"] = args.step_bench.read_text()
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nprepare (corpus, tokenizer, shards): {results['prepare_s']} s")
    print(f"{'run':8} {'steps':>6} {'real tok/s':>12} {'MFU':>7} {'loss first->last':>18} {'wall s':>8}  checkpoints")
    for name in runs:
        r = results[name]
        print(f"{name:8} {r['steps']:>6} {r['median_tokens_per_s']:>12,.0f} {r['median_mfu']:>7.3f} "
              f"{r['first_loss']:>8.3f} -> {r['last_loss']:<7.3f} {r['wall_s']:>8}  {', '.join(r['checkpoints'])}")
    plain, fsdp = results["plain"]["median_tokens_per_s"], results["fsdp2"]["median_tokens_per_s"]
    print(f"fsdp2 / plain: {fsdp / plain:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

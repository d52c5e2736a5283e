"""Continued pretraining, measured on CPU: a tiny model pretrained on prose, continued on code.

    python bench/continue_bench.py --out /tmp/continue_bench              # ~15-25 min on 2 busy cores
    python bench/continue_bench.py --out /tmp/cb --pretrain-steps 60 --continue-steps 30 --corpus-mb 0.4  # smoke

What it does, all offline (the demo's corpus: this interpreter's stdlib code and Python prose):
1. a BPE tokenizer trained on the prose only (the "released" model knows general text, not the domain);
2. a tiny ModernBERT pretrained on prose (yamls/tiny/phase1.yaml with a final 20% 1-sqrt decay: a "final"
   release), exported to a Hugging Face folder;
3. four continuations on code at equal steps of equal token slots (>99% packed, so equal tokens), each from
   that folder with yamls/continue/tiny/from_final.yaml's schedule: with / without 25% prose replay, with /
   without vocabulary extension (modernbert-data propose-tokens + extend-vocab --mode append, the top
   --new-tokens code strings; the extended model is also scored before training, its own start);
4. a table of the held-out code (domain) and held-out prose (general) MLM cross-entropy at 15% masking, and
   tokens per character of the held-out code. Held-out files (every 8th code file, every 8th prose record)
   never appear in training.
Cross-entropies are per token: with extension a token covers more text, so also read "nats/char" (CE x
tokens/char), a per-character view of the same loss.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def split_corpus(corpus: Path, out: Path) -> dict[str, list[Path]]:
    """Domain (code) and general (prose) texts, each with a held-out eighth (every 8th code file, every 8th prose
    record), written as plain folders so `prepare` reads them like a user's files."""
    code = sorted(p for p in (corpus / "code").rglob("*.py"))
    records = [line for path in sorted((corpus / "prose").glob("*.jsonl"))
               for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for name in ("code_train", "code_heldout", "prose_train", "prose_heldout"):
        if (out / name).exists():
            shutil.rmtree(out / name)
        (out / name).mkdir(parents=True)
    for i, path in enumerate(code):
        shutil.copyfile(path, out / ("code_heldout" if i % 8 == 0 else "code_train") / f"{i:05d}_{path.name}")
    (out / "prose_train" / "prose.jsonl").write_text("\n".join(r for i, r in enumerate(records) if i % 8) + "\n")
    (out / "prose_heldout" / "prose.jsonl").write_text("\n".join(records[::8]) + "\n")
    return {name: sorted((out / name).iterdir()) for name in ("code_train", "code_heldout", "prose_train",
                                                               "prose_heldout")}


def texts_of(files: list[Path]) -> list[str]:
    from data_prep.tokenizer import iter_training_texts

    return list(iter_training_texts([str(f) for f in files]))


def prepare_all(parts: dict, tokenizer: Path, out: Path) -> dict[str, Path]:
    """Shards of every part with one tokenizer, and the manifests the runs use."""
    from data_prep.prepare import PrepareConfig, prepare

    for name, files in parts.items():
        if not (out / name / "index.json").exists():
            prepare(PrepareConfig(inputs=[str(f) for f in files], out=str(out / name), tokenizer=str(tokenizer),
                                  source=name, max_seq_len=128, progress=False, workers=1))

    def manifest(name: str, weights: dict[str, float]) -> Path:
        lines = [f"name: {name}", "sources:"]
        for source, weight in weights.items():
            lines += [f"  - name: {source}", f"    local: {out / source}"]
            lines += [f"    proportion: {weight}"] if len(weights) > 1 else []
        path = out / f"{name}.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    return {"prose": manifest("prose", {"prose_train": 1.0}), "code": manifest("code", {"code_train": 1.0}),
            "replay": manifest("replay", {"code_train": 0.75, "prose_train": 0.25}),
            "domain": manifest("domain", {"code_heldout": 1.0}), "general": manifest("general", {"prose_heldout": 1.0})}


def train_run(recipe_file: Path, overrides: list[str]) -> list[dict]:
    from modernbert_train.train.recipe import load_recipe
    from modernbert_train.train.trainer import train

    recipe = load_recipe(recipe_file, overrides + ["logging.progress_bar=false"])
    result = train(recipe)
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def last(records: list[dict], key: str) -> float:
    return next(r[key] for r in reversed(records) if key in r)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="work folder (reused: finished steps are kept)")
    parser.add_argument("--corpus-mb", type=float, default=1.0, help="cap on code and on prose, each (1.0)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="the prose tokenizer's size (2048)")
    parser.add_argument("--pretrain-steps", type=int, default=200, help="prose pretraining steps (200)")
    parser.add_argument("--continue-steps", type=int, default=100, help="steps of each continuation (100)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens added by the extension (128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="continuation peak lr (1e-3; pretraining 3e-3)")
    args = parser.parse_args(argv)

    from data_prep.local_corpus import build_local_corpus
    from data_prep.tokenizer import save_tokenizer, train_tokenizer
    from modernbert_train.checkpoint.vocab import extend_hf_folder
    from modernbert_train.data.tokenizer import load_tokenizer
    from modernbert_train.data.vocab_extension import propose_tokens, tokens_per_char
    from modernbert_train.run.export import export_to_hf

    out = Path(args.out).resolve()
    started = time.perf_counter()
    if not (out / "corpus" / "corpus_info.json").exists():
        build_local_corpus(out / "corpus", max_bytes=int(args.corpus_mb * 1e6), overwrite=True)
    parts = split_corpus(out / "corpus", out / "text")
    if not (out / "tokenizer" / "tokenizer.json").exists():
        save_tokenizer(train_tokenizer(texts_of(parts["prose_train"]), args.vocab_size, show_progress=False),
                       out / "tokenizer")
    base = prepare_all(parts, out / "tokenizer" / "tokenizer.json", out / "shards")
    size = ["data.max_seq_len=128", "data.micro_batch_size=4", "data.global_batch_size=8"]
    heldout = lambda m: [f"eval.manifests={{domain: {m['domain']}, general: {m['general']}}}", "eval.max_batches=40"]

    # 1-2: pretrain on prose, export (the "released" model).
    pre = train_run(REPO / "yamls/tiny/phase1.yaml", [
        f"data.manifest={base['prose']}", f"data.tokenizer={out / 'tokenizer'}", f"save_folder={out / 'runs/pretrain'}",
        f"max_duration={args.pretrain_steps}ba", f"eval.interval={args.pretrain_steps}ba",
        f"checkpoint.interval={args.pretrain_steps}ba", "batch_warmup.tokens=2000", "scheduler.decay=0.2dur",
        *size, *heldout(base)])
    if not (out / "hf" / "config.json").exists():
        export_to_hf(out / "runs/pretrain", out / "hf", trust_checkpoint=True)  # the run this script just trained

    # 3: extension from the domain's training text (never the held-out files).
    code_train = texts_of(parts["code_train"])
    if not (out / "hf_ext" / "config.json").exists():
        found, _, _ = propose_tokens(code_train, load_tokenizer(out / "hf"), top=args.new_tokens)
        extend_hf_folder(out / "hf", [c.token for c in found], "append", out / "hf_ext",
                         sample_text=code_train[0][:2000])
    ext = prepare_all(parts, out / "hf_ext" / "tokenizer.json", out / "shards_ext")

    common = [*size, f"checkpoint.interval={args.continue_steps}ba"]
    # The extended model's own start: its held-out texts are tokenized differently, so it is scored as it is
    # (one step at a learning rate of 1e-12) and the +ext runs are compared with it.
    ext_start = train_run(REPO / "yamls/continue/tiny/from_final.yaml", [
        f"data.manifest={ext['code']}", f"data.tokenizer={out / 'hf_ext'}", f"model.init_from=hf:{out / 'hf_ext'}",
        f"save_folder={out / 'runs/ext_start'}", "max_duration=1ba", "eval.interval=1ba", "optimizer.lr=1e-12",
        *common, *heldout(ext)])
    rows = [("pretrained on prose (start)", pre, out / "hf", pre),
            ("+ext, before training (start)", ext_start, out / "hf_ext", ext_start)]
    every = max(1, args.continue_steps // 4)
    for extended in (False, True):
        manifests, folder = (ext, out / "hf_ext") if extended else (base, out / "hf")
        for replay in (False, True):
            name = f"code{'+replay' if replay else ''}{'+ext' if extended else ''}"
            records = train_run(REPO / "yamls/continue/tiny/from_final.yaml", [
                f"data.manifest={manifests['replay' if replay else 'code']}", f"data.tokenizer={folder}",
                f"model.init_from=hf:{folder}", f"save_folder={out / 'runs' / name}",
                f"max_duration={args.continue_steps}ba", f"eval.interval={every}ba",
                f"optimizer.lr={args.lr}", *common, *heldout(manifests)])
            rows.append((name, records, folder, ext_start if extended else pre))

    domain_text = texts_of(parts["code_heldout"])
    # The worst point matters as much as the end: a decaying LR lets a run win back part of what it forgot.
    lines = ["| run | tokens seen | domain CE | general CE | general CE change: end / worst | domain tok/char | "
             "domain nats/char |", "|---|---|---|---|---|---|---|"]
    for name, records, folder, start in rows:
        start_general = last(start, "eval_general/loss")
        tpc = tokens_per_char(load_tokenizer(folder), domain_text)
        domain, general = last(records, "eval_domain/loss"), last(records, "eval_general/loss")
        worst = max(r["eval_general/loss"] for r in records if "eval_general/loss" in r)
        lines.append(f"| {name} | {records[-1]['tokens']:,} | {domain:.3f} | {general:.3f} | "
                     f"{general - start_general:+.3f} / {worst - start_general:+.3f} | {tpc:.4f} | {domain * tpc:.3f} |")
    curve = ["", "general CE during each continuation (every %d steps):" % every]
    for name, records, _, _ in rows[2:]:
        values = [f"{r['eval_general/loss']:.3f}" for r in records if "eval_general/loss" in r]
        curve.append(f"- {name}: {' -> '.join(values)}")
    table = "\n".join(lines + curve)
    print(table)
    (out / "table.md").write_text(table + "\n")
    print(f"\n{time.perf_counter() - started:.0f} s; table in {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

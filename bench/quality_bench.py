#!/usr/bin/env python
"""Encoder quality at equal tokens: our trainer (tiny phase 1) vs a plain transformers loop, with ablations.

Both train the same tiny ModernBERT (6 layers, 128 wide, the demo's 8,192-token tokenizer) on the project's
local corpus (Python stdlib code + Python prose, data_prep/local_corpus.py) for the same number of real tokens,
rows per step, peak LR and warm-up fraction, and are scored by one function: the masked-LM cross-entropy at
a fixed 15% (masks fixed per sequence, modernbert_train/eval/mlm.py's fixed_masks) on held-out text of each
source, built from the stdlib files the corpus reserves for evaluation (never trained on).

Rows of the table:
  plain       the plain loop, written here for comparison only: transformers' ModernBertForMaskedLM and its
              init, torch AdamW, grad clip 1.0, constant LR after linear warm-up, independent random 128-token
              windows of the concatenated corpus (natural mixture), DataCollatorForLanguageModeling at 30%
  shipped     `modernbert-train train yamls/tiny/phase1.yaml` as it is, on the plain loop's data mixture (the
              corpus's natural token shares: a data choice, not the recipe's)
  ours        the recipe given by --ablate-recipe (default the same file) on the demo's 60/40 code/prose mixture:
              the base of the rows below
  ours+X      ours with one choice X switched to the plain loop's (see VARIANTS)
  ours+all    every choice switched at once (must equal plain within noise)
  plain+maskNN  the plain loop with its collator at NN% instead of 30% (ours+maskNN / shipped+maskNN: ours)
  shipped+X   shipped with ours+X's change on top (e.g. shipped+natural128: shards chunked at 128 tokens);
              shipped+X+Y: both changes

Our runs are subprocesses of the real CLI (`python -m modernbert_train.cli.main train ...`), so they take the
library's whole train path. Everything lands in --work (corpus, tokenizer, shards, runs, results.json) and is
reused when present: a rerun only trains what is missing.

examples:
  python bench/quality_bench.py --work /tmp/qb --tokens 3000000 --seeds 0,1,2 --jobs 2
  python bench/quality_bench.py --work /tmp/qb --tokens 200000 --seeds 0 --variants plain,shipped,ours+all
  python bench/quality_bench.py --work /tmp/qb --tokens 200000 --seeds 0,1 --table   # what is done so far
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEQ_LEN = 128
ROWS = 8             # rows of SEQ_LEN tokens per optimizer step (yamls/tiny/phase1.yaml's global batch)
PEAK_LR = 3.0e-3     # yamls/tiny/phase1.yaml
WARMUP = 0.15        # of the run, both sides
TRAIN_MASK = 0.3
EVAL_MASK, EVAL_SEED = 0.15, 1234
EVAL_PIECES = 300    # held-out 128-token pieces per source
RECIPE = REPO / "yamls" / "tiny" / "phase1.yaml"
# One thread per run: on a small shared machine two torch threads per process spin against each other
# (measured 5-10x slower per step than one); parallel runs (--jobs) use the cores instead.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

SHIPPED = ["data.manifest={work}/natural.yaml"]
# One choice each, switched from ours to the plain loop's. Values are recipe overrides; {work}/{seed} filled in.
VARIANTS: dict[str, list[str]] = {
    "ours": [],
    "ours+no_batch_warmup": ["batch_warmup.start_batch_size=null"],
    "ours+adamw": ["optimizer.name=adamw", "optimizer.decouple_lr=false", "optimizer.no_decay=[]"],
    "ours+clip1": ["optimizer.grad_clip_norm=1.0"],
    "ours+hf_init": ["model.init_from=hf:{work}/hf_init/seed{seed}"],
    "ours+hf_head": ["model.config.head_init=output"],
    "ours+natural_mix": ["data.manifest={work}/natural.yaml"],
    "ours+independent_rows": ["data.manifest={work}/demo128.yaml"],
    "ours+natural128": ["data.manifest={work}/natural128.yaml"],
    "ours+windows": ["data.manifest={work}/windows.yaml"],
    "ours+framed": ["data.loader_options.resplit=framed"],
    "ours+no_dropout": ["model.config.attention_output_dropout=0.0"],
}
# Packing buffers of other sizes, in rows of SEQ_LEN tokens (the tiny recipe buffers 2,048; MIN_LOOKAHEAD_ROWS elsewhere).
for _rows in (64, 512, 2048, 4096):
    VARIANTS[f"ours+lookahead{_rows}"] = [f"data.loader_options.packing_lookahead_tokens={_rows * SEQ_LEN}"]
# Masking rates (the plain loop trains at 30%, the tiny recipe at 40%; the score masks 15%).
for _percent in (20, 30, 40):
    VARIANTS[f"ours+mask{_percent}"] = [f"data.mlm_probability={_percent / 100}"]
# Every choice switched to the plain loop's: the data-layout rows are alternatives to natural128, not choices.
_LAYOUTS = ("ours", "ours+natural_mix", "ours+independent_rows", "ours+hf_head", "ours+natural128", "ours+windows",
            "ours+framed")
VARIANTS["ours+all"] = [o for name, over in VARIANTS.items()
                        if name not in _LAYOUTS and not name.startswith(("ours+lookahead", "ours+mask"))
                        for o in over] + ["data.manifest={work}/natural128.yaml"]


def shipped_changes(name: str) -> list[str] | None:
    """shipped+X[+Y...]: the shipped recipe with the changes of ours+X (and ours+Y ...) on top; None if not one."""
    if not name.startswith("shipped+"):
        return None
    changes = [f"ours+{x}" for x in name.removeprefix("shipped+").split("+")]
    if any(c not in VARIANTS for c in changes):
        return None
    return SHIPPED + [o for c in changes for o in VARIANTS[c]]


def plain_mask(name: str) -> float | None:
    """plain+maskNN: the plain loop with the collator at NN% (both sides compared at one masking rate)."""
    rate = name.removeprefix("plain+mask")
    return int(rate) / 100 if name.startswith("plain+mask") and rate.isdigit() and 0 < int(rate) < 100 else None


def known(name: str) -> bool:
    return (name in ("plain", "shipped") or name in VARIANTS or shipped_changes(name) is not None
            or plain_mask(name) is not None)


def sh(argv: list[str], log: Path) -> None:
    with log.open("a") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if result.returncode:
        raise SystemExit(f"failed (exit {result.returncode}): {' '.join(argv)}\n"
                         + "\n".join(log.read_text().splitlines()[-20:]))


# -- data -------------------------------------------------------------------------------------------------
def prepare(work: Path) -> None:
    """Corpus, tokenizer, shards (512-token chunks as the demo; 128-token chunks for independent rows),
    manifests and held-out pieces, each only when missing."""
    data, log = [sys.executable, "-m", "data_prep.cli"], work / "prepare.log"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "corpus" / "corpus_info.json").exists():
        sh([*data, "build-local-corpus", "--out", str(work / "corpus"), "--max-mb", "6", "--overwrite"], log)
    if not (work / "tokenizer" / "tokenizer.json").exists():
        sh([*data, "train-tokenizer", str(work / "corpus"), "--vocab-size", "8192", "--out", str(work / "tokenizer")], log)
    for chunk in (512, 128):
        for source in ("code", "prose"):
            out = work / f"shards{'' if chunk == 512 else chunk}" / source
            if not (out / "prep_meta.json").exists():
                sh([*data, "prepare", str(work / "corpus" / source), "--tokenizer", str(work / "tokenizer"), "--out",
                    str(out), "--source", source, "--max-seq-len", str(chunk), "--workers", "2", "--no-progress"], log)
    if not (work / "windows" / "prose" / "prep_meta.json").exists():
        write_windows(work)
    import yaml

    tokens = {s: json.loads((work / "shards" / s / "prep_meta.json").read_text())["tokens"] for s in ("code", "prose")}
    natural = {s: n / sum(tokens.values()) for s, n in tokens.items()}
    for name, folder, shares in (("demo", "shards", {"code": 0.6, "prose": 0.4}),
                                 ("natural", "shards", natural), ("demo128", "shards128", {"code": 0.6, "prose": 0.4}),
                                 ("natural128", "shards128", natural), ("windows", "windows", natural)):
        spec = {"name": name, "sources": [{"name": s, "local": str(work / folder / s), "proportion": round(p, 4)}
                                          for s, p in shares.items()]}
        (work / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    if not (work / "heldout.json").exists():
        (work / "heldout.json").write_text(json.dumps(heldout_pieces(work / "tokenizer" / "tokenizer.json")))


def write_windows(work: Path) -> None:
    """The plain loop's data layout as shards: each source's samples concatenated and cut into consecutive
    windows that cross documents, each framed [CLS] + SEQ_LEN - 2 ids + [SEP] so that it is one whole piece
    (full attention inside, as the plain loop's random windows), for the ours+windows rows."""
    import shutil

    import numpy as np
    from streaming import MDSWriter

    from data_prep.prepare import mds_columns

    for source in ("code", "prose"):
        meta = json.loads((work / "shards" / source / "prep_meta.json").read_text())
        cls_id, sep_id = meta["special_token_ids"]["cls_id"], meta["special_token_ids"]["sep_id"]
        stream = corpus_stream(work, (source,)).astype(meta["dtype"])
        body, out = SEQ_LEN - 2, work / "windows" / source
        count = len(stream) // body
        shutil.rmtree(out, ignore_errors=True)
        with MDSWriter(out=str(out), columns=mds_columns(meta["vocab_size"]), compression="zstd") as writer:
            for i in range(count):
                window = np.concatenate([[cls_id], stream[i * body:(i + 1) * body], [sep_id]]).astype(stream.dtype)
                writer.write({"input_ids": window, "doc_id": i, "chunk_index": 0, "source": source})
        meta.update(max_seq_len=SEQ_LEN, documents=count, chunks=count, tokens=count * SEQ_LEN,
                    content_tokens=count * body)
        meta.pop("length_histograms", None)
        (out / "prep_meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the folder complete


def heldout_pieces(tokenizer_file: Path) -> dict[str, list[list[int]]]:
    """[CLS] .. [SEP] pieces of at most SEQ_LEN ids from the stdlib files reserved for evaluation (never in the
    corpus): their source (code) and their docstrings (prose), in a fixed order, EVAL_PIECES of each."""
    import hashlib

    from tokenizers import Tokenizer

    from data_prep.local_corpus import _docstrings_of
    from modernbert_train.eval.heldout import stdlib_dir, stdlib_python_files

    tok = Tokenizer.from_file(str(tokenizer_file))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    root = stdlib_dir()
    files = sorted(stdlib_python_files(root, reserved=True),
                   key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).digest())
    texts: dict[str, list[str]] = {"code": [], "prose": []}
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            docs = _docstrings_of(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        texts["code"].append(source)
        if docs:
            texts["prose"].append("\n\n".join(docs))
    out: dict[str, list[list[int]]] = {}
    for kind, items in texts.items():
        pieces: list[list[int]] = []
        for text in items:
            ids = [i for i in tok.encode(text, add_special_tokens=False).ids]
            # At most 4 pieces a file, so that the score spreads over many files.
            for start in range(0, min(len(ids), 4 * (SEQ_LEN - 2)), SEQ_LEN - 2):
                body = ids[start:start + SEQ_LEN - 2]
                if len(body) >= 32:
                    pieces.append([cls_id, *body, sep_id])
            if len(pieces) >= EVAL_PIECES:
                break
        out[kind] = pieces[:EVAL_PIECES]
    return out


# -- scoring ----------------------------------------------------------------------------------------------
def score(model, work: Path) -> dict[str, float]:
    """Fixed-mask (15%) held-out MLM cross-entropy per source, our packed forward (any weights loaded in it)."""
    import torch

    from modernbert_train.eval.encoder import PackedBatch
    from modernbert_train.eval.mlm import fixed_masks

    heldout = json.loads((work / "heldout.json").read_text())
    model.eval()
    result = {}
    with torch.no_grad():
        for kind, pieces in heldout.items():
            masked = fixed_masks(pieces, work / "tokenizer" / "tokenizer.json", EVAL_MASK, EVAL_SEED)
            loss_sum, count = 0.0, 0
            for start in range(0, len(masked), 32):
                chunk = masked[start:start + 32]
                batch = PackedBatch.of([ids for ids, _ in chunk], "cpu")
                labels = torch.tensor([t for _, lab in chunk for t in lab])
                out = model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, labels=labels)
                loss_sum += float(out.loss) * int(out.num_masked)
                count += int(out.num_masked)
            result[kind] = loss_sum / count
    return result


# -- the plain transformers loop --------------------------------------------------------------------------
def hf_config(work: Path, dropout: float = 0.0):
    from tokenizers import Tokenizer
    from transformers import ModernBertConfig

    from modernbert_train.model import ModernBertConfig as OurConfig

    tok = Tokenizer.from_file(str(work / "tokenizer" / "tokenizer.json"))
    tiny = OurConfig.preset("tiny")
    ids = {k: tok.token_to_id(t) for k, t in (("pad", "[PAD]"), ("cls", "[CLS]"), ("sep", "[SEP]"))}
    return ModernBertConfig(vocab_size=8192, hidden_size=tiny.hidden_size, num_hidden_layers=tiny.num_hidden_layers,
                            num_attention_heads=tiny.num_attention_heads, intermediate_size=tiny.intermediate_size,
                            local_attention=tiny.local_attention, max_position_embeddings=tiny.max_position_embeddings,
                            global_rope_theta=10000.0, local_rope_theta=10000.0, attention_dropout=dropout,
                            embedding_dropout=0.0, mlp_dropout=0.0, pad_token_id=ids["pad"], cls_token_id=ids["cls"],
                            sep_token_id=ids["sep"], bos_token_id=ids["cls"], eos_token_id=ids["sep"],
                            sparse_prediction=True, reference_compile=False)


def hf_init_folder(work: Path, seed: int) -> Path:
    """transformers' own initialisation of the tiny model for `seed`, saved for `model.init_from=hf:`."""
    import torch
    from transformers import ModernBertForMaskedLM

    folder = work / "hf_init" / f"seed{seed}"
    if not (folder / "config.json").exists():
        torch.manual_seed(seed)
        ModernBertForMaskedLM(hf_config(work)).save_pretrained(folder)
    return folder


def corpus_stream(work: Path, sources: tuple[str, ...] = ("code", "prose")):
    """The sources' 512-token shard samples concatenated in order, as int64 ids."""
    import numpy as np

    from modernbert_train.data.shards import iter_samples

    parts = [s["input_ids"].astype(np.int64) for src in sources for s in iter_samples(work / "shards" / src)]
    return np.concatenate(parts)


def train_plain(work: Path, seed: int, tokens: int, mask: float = TRAIN_MASK) -> dict:
    import numpy as np
    import torch
    from transformers import DataCollatorForLanguageModeling, ModernBertForMaskedLM, PreTrainedTokenizerFast

    from modernbert_train.model import ModernBertForMaskedLM as Ours

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(work / "tokenizer" / "tokenizer.json"), cls_token="[CLS]",
                                        sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]", unk_token="[UNK]")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mask)
    stream = corpus_stream(work)
    torch.manual_seed(seed)
    model = ModernBertForMaskedLM(hf_config(work)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5)
    steps = tokens // (ROWS * SEQ_LEN)
    warm = max(1, round(WARMUP * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - SEQ_LEN, size=ROWS)
        batch = collator([{"input_ids": stream[s:s + SEQ_LEN].tolist()} for s in starts])
        out = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]),
                    labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    return {"scores": score(Ours.from_hf(model.eval()), work), "steps": steps, "tokens": steps * ROWS * SEQ_LEN,
            "final_train_loss": statistics.fmean(losses[-20:])}


# -- our trainer ------------------------------------------------------------------------------------------
def train_ours(work: Path, name: str, overrides: list[str], seed: int, tokens: int, recipe: Path) -> dict:
    from modernbert_train.checkpoint import latest_checkpoint, load_model_weights_from_checkpoint
    from modernbert_train.model import ModernBertForMaskedLM

    # Named by its length too: a run folder of another length would be resumed (checkpoint.autoresume).
    run_name = f"{name.replace('+', '_')}-seed{seed}-{tokens}tok"  # letters, digits, '.', '_', '-' only
    run_dir = work / "runs" / run_name
    if any("hf_init" in o for o in overrides):
        hf_init_folder(work, seed)
    filled = [o.format(work=work, seed=seed) for o in overrides]
    argv = [sys.executable, "-m", "modernbert_train.cli.main", "train", str(recipe), f"run_name={run_name}",
            f"save_folder={run_dir}", f"seed={seed}", f"max_duration={tokens}tok", f"data.manifest={work}/demo.yaml",
            f"data.tokenizer={work}/tokenizer", f"data.global_batch_size={ROWS}", "checkpoint.interval=100000ba",
            "logging.console_interval=50ba", "logging.progress_bar=false", *filled]
    sh(argv, work / "runs" / f"{run_name}.log")
    model_dir_cfg = json.loads((run_dir / "model_config.json").read_text())
    from modernbert_train.model import ModernBertConfig

    config = ModernBertConfig(**{k: v for k, v in model_dir_cfg.items() if k in ModernBertConfig.__dataclass_fields__}) \
        if model_dir_cfg else None
    model = ModernBertForMaskedLM(config)
    step = load_model_weights_from_checkpoint(model, latest_checkpoint(run_dir), trust=True)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seen = max(int(l.get("tokens", 0) or 0) for l in lines) if lines else 0
    train_losses = [l["train/loss"] for l in lines if "train/loss" in l][-20:]
    return {"scores": score(model, work), "steps": step, "tokens": seen,
            "final_train_loss": statistics.fmean(train_losses) if train_losses else None}


# -- table ------------------------------------------------------------------------------------------------
def summarise(results: dict, names: list[str], seeds: list[int]) -> str:
    def stats(name: str, kind: str) -> tuple[float, float, list[float]]:
        values = [results[f"{name}/{s}"]["scores"][kind] for s in seeds if f"{name}/{s}" in results]
        if not values:
            return math.nan, math.nan, []
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values

    lines = [f"{'run':<24}{'prose CE (mean ± std)':>24}{'Δ vs plain':>12}{'code CE (mean ± std)':>24}{'Δ vs plain':>12}"
             f"{'seeds':>7}"]
    plain = {kind: stats("plain", kind)[0] for kind in ("prose", "code")}
    for name in names:
        cells = []
        n = 0
        for kind in ("prose", "code"):
            mean, std, values = stats(name, kind)
            n = len(values)
            cells.append(f"{mean:>15.4f} ± {std:.4f}{mean - plain[kind]:>+12.4f}")
        lines.append(f"{name:<24}{''.join(cells)}{n:>7}")
    return "\n".join(lines)


def run_one(work: Path, name: str, seed: int, tokens: int, ablate_recipe: Path) -> dict:
    """One row's run for one seed, in this process (the parent starts one subprocess per run)."""
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    if name == "plain":
        result = train_plain(work, seed, tokens)
    elif plain_mask(name) is not None:
        result = train_plain(work, seed, tokens, plain_mask(name))
    elif name == "shipped":
        # The same data as the plain loop (natural token shares): the mixture is the user's data choice.
        result = train_ours(work, name, SHIPPED, seed, tokens, RECIPE)
    elif shipped_changes(name) is not None:
        result = train_ours(work, name, shipped_changes(name), seed, tokens, RECIPE)
    else:
        result = train_ours(work, name, VARIANTS[name], seed, tokens, ablate_recipe)
    result.update(tokens_asked=tokens, seconds=round(time.perf_counter() - started, 1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="examples:" + __doc__.split("examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for corpus, tokenizer, shards, runs (reused)")
    parser.add_argument("--tokens", type=int, default=200_000, help="real training tokens per run (default 200000)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--variants", default=",".join(["plain", "shipped", *VARIANTS]),
                        help=f"comma-separated rows (default all: plain,shipped,{','.join(VARIANTS)})")
    parser.add_argument("--ablate-recipe", type=Path, default=RECIPE,
                        help="the recipe the ours* rows start from (default yamls/tiny/phase1.yaml; give the "
                             "recipe before a change to measure what the change fixed)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    parser.add_argument("--table", action="store_true", help="print the table of the runs already done, run nothing")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # NAME/SEED: one run, in this process
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.variants.split(",")
    unknown = [n for n in names if not known(n)]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from plain, plain+maskNN, shipped, shipped+X, "
                     f"{', '.join(VARIANTS)}")
    results_dir = work / "results"
    if args.one:
        name, seed = args.one.rsplit("/", 1)
        result = run_one(work, name, int(seed), args.tokens, args.ablate_recipe.resolve())
        (results_dir / f"{name}-seed{seed}-{args.tokens}.json").write_text(json.dumps(result, indent=1))
        return 0
    if not args.table:
        prepare(work)
    (work / "runs").mkdir(exist_ok=True)
    results_dir.mkdir(exist_ok=True)
    todo = [] if args.table else [(n, s) for s in seeds for n in names
                                  if not (results_dir / f"{n}-seed{s}-{args.tokens}.json").exists()]

    def launch(item):
        name, seed = item
        argv = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--tokens", str(args.tokens),
                "--ablate-recipe", str(args.ablate_recipe.resolve()), "--one", f"{name}/{seed}"]
        sh(argv, work / "runs" / f"{name}-seed{seed}.bench.log")
        result = json.loads((results_dir / f"{name}-seed{seed}-{args.tokens}.json").read_text())
        print(f"{name}/{seed}: {result['scores']} ({result['steps']} steps, {result['seconds']:.0f}s)", flush=True)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(launch, todo))
    results = {}
    for name in names:
        for seed in seeds:
            file = results_dir / f"{name}-seed{seed}-{args.tokens}.json"
            if file.exists():
                results[f"{name}/{seed}"] = json.loads(file.read_text())
    print(f"\nheld-out MLM cross-entropy at fixed 15% masks, {args.tokens} training tokens, {ROWS} x {SEQ_LEN} "
          f"rows per step, seeds {seeds}")
    print(summarise(results, names, seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Which choice of our recipe costs held-out MLM loss: a bare torch loop over OUR model, loader and optimizer,
switching one choice at a time between the plain transformers loop's and ours (issue 27).

bench/quality_bench.py compares whole trainers; this isolates. Every run trains the tiny model (6 x 128, the
quality bench's corpus, tokenizer and held-out pieces in --work, prepared by quality_bench.py first) for --tokens
real tokens, 8 x 128 tokens a step, peak LR 3e-3 after a linear warm-up of 15% of the steps, then constant, and is
scored by quality_bench.score (fixed 15% masks, per source). The choices:
  --data     windows: random 128-token windows of the concatenated corpus + DataCollatorForLanguageModeling 30%
             (the plain loop's); demo / natural / demo128 / natural128: our loader on that manifest of --work
  --resplit  contiguous | framed: how our loader cuts the shards' 512-token chunks into 128-token pieces
  --opt      adamw (torch, decay on everything, multiplied by lr) | stable_adamw (optimi, decay decoupled, none on
             norms and biases: our recipe's)
  --clip     global gradient-norm clip (0: none)
  --init     hf: transformers' init of the same model | ours: ModernBertForMaskedLM's own
  --head-init  input | output: the head's dense sigma (ours defaults to input, the authors'; transformers: output)
  --dropout  attention-output dropout

examples:
  python bench/quality_isolate.py --work /tmp/qb --tokens 1000000 --data windows --opt adamw --clip 1 --init hf
  python bench/quality_isolate.py --work /tmp/qb --tokens 1000000 --data demo --opt stable_adamw --clip 0 \\
      --init ours --dropout 0.1 --out /tmp/qb/isolate/O.json
  python bench/quality_isolate.py --work /tmp/qb --table /tmp/qb/isolate     # the runs' results as a table
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

ROWS, SEQ_LEN, WARMUP = 8, 128, 0.15


def build_model(work: Path, init: str, head_init: str | None, dropout: float):
    import torch
    from transformers import ModernBertForMaskedLM as HFModel

    import quality_bench
    from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

    from tokenizers import Tokenizer

    hf_config = quality_bench.hf_config(work)
    mask_id = Tokenizer.from_file(str(work / "tokenizer" / "tokenizer.json")).token_to_id("[MASK]")
    if init == "hf":
        model = ModernBertForMaskedLM.from_hf(HFModel(hf_config))
        for name, module in model.named_modules():
            if name.endswith("out_drop"):
                module.p = dropout
    else:
        model = ModernBertForMaskedLM(ModernBertConfig.preset(
            "tiny", vocab_size=hf_config.vocab_size, global_rope_theta=1e4, local_rope_theta=1e4,
            attention_output_dropout=dropout, pad_token_id=hf_config.pad_token_id, cls_token_id=hf_config.cls_token_id,
            sep_token_id=hf_config.sep_token_id, bos_token_id=hf_config.cls_token_id,
            eos_token_id=hf_config.sep_token_id, mask_token_id=mask_id, max_position_embeddings=128,
            head_init=head_init or "input"))
    if init == "hf" and head_init is not None:
        std = 0.02 if head_init == "input" else 0.02 / math.sqrt(2 * model.config.num_hidden_layers)
        with torch.no_grad():
            torch.nn.init.trunc_normal_(model.head.dense.weight, std=std, a=-2 * std, b=2 * std)
    return model


def batches(work: Path, data: str, seed: int, resplit: str = "contiguous", lookahead_rows: int | None = None):
    import numpy as np
    import torch

    import quality_bench

    if data != "windows":
        from modernbert_train.data import MLMLoaderConfig, build_mlm_loader

        loader = iter(build_mlm_loader(MLMLoaderConfig(
            manifest=str(work / f"{data}.yaml"), tokenizer=str(work / "tokenizer"), max_seq_len=SEQ_LEN,
            micro_batch_size=ROWS, global_batch_size=ROWS, mlm_probability=0.3, seed=seed, resplit=resplit,
            packing_lookahead_tokens=None if lookahead_rows is None else lookahead_rows * SEQ_LEN)))
        while True:
            mb = next(loader)["micro_batches"][0]
            yield mb["input_ids"], mb["cu_seqlens"], mb["max_seqlen"], mb["labels"]
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(work / "tokenizer" / "tokenizer.json"), cls_token="[CLS]",
                                        sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]", unk_token="[UNK]")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3)
    stream, rng = quality_bench.corpus_stream(work), np.random.default_rng(seed)
    bounds = torch.arange(0, ROWS * SEQ_LEN + 1, SEQ_LEN, dtype=torch.int32)
    while True:
        starts = rng.integers(0, len(stream) - SEQ_LEN, size=ROWS)
        batch = collator([{"input_ids": stream[s:s + SEQ_LEN].tolist()} for s in starts])
        yield batch["input_ids"].reshape(-1), bounds, SEQ_LEN, batch["labels"].reshape(-1)


def run(args) -> dict:
    import numpy as np
    import torch

    import quality_bench
    from modernbert_train.train.optim import build_optimizer
    from modernbert_train.train.recipe_schema import OptimizerConfig

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = build_model(args.work, args.init, args.head_init, args.dropout).train()
    ours = args.opt == "stable_adamw"
    optimizer, _ = build_optimizer(model, OptimizerConfig(
        name=args.opt, lr=args.lr, betas=[0.9, 0.98], eps=1e-6, weight_decay=1e-5,
        no_decay=["norms", "biases"] if ours else [], decouple_lr=ours))
    steps = args.tokens // (ROWS * SEQ_LEN)
    warm = max(1, round(WARMUP * steps))
    data = batches(args.work, args.data, args.seed, args.resplit, args.lookahead_rows)
    losses, started = [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / warm)
        input_ids, cu_seqlens, max_seqlen, labels = next(data)
        out = model(input_ids, cu_seqlens, max_seqlen, labels=labels)
        out.loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    return {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "steps": steps,
            "train_loss_last50": round(float(np.mean(losses[-50:])), 4),
            "seconds": round(time.perf_counter() - started), "scores": quality_bench.score(model, args.work)}


def table(folder: Path) -> str:
    rows = [json.loads(p.read_text()) | {"name": p.stem} for p in sorted(folder.glob("*.json"))]
    lines = ["| run | data | optimizer | clip | init | head | dropout | seed | prose CE | code CE | train loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['data']} | {r['opt']} | {r['clip']:g} | {r['init']} | "
                     f"{r.get('head_init') or ('output' if r['init'] == 'hf' else 'input')} | {r['dropout']:g} | "
                     f"{r['seed']} | {r['scores']['prose']:.3f} | {r['scores']['code']:.3f} | {r['train_loss_last50']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="examples:" + __doc__.split("examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="quality_bench.py's --work (prepared there)")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="windows", help="windows | demo | natural | demo128 | natural128")
    parser.add_argument("--resplit", default="contiguous", choices=("contiguous", "framed"),
                        help="how our loader cuts 512-token chunks into 128-token pieces (data.loader_options.resplit)")
    parser.add_argument("--lookahead-rows", type=int, default=None,
                        help="the packer's lookahead in max_seq_len rows (data.loader_options.packing_lookahead_tokens"
                             " / max_seq_len; default the loader's floor of 64)")
    parser.add_argument("--opt", default="adamw", choices=("adamw", "stable_adamw"))
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--init", default="hf", choices=("hf", "ours"))
    parser.add_argument("--head-init", default=None, choices=("input", "output"))
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, help="write the result here (JSON)")
    parser.add_argument("--table", type=Path, help="print the results in this folder as a table; run nothing")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if not (args.work / "heldout.json").exists():
        parser.error(f"--work {args.work}: not prepared; run bench/quality_bench.py --work {args.work} first")
    result = run(args)
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    os._exit(0)  # the loader's streaming threads would otherwise hold the exit


if __name__ == "__main__":
    raise SystemExit(main())

"""Fine-tuning step: our packed encoder + classification head vs transformers' ModernBertForSequenceClassification
on padded batches, same weights, same texts (GLUE-like mixed lengths). Prints a table with ratios against
transformers measured in the same run, and the logit difference of the two on the batch.

  python bench/finetune_bench.py --device cpu --preset tiny --batch 32 --steps 5
  python bench/finetune_bench.py --device cuda --preset base --batch 64 --steps 20 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F


def _texts(n: int, rng: np.random.Generator, vocab: int, max_len: int) -> list[list[int]]:
    # GLUE-like: most inputs short, a long tail (lengths 8 .. max_len, log-uniform).
    lengths = np.exp(rng.uniform(np.log(8), np.log(max_len), n)).astype(int)
    return [[1] + rng.integers(5, vocab, size=l - 2).tolist() + [2] for l in lengths]


def main() -> None:
    import transformers

    from modernbert_train.eval.encoder import PackedBatch, SequenceClassifier
    from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = ModernBertConfig.preset(args.preset, vocab_size=8192, pad_token_id=3, cls_token_id=1, sep_token_id=2,
                                     mask_token_id=4, bos_token_id=1, eos_token_id=2)
    mlm = ModernBertForMaskedLM(config)
    ours = SequenceClassifier(mlm, num_labels=3)  # shares the encoder and head modules of `mlm`
    with tempfile.TemporaryDirectory() as tmp:
        mlm.save_hf(tmp)
        attn = "sdpa" if device.type == "cpu" else "flash_attention_2"
        try:
            theirs = transformers.ModernBertForSequenceClassification.from_pretrained(
                tmp, num_labels=3, classifier_pooling="mean", attn_implementation=attn)
        except (ImportError, ValueError):
            attn = "sdpa"
            theirs = transformers.ModernBertForSequenceClassification.from_pretrained(
                tmp, num_labels=3, classifier_pooling="mean", attn_implementation=attn)
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    rng = np.random.default_rng(0)
    batches = [_texts(args.batch, rng, 8192, args.max_len) for _ in range(args.steps + 1)]
    labels = torch.zeros(args.batch, dtype=torch.long, device=device)

    def padded(seqs):
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        return ids.to(device), mask.to(device)

    def step_ours(seqs):
        F.cross_entropy(ours(PackedBatch.of(seqs, device)).float(), labels).backward()

    def step_theirs(seqs):
        ids, mask = padded(seqs)
        F.cross_entropy(theirs(input_ids=ids, attention_mask=mask).logits.float(), labels).backward()

    with torch.no_grad():
        ours.eval(), theirs.eval()
        ids, mask = padded(batches[0])
        diff = (ours(PackedBatch.of(batches[0], device)) - theirs(input_ids=ids, attention_mask=mask).logits).abs().max()
    ours.train(), theirs.train()
    times = {"ours packed": [], f"transformers padded ({attn})": []}
    for seqs in batches[1:]:  # interleaved, so load on a shared machine hits both alike
        for name, fn in zip(times, (step_ours, step_theirs)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn(seqs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
    real = np.mean([sum(map(len, b)) for b in batches[1:]])
    padded_tokens = np.mean([len(b) * max(map(len, b)) for b in batches[1:]])
    print(f"{args.preset} on {device} {args.dtype}, batch {args.batch}, lengths 8..{args.max_len}: "
          f"{real:.0f} real tokens per batch, {padded_tokens:.0f} with padding; max |logit diff| {float(diff):.2e}")
    base = np.median(times[f"transformers padded ({attn})"])
    print(f"{'implementation':<32} {'median s/step':>14} {'real tok/s':>12} {'vs transformers':>16}")
    for name, values in times.items():
        median = np.median(values)
        print(f"{name:<32} {median:>14.4f} {real / median:>12,.0f} {base / median:>15.2f}x")


if __name__ == "__main__":
    main()

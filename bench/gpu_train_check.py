#!/usr/bin/env python
"""GPU checks of a training step that CPU tests can only imitate (issue 12, items 1 and 3).

  sync-free   whole training steps (two micro-batches: forward, loss, backward, train-metric updates, then
              gradient clipping and the StableAdamW step) under torch.cuda.set_sync_debug_mode("error"):
              any host read of device memory raises.
  fsdp2-adamw FSDP2 (fully_shard, one GPU, NCCL) with StableAdamW against the same model unsharded, 20 steps:
              the sharded optimizer must take the DTensor-safe path (no optimi Triton kernels) and give the
              unsharded losses and weights.

Needs the project's environment (torch, torch-optimi >= 0.3, composer); prints one line per check and exits 1
if any fails. bench/gpu_check.sh runs it.

example:
  python bench/gpu_train_check.py --steps 20
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM  # noqa: E402
from modernbert_train.train.composer_model import ModernBertMLM  # noqa: E402
from modernbert_train.train.optim import build_optimizer  # noqa: E402
from modernbert_train.train.recipe import OptimizerConfig  # noqa: E402

VOCAB, BUDGET = 512, 2048


def micro_batch(seed: int, device: str) -> dict:
    """A packed micro-batch as the loader emits it: host-side counts, device tensors."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(64, 512, (64,), generator=gen).tolist()
    bounds = [0]
    for n in lengths:
        if bounds[-1] + n > BUDGET:
            break
        bounds.append(bounds[-1] + n)
    docs = len(bounds) - 1
    if bounds[-1] < BUDGET:
        bounds.append(BUDGET)  # the padding tail, one segment
    ids = torch.randint(5, VOCAB, (BUDGET,), generator=gen)
    labels = torch.where(torch.rand(BUDGET, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    labels[bounds[docs]:] = -100
    cu = torch.tensor(bounds, dtype=torch.int32)
    return {"input_ids": ids.to(device), "cu_seqlens": cu.to(device), "labels": labels.to(device),
            "max_seqlen": int((cu[1:] - cu[:-1]).max()), "num_masked": int((labels != -100).sum()),
            "num_tokens": bounds[docs], "num_docs": docs,
            "document_lengths": [b - a for a, b in zip(bounds[:-1], bounds[1:])][:docs]}


def config(backend: str) -> ModernBertConfig:
    return ModernBertConfig.preset("tiny", vocab_size=VOCAB, pad_token_id=3, cls_token_id=1, sep_token_id=2,
                                   mask_token_id=4, bos_token_id=1, eos_token_id=2, attn_backend=backend,
                                   max_position_embeddings=BUDGET)


def training_step(composer_model, optimizer, micro_batches, metrics) -> None:
    for metric in metrics.values():
        metric.reset()
    for mb in micro_batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs = composer_model(mb)
            loss = composer_model.loss(outputs, mb)
        (loss * (mb["num_masked"] / sum(m["num_masked"] for m in micro_batches))).backward()
        for metric in metrics.values():
            composer_model.update_metric(mb, outputs, metric)
    torch.nn.utils.clip_grad_norm_(composer_model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check_sync_free(steps: int) -> tuple[bool, str]:
    torch.manual_seed(0)
    composer_model = ModernBertMLM(ModernBertForMaskedLM(config("auto")).cuda())
    optimizer, _ = build_optimizer(composer_model.model, OptimizerConfig(lr=1e-3), device="gpu")
    metrics = composer_model.get_metrics(is_train=True)
    for metric in metrics.values():
        metric.to("cuda")
    batches = [[micro_batch(10 * s + i, "cuda") for i in range(2)] for s in range(steps + 1)]
    training_step(composer_model, optimizer, batches[0], metrics)  # first step: optimizer state, kernel caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step_batches in batches[1:]:
            training_step(composer_model, optimizer, step_batches, metrics)
    except RuntimeError as err:
        return False, f"host sync inside a training step: {err}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    accuracy = metrics["masked_accuracy"].compute().item()  # the logging interval's single host read
    triton = [g["triton"] for g in optimizer.param_groups]
    return True, f"{steps} steps x 2 micro-batches, no host sync (optimi triton={triton}, accuracy {accuracy:.3f})"


def check_fsdp2_stable_adamw(steps: int) -> tuple[bool, str]:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        reference = ModernBertForMaskedLM(config("auto")).cuda()
        sharded = copy.deepcopy(reference)
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        cfg = OptimizerConfig(lr=1e-3, weight_decay=1e-5)
        reference_opt, _ = build_optimizer(reference, cfg, device="gpu")
        sharded_opt, _ = build_optimizer(sharded, cfg, device="gpu")
        worst = 0.0
        for step in range(steps):
            mb = micro_batch(1000 + step, "cuda")
            losses = []
            for model, opt in ((reference, reference_opt), (sharded, sharded_opt)):
                loss = model(mb["input_ids"], mb["cu_seqlens"], mb["max_seqlen"], labels=mb["labels"]).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            worst = max(worst, abs(losses[0] - losses[1]) / abs(losses[0]))
        full = {name: p.full_tensor() for name, p in sharded.named_parameters()}
        weight_diff = max((full[n] - p.detach()).abs().max().item() for n, p in reference.named_parameters())
        paths = ([g["triton"] for g in reference_opt.param_groups], [g["triton"] for g in sharded_opt.param_groups])
        ok = worst < 1e-4 and weight_diff < 1e-4 and not any(paths[1])
        return ok, (f"{steps} steps: max rel loss diff {worst:.2e}, max |weight diff| {weight_diff:.2e}, "
                    f"optimi triton unsharded={paths[0]} sharded={paths[1]}")
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_train_check: no CUDA device", file=sys.stderr)
        return 2
    failed = 0
    for name, check in (("sync-free", check_sync_free), ("fsdp2-adamw", check_fsdp2_stable_adamw)):
        try:
            ok, detail = check(args.steps)
        except Exception as err:  # a crash is a failed check; report it and run the others
            ok, detail = False, f"{type(err).__name__}: {err}"
        print(f"{'PASS' if ok else 'FAIL'} {name:12s} {detail}", flush=True)
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""One training step (forward + backward + optimizer) of our model vs transformers' ModernBertForMaskedLM.

Same config, same documents, same machine, same run. Prints real (non-pad) tokens/s, model TFLOP/s, MFU
against this card's measured bf16 matmul rate (GPU), peak memory, and the ratio to the baseline
`hf-sdpa-sparse` (transformers, sdpa attention, MLM head only on masked tokens) of the same workload.

Workloads per sequence length: `fixed` (every document exactly seq_len tokens) and `variable` (document
lengths drawn log-normally, so that transformers' padded rows are about half padding; we pack the same
documents into rows of seq_len).

Needs only torch and transformers (no composer, no streaming): runs on the GPU benchmark machine as is.

examples:
  python bench/step_bench.py --device cpu --preset tiny --seq-lens 256 --tokens 4096 --steps 3
  python bench/step_bench.py --device cuda --preset base --seq-lens 1024,8192 --tokens 65536 --compile both
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM, available_backends  # noqa: E402
from modernbert_train.model.flops import training_flops  # noqa: E402
from modernbert_train.model.hf import config_to_hf_dict  # noqa: E402

BASELINE = "hf-sdpa-sparse"


@dataclass
class Workload:
    name: str
    seq_len: int
    documents: list[torch.Tensor]  # token ids per document
    labels: list[torch.Tensor]


def make_workload(kind: str, seq_len: int, tokens: int, vocab: int, seed: int = 0) -> Workload:
    g = torch.Generator().manual_seed(seed)
    if kind == "fixed":
        lengths = [seq_len] * max(1, tokens // seq_len)
    else:
        # log-normal lengths, median ~ seq_len/3: transformers' rows come out roughly half padding.
        lengths, budget = [], tokens // 2
        while sum(lengths) < budget:
            length = int(math.exp(math.log(seq_len / 3) + 0.9 * torch.randn(1, generator=g).item()))
            lengths.append(min(seq_len, max(8, length)))
    docs, labels = [], []
    for length in lengths:
        ids = torch.randint(10, vocab, (length,), generator=g)
        masked = torch.rand(length, generator=g) < 0.3
        labels.append(torch.where(masked, ids, torch.full_like(ids, -100)))
        docs.append(ids)
    return Workload(kind, seq_len, docs, labels)


def pack_rows(workload: Workload) -> list[list[int]]:
    """First-fit-decreasing into rows of seq_len tokens (the training loader does best-fit; same idea)."""
    rows: list[list[int]] = []
    space: list[int] = []
    for index in sorted(range(len(workload.documents)), key=lambda i: -len(workload.documents[i])):
        length = len(workload.documents[index])
        for r, free in enumerate(space):
            if free >= length:
                rows[r].append(index)
                space[r] -= length
                break
        else:
            rows.append([index])
            space.append(workload.seq_len - length)
    return rows


def ours_batch(workload: Workload, device, pad_id: int, placements: list | None = None):
    """Packed stream of the workload; `placements` collects (document index, start token)."""
    ids, labels, lengths = [], [], []
    for row in pack_rows(workload):
        used = 0
        for index in row:
            if placements is not None:
                placements.append((index, sum(lengths)))
            ids.append(workload.documents[index])
            labels.append(workload.labels[index])
            lengths.append(len(workload.documents[index]))
            used += lengths[-1]
        if used < workload.seq_len:  # tail padding: its own segment, never a target
            pad = workload.seq_len - used
            ids.append(torch.full((pad,), pad_id))
            labels.append(torch.full((pad,), -100))
            lengths.append(pad)
    cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    labels = torch.cat(labels)
    return dict(input_ids=torch.cat(ids).to(device), cu_seqlens=cu.to(device), max_seqlen=max(lengths),
                labels=labels.to(device), num_masked=int((labels != -100).sum()))


def hf_batch(workload: Workload, device, pad_id: int):
    rows = len(workload.documents)
    ids = torch.full((rows, workload.seq_len), pad_id)
    labels = torch.full((rows, workload.seq_len), -100)
    mask = torch.zeros((rows, workload.seq_len), dtype=torch.long)
    for r, (doc, lab) in enumerate(zip(workload.documents, workload.labels)):
        ids[r, :len(doc)], labels[r, :len(doc)], mask[r, :len(doc)] = doc, lab, 1
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))


def hf_model(config: ModernBertConfig, attn: str, sparse: bool):
    values = {k: v for k, v in config_to_hf_dict(config).items() if k != "architectures"}
    values["sparse_prediction"] = sparse
    return transformers.AutoModelForMaskedLM.from_config(transformers.ModernBertConfig(**values),
                                                         attn_implementation=attn)


def measured_matmul_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192 ** 3 / (time.perf_counter() - start) / 1e12


def time_steps(model, batch, device, steps: int, warmup: int):
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused) if fused else \
        torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def parity(config: ModernBertConfig, device, backends) -> list[str]:
    """Max |logits difference| / max |logits| of each of our backends vs transformers' sdpa, per document."""
    lines = []
    torch.manual_seed(0)
    reference = hf_model(config, "sdpa", sparse=False).to(device).eval()
    workload = make_workload("variable", min(512, config.max_position_embeddings), 2048, config.vocab_size, seed=1)
    padded = hf_batch(workload, device, config.pad_token_id)
    dtype_ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), dtype_ctx:
        ref = reference(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits.float()
    for backend in backends:
        ours = ModernBertForMaskedLM(config.replace(attn_backend=backend)).to(device).eval()
        ours.load_state_dict(reference.state_dict(), strict=False)
        placements = []
        packed = ours_batch(workload, device, config.pad_token_id, placements)
        with torch.no_grad(), dtype_ctx:
            logits = ours(packed["input_ids"], packed["cu_seqlens"], packed["max_seqlen"]).logits.float()
        worst = 0.0
        for index, start in placements:
            length = len(workload.documents[index])
            diff = (logits[start:start + length] - ref[index, :length]).abs().max().item()
            worst = max(worst, diff / ref[index, :length].abs().max().item())
        lines.append(f"parity {backend:13s} vs transformers sdpa ({'bf16' if device.type == 'cuda' else 'fp32'}): "
                     f"max relative logit error {worst:.2e}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, help="model preset (default: base on cuda, tiny on cpu)")
    parser.add_argument("--seq-lens", default=None, help="comma list (default 1024,8192 on cuda, 256 on cpu)")
    parser.add_argument("--tokens", type=int, default=None, help="token budget per step (default 65536 cuda, 4096 cpu)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--compile", choices=["off", "on", "both"], default=None)
    parser.add_argument("--only", default="", help="comma list of config names to run (default all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("base" if cuda else "tiny")
    seq_lens = [int(x) for x in (args.seq_lens or ("1024,8192" if cuda else "256")).split(",")]
    tokens = args.tokens or (65536 if cuda else 4096)
    steps = args.steps or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile or ("both" if cuda else "off")]
    only = set(filter(None, args.only.split(",")))
    torch.set_float32_matmul_precision("high")

    config = ModernBertConfig.preset(preset, max_position_embeddings=max(seq_lens))
    backends = available_backends(device)
    peak_tflops = measured_matmul_tflops(device)
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'} | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | preset {preset} | backends {backends} | bf16 matmul "
          f"{f'{peak_tflops:.0f} TFLOP/s' if peak_tflops else 'n/a'}")
    for line in parity(config, device, backends):
        print(line)

    # On GPU the exact sdpa path (documents padded into a grid, boolean mask) is a correctness reference, not a
    # contender: it falls off the fast kernels. Time it there only when asked for by name.
    timed_backends = [b for b in backends if not (cuda and b == "sdpa" and len(backends) > 1)]
    configs = [(f"ours-{b}{'-compiled' if c else ''}", "ours", b, c) for b in timed_backends for c in compile_modes]
    hf_attns = ["sdpa"] + (["flex_attention"] if cuda else [])
    configs += [(f"hf-{a.split('_')[0]}-{'sparse' if s else 'full'}", "hf", a, s) for a in hf_attns for s in (True, False)]
    header = f"{'seq':>5} {'batch':8} {'config':26} {'real tok/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} {'vs ' + BASELINE:>20}"
    print(header)
    print("-" * len(header))
    for seq_len in seq_lens:
        for kind in ("fixed", "variable"):
            workload = make_workload(kind, seq_len, tokens, config.vocab_size)
            real_tokens = sum(len(d) for d in workload.documents)
            masked = sum(int((lab != -100).sum()) for lab in workload.labels)
            flops = training_flops(config, [len(d) for d in workload.documents], masked)
            results = {}
            for name, family, option, flag in configs:
                if only and name not in only:
                    continue
                try:
                    torch.manual_seed(0)
                    if family == "ours":
                        model = ModernBertForMaskedLM(config.replace(attn_backend=option)).to(device).train()
                        if flag:
                            model.compile_dense()
                        batch = ours_batch(workload, device, config.pad_token_id)
                    else:
                        model = hf_model(config, option, sparse=flag).to(device).train()
                        batch = hf_batch(workload, device, config.pad_token_id)
                    seconds, peak = time_steps(model, batch, device, steps, warmup)
                    results[name] = (real_tokens / seconds, flops / seconds / 1e12, peak)
                except Exception as err:  # one failing configuration must not hide the others
                    results[name] = err
                finally:
                    model = batch = None
                    if cuda:
                        torch.cuda.empty_cache()
            base = results.get(BASELINE)
            for name, result in results.items():
                if isinstance(result, Exception):
                    print(f"{seq_len:>5} {kind:8} {name:26} failed: {type(result).__name__}: {str(result)[:80]}")
                    continue
                tok_s, tflops, peak = result
                mfu = f"{100 * tflops / peak_tflops:5.1f}%" if peak_tflops else "   n/a"
                ratio = f"{tok_s / base[0]:.2f}x" if isinstance(base, tuple) else "n/a"
                print(f"{seq_len:>5} {kind:8} {name:26} {tok_s:>11,.0f} {tflops:>8.2f} {mfu:>6} {peak:>8.1f} {ratio:>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of the training loader on CPU: packed + masked real tokens per second.

Three measurements on the same shards and settings (phase-1 shape by default: max_seq_len 1024, micro-batches
of 8 x 1024 tokens, 8 micro-batches per step):
  e2e-0w   the whole loader in one process (streaming reads, re-split, best-fit packing, masking);
  e2e-Nw   the same with N DataLoader workers reading streaming samples;
  main     the main-process stage alone (re-split, packing, masking) fed from samples held in memory: the
           ceiling of one rank's loader process when workers keep up.
Tokens/s count real (non-pad) tokens; CPU s/Mtok is the main process's CPU time (workers excluded).

--step-loop instead measures what the training loop waits for: host ms per step spent in `next(loader)`
while each step "runs on the device" for the time the model needs for its tokens (a sleep: the host thread
waits on the GPU without the GIL), with the step prepared when asked for (prefetch_steps 0, the baseline)
and on the loader's background thread (prefetch_steps 1 and 2).
The model needs about 312k tokens/s per H100 rank in phase 1 (the paper's 1.72T tokens in about 190 h on 8
H100s), so the loader must stay well above that on one core.

Without --manifest it builds a demo corpus in --workdir: the standard library's modules (code, chunks of up
to 8192 tokens as `modernbert-data prepare` writes them) and the language reference topics (prose), with a
quickly trained byte-level BPE.

example:
  python bench/loader_bench.py --workdir /tmp/loader_bench --seconds 10 --workers 2
  python bench/loader_bench.py --step-loop --micro-batch-size 64 --micro-batches-per-step 9 --steps 8
  python bench/loader_bench.py --manifest yamls/data/demo.yaml --tokenizer demo_out/tokenizer.json
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

MODEL_NEED_TOKENS_PER_S = 312_000  # base, phase 1, per H100 (the paper's phase-1 throughput)


def build_demo_corpus(workdir: Path, chunk_len: int = 8192, vocab_size: int = 8000) -> tuple[Path, Path]:
    """Shards of two real sources (contract 2 columns) and their tokenizer, built once per workdir."""
    from streaming import MDSWriter
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from tqdm import tqdm

    manifest = workdir / "manifest.yaml"
    tokenizer_path = workdir / "tokenizer.json"
    if manifest.is_file() and tokenizer_path.is_file():
        return manifest, tokenizer_path
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.rglob("*.py"))
            if "test" not in p.parts and "site-packages" not in p.parts][:1500]
    from pydoc_data.topics import topics
    prose = [text for _, text in sorted(topics.items())]
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(code[:300] + prose, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    workdir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tokenizer_path))
    sha = hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()
    columns = {"input_ids": "ndarray:uint16", "doc_id": "int64", "chunk_index": "int32", "source": "str"}
    sources = []
    for name, docs in (("code", code), ("prose", prose)):
        out = workdir / "shards" / name
        counts = {"documents": 0, "chunks": 0, "tokens": 0}
        with MDSWriter(out=str(out), columns=columns, compression="zstd") as writer:
            for doc_id, enc in enumerate(tqdm(tok.encode_batch(docs, add_special_tokens=False), desc=name)):
                body, step = enc.ids, chunk_len - 2
                for index, start in enumerate(range(0, max(len(body), 1), step)):
                    ids = np.array([1] + body[start:start + step] + [2], dtype=np.uint16)
                    writer.write({"input_ids": ids, "doc_id": doc_id, "chunk_index": index, "source": name})
                    counts["chunks"] += 1
                    counts["tokens"] += ids.size
                counts["documents"] += 1
        (out / "prep_meta.json").write_text(json.dumps({
            "tokenizer_sha256": sha, "vocab_size": vocab_size, "max_seq_len": chunk_len,
            "special_token_ids": {"cls_id": 1, "sep_id": 2, "pad_id": 3, "mask_id": 4, "unk_id": 0}, **counts}))
        sources.append({"name": name, "local": str(out)})
    import yaml
    manifest.write_text(yaml.safe_dump({"name": "loader-bench", "description": "stdlib code + reference prose",
                                        "sources": sources}))
    return manifest, tokenizer_path


def _measure(loader, seconds: float, warmup_steps: int = 3) -> dict:
    for _ in range(warmup_steps):
        next(loader)
    tokens = capacity = steps = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        step = next(loader)
        tokens += step["num_tokens"]
        capacity += sum(mb["input_ids"].numel() for mb in step["micro_batches"])
        steps += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"steps": steps, "tokens": tokens, "tokens_per_s": tokens / wall, "fill": tokens / capacity,
            "main_cpu_s_per_Mtok": cpu / tokens * 1e6, "tokens_per_main_cpu_s": tokens / cpu}


def _step_loop(loader, steps: int, device_s: float | None, warmup_steps: int = 2) -> dict:
    """Host seconds per step the loop waits in next(loader) while each step takes device_s on the device."""
    def device_time(step) -> float:
        capacity = sum(mb["input_ids"].numel() for mb in step["micro_batches"])
        return device_s if device_s is not None else capacity / MODEL_NEED_TOKENS_PER_S

    for _ in range(warmup_steps):
        time.sleep(device_time(next(loader)))
    waits = []
    for _ in range(steps):
        start = time.perf_counter()
        step = next(loader)
        waits.append(time.perf_counter() - start)
        time.sleep(device_time(step))  # the device runs the step; the host thread waits without the GIL
    waits_ms = np.array(waits) * 1e3
    return {"steps": steps, "device_s": device_time(step), "wait_ms_mean": float(waits_ms.mean()),
            "wait_ms_median": float(np.median(waits_ms)), "wait_ms_max": float(waits_ms.max())}


def _in_memory_source(loader, num_samples: int):
    """Replace the loader's streaming reads by samples already in memory (cycled, ids kept)."""
    loader._start_raw()
    samples = []
    while len(samples) < num_samples:
        item = loader._read_raw()
        if item is None:
            break
        samples.append(item)

    def read_raw():
        read_raw.position += 1
        return samples[read_raw.position % len(samples)]

    read_raw.position = -1
    loader._read_raw = read_raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__[__doc__.index("example:"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="mixture manifest (default: build a demo corpus in --workdir)")
    parser.add_argument("--tokenizer", help="tokenizer.json of the shards (with --manifest)")
    parser.add_argument("--workdir", default="/tmp/modernbert_loader_bench")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per mode")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the e2e-Nw mode")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--micro-batches-per-step", type=int, default=8)
    parser.add_argument("--step-loop", action="store_true",
                        help="measure host ms per step the training loop waits, with and without prefetch")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per mode of --step-loop")
    parser.add_argument("--device-ms", type=float,
                        help="device time per step in --step-loop (default: its token slots at the model's rate)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    os.environ.setdefault("TMPDIR", str(workdir))
    if args.manifest:
        if not args.tokenizer:
            parser.error("--manifest needs --tokenizer")
        manifest, tokenizer = Path(args.manifest), Path(args.tokenizer)
    else:
        manifest, tokenizer = build_demo_corpus(workdir)

    from modernbert_train.data import MLMLoaderConfig, build_mlm_loader

    def make(num_workers: int, prefetch_steps: int = 0):
        return build_mlm_loader(MLMLoaderConfig(
            manifest=str(manifest), tokenizer=str(tokenizer), max_seq_len=args.max_seq_len,
            micro_batch_size=args.micro_batch_size,
            global_batch_size=args.micro_batch_size * args.micro_batches_per_step, num_workers=num_workers,
            prefetch_steps=prefetch_steps))

    if args.step_loop:
        return step_loop_report(args, make)
    results = {}
    for mode, workers in (("e2e-0w", 0), (f"e2e-{args.workers}w", args.workers), ("main", 0)):
        loader = make(workers)
        if mode == "main":
            _in_memory_source(loader, 4000)
        results[mode] = _measure(loader, args.seconds)
        del loader
        gc.collect()

    print(f"loader throughput, max_seq_len {args.max_seq_len}, micro-batch {args.micro_batch_size} x "
          f"{args.max_seq_len}, {args.micro_batches_per_step} per step; {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, python {sys.version.split()[0]}")
    print(f"{'mode':<8} {'Mtok/s':>8} {'fill':>7} {'Mtok/CPU-s':>11} {'x model need':>13}")
    for mode, r in results.items():
        print(f"{mode:<8} {r['tokens_per_s'] / 1e6:8.2f} {r['fill']:7.4f} {r['tokens_per_main_cpu_s'] / 1e6:11.2f} "
              f"{r['tokens_per_s'] / MODEL_NEED_TOKENS_PER_S:13.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def step_loop_report(args, make) -> int:
    results = {}
    for prefetch in (0, 1, 2):
        loader = make(0, prefetch)
        results[f"prefetch {prefetch}"] = _step_loop(loader, args.steps,
                                                     None if args.device_ms is None else args.device_ms / 1e3)
        if prefetch:
            loader.close()
        del loader
        gc.collect()
    base = results["prefetch 0"]["wait_ms_mean"]
    print(f"host ms per step waiting for the loader: max_seq_len {args.max_seq_len}, {args.micro_batches_per_step} "
          f"micro-batches of {args.micro_batch_size} x {args.max_seq_len} per step, device "
          f"{results['prefetch 0']['device_s'] * 1e3:.0f} ms per step, {args.steps} steps; {os.cpu_count()} CPUs, "
          f"python {sys.version.split()[0]}")
    print(f"{'mode':<11} {'mean ms':>8} {'median ms':>10} {'max ms':>8} {'mean / prefetch 0':>18}")
    for mode, r in results.items():
        print(f"{mode:<11} {r['wait_ms_mean']:8.2f} {r['wait_ms_median']:10.2f} {r['wait_ms_max']:8.2f} "
              f"{r['wait_ms_mean'] / base:18.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start-up of one rank at full scale, by simulation: seconds to the first batch plan and peak host memory.

Metadata only: synthesises index.json + prep_meta.json for the four sources of yamls/data/modernbert_2t.yaml
(2T tokens) at a realistic shard count, no shard payloads. Then, in a fresh child process per world size (so
that ru_maxrss is that world's peak), one rank does what it does before its first step:
  manifest   load the manifest and turn token shares into per-sample proportions (prep_meta.json files);
  index      build the StreamingDataset the loader builds (our Stream set-up, streaming parses every index.json);
  partition  streaming's epoch work as the node leader computes it: resample the streams, partition the epoch
             over nodes/ranks/workers and shuffle it (generate_work), then this rank's slice;
  state      our loader's side of a resume from that world onto half of it: a checkpoint state of every rank
             (packer buffer references, read positions) pickled, the restart plan and buffer hand-over.
Worlds are nodes of --ranks-per-node ranks with --workers DataLoader workers each; rank 0 is measured.
Streaming's epoch arrays grow with the samples per epoch, not the world size: --sample-scale shrinks the
sample count (shard count kept) to fit a small machine; the table then gives the measured figures and the
bytes/sample and s/sample that extrapolate them to scale 1.

example:
  python bench/startup_bench.py --workdir /tmp/startup_bench --shards 300000 --epoch-size 50000000
  python bench/startup_bench.py --workdir /tmp/startup_bench --shards 300000 --sample-scale 0.01
  python bench/startup_bench.py --workdir /tmp/startup_bench --sample-scale 0.01 --shuffle-algo py1s \\
      --num-canonical-nodes 128
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name, token share, tokens (modernbert_2t.yaml), assumed mean tokens per stored chunk (chunks of <= 8192)
SOURCES = [("web", 0.60, 1.2e12, 900), ("code", 0.20, 4.0e11, 1800), ("scientific", 0.10, 2.0e11, 6000),
           ("retrieval", 0.10, 2.0e11, 450)]
BUFFER_PIECES = 1200  # phase 1 on 8 ranks: 9 + 4 micro-batches of 64 x 1024 tokens, ~700-token pieces


def synthesize(workdir: Path, shards: int, sample_scale: float, epoch_size: int | None = None
               ) -> tuple[Path, int, int]:
    """Index + prep_meta per source and a manifest; returns (manifest, index bytes, samples)."""
    import yaml

    total_tokens = sum(s[2] for s in SOURCES)
    entries, index_bytes, all_samples = [], 0, 0
    for name, share, tokens, per_chunk in SOURCES:
        folder = workdir / "shards" / name
        folder.mkdir(parents=True, exist_ok=True)
        n_shards = max(1, round(shards * tokens / total_tokens))
        samples = max(n_shards, int(tokens / per_chunk * sample_scale))
        per_shard = np.full(n_shards, samples // n_shards, np.int64)
        per_shard[: samples % n_shards] += 1
        raw = int(tokens * 2 / n_shards)  # uint16 ids
        with open(folder / "index.json", "w") as f:
            f.write('{"version": 2, "shards": [')
            for i, count in enumerate(per_shard.tolist()):
                f.write(("," if i else "") + json.dumps({
                    "column_encodings": ["int32", "int64", "ndarray:uint16", "str"],
                    "column_names": ["chunk_index", "doc_id", "input_ids", "source"],
                    "column_sizes": [4, 8, None, None], "compression": "zstd", "format": "mds",
                    "hashes": ["xxh3_64"], "size_limit": 1 << 26, "version": 2, "samples": count,
                    "raw_data": {"basename": f"shard.{i:06d}.mds", "bytes": raw,
                                 "hashes": {"xxh3_64": f"{i:016x}"}},
                    "zip_data": {"basename": f"shard.{i:06d}.mds.zstd", "bytes": raw // 3,
                                 "hashes": {"xxh3_64": f"{i + 1:016x}"}}}))
            f.write("]}")
        (folder / "prep_meta.json").write_text(json.dumps({
            "vocab_size": 50368, "max_seq_len": 8192, "tokens": int(samples * per_chunk), "chunks": samples,
            "documents": samples}))
        index_bytes += (folder / "index.json").stat().st_size
        all_samples += samples
        entries.append({"name": name, "local": str(folder), "proportion": share})
    manifest = workdir / "mix.yaml"
    top = {"epoch_size": epoch_size} if epoch_size else {}
    manifest.write_text(yaml.safe_dump({"name": "modernbert_2t_synthetic", **top, "sources": entries}))
    return manifest, index_bytes, all_samples


def simulated_states(world: int, rng) -> dict:
    """A checkpoint's loader state of `world` ranks in the middle of an epoch (as MLMLoader.state_dict)."""
    reads = 50_000 + rng.integers(0, 64, world)
    ranks = []
    for rank in range(world):
        buffer = np.column_stack([rng.integers(0, 1 << 31, BUFFER_PIECES), np.zeros(BUFFER_PIECES, np.int64),
                                  np.zeros(BUFFER_PIECES, np.int64), np.arange(BUFFER_PIECES),
                                  np.arange(BUFFER_PIECES) // 64]).astype(np.int64)
        ranks.append({"rank": rank, "epoch": 0, "raw_consumed": int(reads[rank]), "origin": 0, "stride": world,
                      "offset": rank, "reads": int(reads[rank]), "skip": np.zeros(0, np.int64), "tokens_seen": 1,
                      "pending_tokens": 0, "steps": 1, "buffer": buffer,
                      "packer": {"next_seq": BUFFER_PIECES, "budgets_packed": 99}, "source_tokens": [0] * 4})
    return {"world_size": world, "ranks": ranks}


def resume_plan_cost(world: int, new_world: int, raw_batch: int, rng) -> dict:
    """What one rank of `new_world` does with a `world`-rank state: sizes that must not grow with the world."""
    from modernbert_train.data import elastic

    state = simulated_states(world, rng)
    blob = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    started = time.perf_counter()
    loaded = pickle.loads(blob)
    frontier, extras = elastic.consumed(loaded["ranks"])
    _, _, skip = elastic.restart_plan(frontier, extras, rank=0, world_size=new_world, num_nodes=1,
                                      align=new_world * raw_batch)
    owners = [loaded["ranks"][g] for g in elastic.inherited_ranks(world, new_world, 0)]
    buffer, _ = elastic.merge_buffers(owners)
    return {"state_bytes": len(blob), "state_s": time.perf_counter() - started, "skip": len(skip),
            "buffer_refs": len(buffer), "per_rank_state_bytes": len(pickle.dumps(state["ranks"][0]))}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> dict:
    started = time.perf_counter()
    from streaming.base.batching import generate_work
    from streaming.base.world import World

    from modernbert_train.data.dataset import build_streaming_dataset
    from modernbert_train.data.manifest import load_manifest, sampling_manifest

    world, per_node = args.child, args.ranks_per_node
    nodes = max(1, world // per_node)
    times = {"import_s": time.perf_counter() - started}
    mark = time.perf_counter()
    manifest, _ = sampling_manifest(load_manifest(args.manifest), 1024)
    times["manifest_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    ncn = args.num_canonical_nodes or (64 * nodes if args.shuffle_algo in ("py1s", "py2s") else nodes)
    dataset = build_streaming_dataset(manifest, batch_size=args.raw_batch_size, shuffle=True, seed=17,
                                      shuffle_algo=args.shuffle_algo, num_canonical_nodes=ncn,
                                      shuffle_block_size=args.shuffle_block_size, cache_limit="100tb")
    dataset.coverage_sampling = args.sampling == "coverage"  # as the training loader sets it
    times["index_s"] = time.perf_counter() - mark
    mark, before = time.perf_counter(), _rss()
    rank_world = World(num_nodes=nodes, ranks_per_node=min(per_node, world), workers_per_rank=args.workers,
                       worker=0)
    if dataset.shuffle_block_size is None:
        dataset._set_shuffle_block_size(rank_world)
    work = generate_work("random", dataset, rank_world, 0, 0)
    mine = work[0, 0].transpose(1, 0, 2).reshape(-1)
    mine = mine[mine != -1]
    times["partition_s"] = time.perf_counter() - mark
    epoch = int(work.size)
    del work
    partition_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    plan = resume_plan_cost(world, max(1, world // 2), args.raw_batch_size, np.random.default_rng(world))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * 1024
    total = time.perf_counter() - started
    times["cpu_s"] = usage.ru_utime + usage.ru_stime  # wall times suffer from a loaded host, CPU time less
    return {"world": world, "nodes": nodes, "num_canonical_nodes": ncn, "shuffle_algo": args.shuffle_algo,
            "shuffle_block_size": int(dataset.shuffle_block_size), "epoch_samples": epoch,
            "rank_samples": int(mine.size), **times, **plan, "total_s": total, "peak_bytes": peak,
            "index_rss_bytes": before, "partition_peak_bytes": partition_peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/startup_bench")
    parser.add_argument("--shards", type=int, default=300_000, help="shards over all sources")
    parser.add_argument("--sample-scale", type=float, default=1.0, help="fraction of the 2T mixture's samples")
    parser.add_argument("--world-sizes", default="8,64,512,1024")
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--raw-batch-size", type=int, default=64)
    parser.add_argument("--shuffle-algo", default="py1e")
    parser.add_argument("--num-canonical-nodes", type=int, help="default: streaming's (nodes, 64 x for py1s/py2s)")
    parser.add_argument("--shuffle-block-size", type=int)
    parser.add_argument("--epoch-size", type=int, help="samples per epoch (the manifest's epoch_size; default: "
                        "the whole mixture in one epoch)")
    parser.add_argument("--sampling", default="coverage", choices=("coverage", "balanced"),
                        help="the loader's data.loader_options.sampling (default coverage)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    workdir = Path(args.workdir)
    mark = time.perf_counter()
    manifest, index_bytes, samples = synthesize(workdir, args.shards, args.sample_scale, args.epoch_size)
    print(f"synthesised {args.shards:,} shards, {samples:,} samples (scale {args.sample_scale:g}), index.json "
          f"{index_bytes / 2**20:,.0f} MiB in {time.perf_counter() - mark:.0f} s", flush=True)
    rows = []
    env = dict(os.environ, TMPDIR=str(workdir), MODERNBERT_SHARD_CACHE=str(workdir / "cache"))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)
    print(f"epoch: {args.epoch_size or samples:,} samples, {args.sampling} sampling: every sample read once per "
          f"{samples / (args.epoch_size or samples):.1f} epochs" if args.sampling == "coverage" else
          f"epoch: {args.epoch_size or samples:,} samples, balanced sampling (each epoch a fresh random choice)")
    print("| world | nodes | NCN | shuffle (block) | rank samples | import s | manifest s | index s | "
          "partition+shuffle s | state s | state MiB (all ranks) | RSS after index GiB | peak GiB | total s | "
          "CPU s | partition bytes/sample |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for world in [int(w) for w in args.world_sizes.split(",")]:
        passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                  if v is not None and k not in ("json", "child", "manifest", "epoch_size")]
        done = subprocess.run([sys.executable, __file__, *passed, "--child", str(world), "--manifest",
                               str(manifest)], env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"world {world}: child failed\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"| {world} | {row['nodes']} | {row['num_canonical_nodes']} | {row['shuffle_algo']} "
              f"({row['shuffle_block_size']:,}) | {row['rank_samples']:,} | {row['import_s']:.1f} | "
              f"{row['manifest_s']:.1f} | {row['index_s']:.1f} | {row['partition_s']:.1f} | {row['state_s']:.2f} | "
              f"{row['state_bytes'] / 2**20:.1f} | {row['index_rss_bytes'] / 2**30:.2f} | "
              f"{row['peak_bytes'] / 2**30:.2f} | {row['total_s']:.1f} | {row.get('cpu_s', float('nan')):.1f} | "
              f"{row['partition_peak_bytes'] / row['epoch_samples']:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"index_bytes": index_bytes, "samples": samples, "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

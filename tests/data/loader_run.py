"""Run the training loader for some steps in a fresh process (one rank of a job when RANK/WORLD_SIZE are set).

Writes one sha256 per step (over every byte and count of the step) to --out (per rank), and optionally the
loader state after the last step (--save, written by rank 0, as composer's rank-0 checkpoint would) or
starts from a saved state (--load); --pieces adds the (epoch, sample id, piece index) of every emitted document
(needs return_provenance); --order makes rank 0 write epoch 0's global sample order first (as one process on one node would read it).
Used by the resume tests; not a test module itself.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import sys


def step_digest(step: dict) -> str:
    digest = hashlib.sha256()
    for mb in step["micro_batches"]:
        for key in ("input_ids", "cu_seqlens", "labels"):
            tensor = mb[key]
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.numpy().tobytes())
        digest.update(json.dumps([mb["max_seqlen"], mb["num_tokens"], mb["num_masked"], mb["num_docs"]]).encode())
    digest.update(json.dumps([step["num_tokens"], step["num_sequences"], step["epoch"]]).encode())
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="JSON of MLMLoaderConfig fields")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", help="write the state here after --save-at steps (default: at the end)")
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--load")
    parser.add_argument("--pieces", action="store_true")
    parser.add_argument("--order", help="rank 0 writes epoch 0's sample ids in global order here (JSON)")
    args = parser.parse_args()

    from modernbert_train.data import MLMLoaderConfig, build_mlm_loader

    config = MLMLoaderConfig(**json.loads(args.config))
    loader = build_mlm_loader(config)
    if args.order and loader.rank == 0:
        from streaming.base.batching import generate_work
        from streaming.base.world import World

        # The partition of one process on one node is the whole epoch, in global order.
        world = World(num_nodes=1, ranks_per_node=1, workers_per_rank=1, worker=0)
        if loader.dataset.shuffle_block_size is None:
            loader.dataset._set_shuffle_block_size(world)
        ids = generate_work("random", loader.dataset, world, 0, 0).flatten()
        with open(args.order, "w") as f:
            json.dump(ids[ids != -1].tolist(), f)
    if args.load:
        with open(args.load, "rb") as f:
            loader.load_state_dict(pickle.load(f))
    digests = []
    epochs = []
    pieces = []
    save_at = args.steps if args.save_at is None else args.save_at
    for index, step in zip(range(args.steps), loader):
        digests.append(step_digest(step))
        epochs.append(step["epoch"])
        if args.pieces:
            for mb in step["micro_batches"]:
                pieces += [[int(e), int(s), int(p)] for e, s, p in zip(mb["epochs"], mb["sample_ids"],
                                                                      mb["piece_indices"])]
        if args.save and index + 1 == save_at:
            state = loader.state_dict()  # a collective: every rank calls it, rank 0 writes it
            if loader.rank == 0:
                with open(args.save, "wb") as f:
                    pickle.dump(state, f)
    with open(f"{args.out}.rank{loader.rank}.json", "w") as f:
        json.dump({"digests": digests, "epochs": epochs, "tokens_seen": loader.tokens_seen, "pieces": pieces,
                   "steps": loader.steps}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One rank of test_rank_failures.py's read-once check: build the trainer (phase 2 from a checkpoint, with its
optimizer state) counting the checkpoint reads, then write what it holds.

python tests/train/rank_setup.py OUT_JSON RECIPE [key=value ...]   (RANK, WORLD_SIZE, MASTER_* in the environment)
"""
import hashlib
import json
import os
import sys

import torch


def main(out: str, recipe_file: str, overrides: list[str]) -> None:
    from modernbert_train.train.recipe import load_recipe
    from modernbert_train.train.trainer import build_trainer, release_trainer

    reads: list[str] = []
    load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(str(f))
        return load(f, *args, **kwargs)

    torch.load = counting_load
    trainer, run_dir = build_trainer(load_recipe(recipe_file, overrides))
    torch.load = load
    digest = hashlib.sha256()
    moment_count = sum(isinstance(v, torch.Tensor) for m in trainer.state.optimizers[0].state_dict()["state"].values()
                       for v in m.values())
    model = getattr(trainer.state.model, "module", trainer.state.model)  # DDP's wrapper adds "module."
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    for _, moments in sorted(trainer.state.optimizers[0].state_dict()["state"].items()):
        for key in sorted(moments):
            if isinstance(moments[key], torch.Tensor):
                digest.update(key.encode() + moments[key].cpu().numpy().tobytes())
    release_trainer(trainer, run_dir)
    with open(f"{out}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump({"reads": reads, "digest": digest.hexdigest(), "moments": moment_count}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

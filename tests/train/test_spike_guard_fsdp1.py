"""The spike guard under FSDP1: each rank holds only its shard's gradients, and every rank must judge the same
global norm (a rollback raised on some ranks only would hang the others). FSDP1 runs on CPU with gloo here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import json, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel
from modernbert_train.train.spike_guard import _has_fsdp1_shards, step_loss_and_grad_norm

rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
reference.load_state_dict(model.state_dict())
sharded = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
x = torch.randn(4, 8)  # the same batch on both ranks: the sharded gradients are the reference's
sharded(x).pow(2).sum().backward()
reference(x).pow(2).sum().backward()
assert _has_fsdp1_shards(sharded)
loss, norm = step_loss_and_grad_norm(sharded, torch.tensor(2.0 + rank), 4, fsdp1=True)
loss, norm = float(loss), float(norm)
local = torch.nn.utils.get_total_norm([p.grad for p in sharded.parameters() if p.grad is not None])
print(json.dumps({"loss": loss, "norm": norm, "local": float(local),
                  "reference": float(torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]))}))
dist.destroy_process_group()
"""


def test_every_fsdp1_rank_judges_the_global_gradient_norm(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    ranks = [subprocess.Popen([sys.executable, "-c", WORKER, str(rank), str(tmp_path / "store")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = []
    for rank in ranks:
        out, err = rank.communicate(timeout=120)
        assert rank.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    reference = results[0]["reference"]
    assert all(abs(r["local"] - reference) > 1e-3 for r in results)  # each rank alone sees a part of it
    for r in results:
        assert abs(r["norm"] - reference) <= 1e-5 * reference
        assert r["loss"] == (2.0 + 3.0) / 8  # loss sums and masked counts of both ranks

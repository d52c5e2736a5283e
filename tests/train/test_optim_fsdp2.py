"""StableAdamW under FSDP2 never takes torch-optimi's Triton path (issue 12, items 3 and 4).

On CUDA optimi routes any parameter whose type is a torch foreach type (DTensor is one) to its Triton
kernels, which treat a shard as the whole tensor. Here, on CPU, optimi's device check is made to answer
as it does on a GPU and its Triton kernels are replaced by a tripwire; a one-process gloo group runs FSDP2.
bench/gpu_check.sh compares FSDP2 with the unsharded run on a real GPU.
"""
from __future__ import annotations

import copy
import math
import importlib
from importlib.metadata import version

import optimi.utils
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.train.optim import build_optimizer
from modernbert_train.train.parallel import install_gloo_workarounds
from modernbert_train.train.recipe import OptimizerConfig
from tests.train.test_composer_model import packed_micro_batch


class TritonKernelCalled(AssertionError):
    pass


@pytest.fixture
def gpu_like_optimi(monkeypatch):
    """optimi decides as on a bf16-capable GPU with Triton; its Triton kernels raise when called."""
    def tripwire(*args, **kwargs):
        raise TritonKernelCalled("optimi's Triton StableAdamW kernel was called")

    monkeypatch.setattr(optimi.utils, "HAS_TRITON", True)
    monkeypatch.setattr(optimi.utils, "_triton_kernels_supported_device", lambda tensor: True)
    # optimi's package exports the function `stableadamw`, which hides the module of the same name.
    monkeypatch.setattr(importlib.import_module("optimi.stableadamw"), "_triton_stableadamw", tripwire)


@pytest.fixture
def process_group(tmp_path):
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    install_gloo_workarounds()
    yield
    if created:
        dist.destroy_process_group()


def train_steps(model, optimizer, steps: int = 3) -> list[float]:
    losses = []
    for step in range(steps):
        mb = packed_micro_batch([40, 30], 96, 0.3, seed=10 + step)
        loss = model(mb["input_ids"], mb["cu_seqlens"], mb["max_seqlen"], labels=mb["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_installed_optimi_has_the_triton_switch():
    major, minor = (int(x) for x in version("torch-optimi").split(".")[:2])
    assert (major, minor) >= (0, 3)  # pyproject: torch-optimi>=0.3, the first with StableAdamW(triton=...)


def test_the_tripwire_catches_optimis_gpu_routing(gpu_like_optimi):
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(ModernBertConfig.preset("micro"))
    optimizer, _ = build_optimizer(model, OptimizerConfig(lr=1e-3), device="gpu")
    with pytest.raises(TritonKernelCalled):
        train_steps(model, optimizer, steps=1)


def test_fsdp2_parameters_take_the_dtensor_safe_path_and_match_unsharded(gpu_like_optimi, process_group):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    reference = ModernBertForMaskedLM(ModernBertConfig.preset("micro"))
    sharded = copy.deepcopy(reference)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    cfg = OptimizerConfig(lr=1e-3, weight_decay=0.1, decouple_lr=False)
    sharded_optimizer, _ = build_optimizer(sharded, cfg, device="gpu")  # triton decided at the first step
    reference_optimizer, _ = build_optimizer(reference, cfg, device="cpu")
    sharded_losses = train_steps(sharded, sharded_optimizer)
    assert [group["triton"] for group in sharded_optimizer.param_groups] == [False, False]
    assert train_steps(reference, reference_optimizer) == pytest.approx(sharded_losses, rel=1e-6)
    full = {name: p.full_tensor() for name, p in sharded.named_parameters()}
    for name, p in reference.named_parameters():
        torch.testing.assert_close(full[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_a_resumed_triton_true_state_still_keeps_dtensors_off_the_triton_kernels(gpu_like_optimi, process_group):
    """An optimizer state saved by an unsharded GPU run holds triton=True; loaded under FSDP2 it must not send
    the shards to optimi's Triton kernels."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = ModernBertForMaskedLM(ModernBertConfig.preset("micro"))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer, _ = build_optimizer(model, OptimizerConfig(lr=1e-3), device="gpu")
    for group in optimizer.param_groups:
        group["triton"] = True  # as load_state_dict restores it from the unsharded run's checkpoint
    losses = train_steps(model, optimizer, steps=2)
    assert [group["triton"] for group in optimizer.param_groups] == [False, False]
    assert all(map(math.isfinite, losses))

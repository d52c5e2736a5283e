"""StableAdamW parameter groups and the warmup-stable-decay schedule."""
from __future__ import annotations

import math

import pytest
import torch

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.train.optim import build_optimizer, split_decay_groups
from modernbert_train.train.recipe import OptimizerConfig
from modernbert_train.train.schedule import WarmupStableDecay


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ModernBertForMaskedLM(ModernBertConfig.preset("micro", mlp_bias=True))


def test_groups_follow_module_kinds(model):
    decay, no_decay, names = split_decay_groups(model, ["norms", "biases"])
    assert "model.embeddings.tok_embeddings.weight" in names.decay_names
    assert "decoder.weight" not in names.decay_names + names.no_decay_names  # tied: counted once
    assert {"model.embeddings.norm.weight", "model.final_norm.weight", "head.norm.weight",
            "decoder.bias", "model.layers.0.mlp.Wi.bias"} <= set(names.no_decay_names)
    assert all(n.endswith(("norm.weight", "bias")) for n in names.no_decay_names)
    assert sum(p.numel() for p in decay + no_decay) == model.num_parameters()
    _, _, with_embeddings = split_decay_groups(model, ["norms", "biases", "embeddings"])
    assert "model.embeddings.tok_embeddings.weight" in with_embeddings.no_decay_names


def test_stable_adamw_decays_only_the_decay_group(model):
    cfg = OptimizerConfig(lr=1e-2, weight_decay=1e-4, decouple_lr=True, no_decay=["norms", "biases"])
    optimizer, names = build_optimizer(model, cfg, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only weight decay moves parameters
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr / 2  # the schedule halves the lr; decoupled decay follows lr / peak lr
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 1 - 0.5 * 1e-4 if name in names.decay_names else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape, at_half_decay", [("1-sqrt", 1 - math.sqrt(0.5)), ("linear", 0.5), ("cosine", 0.5)])
def test_warmup_stable_decay(shape, at_half_decay):
    s = WarmupStableDecay(total=1000, warmup=100, decay=400, shape=shape, min_ratio=0.0)
    assert s(0) == 0.0 and s(50) == 0.5 and s(100) == 1.0 and s(599) == 1.0 and s(600) == 1.0
    assert s(800) == pytest.approx(at_half_decay) and s(1000) == pytest.approx(0.0)
    assert WarmupStableDecay(1000, 0, 400, shape, min_ratio=0.1)(1000) == pytest.approx(0.1)
    constant = WarmupStableDecay(total=3e9, warmup=1e9, decay=0)
    assert constant(2e9) == 1.0 and constant(3e9) == 1.0
    with pytest.raises(ValueError):
        WarmupStableDecay(total=10, warmup=6, decay=5)

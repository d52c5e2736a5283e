"""Optimizer: StableAdamW (torch-optimi) with weight decay only where the recipe wants it.

Parameters are classified by the module that owns them, not by name patterns, so a renamed layer
cannot silently start decaying its norm: LayerNorm weights/biases are "norms", nn.Embedding weights
(and the decoder weight tied to them) are "embeddings", any other `bias` is a "bias".

FSDP2 turns parameters into DTensors after the optimizer is built. torch-optimi would route them to its
Triton kernels on CUDA (DTensor is one of torch's foreach types), and those kernels treat a shard as the
whole tensor (its global numel() with the local storage); ShardSafeStableAdamW keeps DTensor groups on
optimi's per-tensor PyTorch path, whose DTensor ops reduce across shards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from optimi import StableAdamW
from torch import nn
from torch.distributed.tensor import DTensor

from modernbert_train.common.errors import UserError
from modernbert_train.train.recipe import OptimizerConfig

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass(frozen=True)
class ParamGroupSummary:
    decay_names: tuple[str, ...]
    no_decay_names: tuple[str, ...]

    def describe(self) -> str:
        return (f"{len(self.decay_names)} tensors with weight decay, "
                f"{len(self.no_decay_names)} without ({', '.join(self.no_decay_names[:4])}, ...)")


def parameter_kind(module: nn.Module, param_name: str) -> str:
    """'norms' | 'embeddings' | 'biases' | 'weights' for a parameter owned directly by `module`."""
    if isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith("norm"):
        return "norms"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if param_name == "bias":
        return "biases"
    return "weights"


def split_decay_groups(model: nn.Module, no_decay: list[str] | tuple[str, ...]) -> tuple[list, list, ParamGroupSummary]:
    """(decay params, no-decay params, names) over trainable parameters, each tensor once (tied weights)."""
    seen: set[int] = set()
    decay, no_decay_params, decay_names, no_decay_names = [], [], [], []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if parameter_kind(module, param_name) in no_decay:
                no_decay_params.append(param)
                no_decay_names.append(full_name)
            else:
                decay.append(param)
                decay_names.append(full_name)
    return decay, no_decay_params, ParamGroupSummary(tuple(decay_names), tuple(no_decay_names))


class ShardSafeStableAdamW(StableAdamW):
    """optimi's StableAdamW that never hands DTensor (FSDP2-sharded) parameters to its Triton kernels."""

    def step(self, closure=None, param=None):
        for group in self.param_groups:
            # Checked at every step, not only while triton is undecided (None): a resumed optimizer state can
            # carry triton=True from a run that was not sharded.
            if group.get("triton") is not False and any(isinstance(p, DTensor) for p in group["params"]):
                group["triton"] = False
        return super().step(closure, param)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: str = "cpu"
                    ) -> tuple[torch.optim.Optimizer, ParamGroupSummary]:
    """`device` is where training will run ('cpu' | 'gpu'): the optimizer is built before composer moves
    the model there, and optimi would otherwise pick its Triton kernels, which need a GPU."""
    decay, no_decay_params, summary = split_decay_groups(model, cfg.no_decay)
    if not decay and not no_decay_params:
        raise UserError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay_params, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "stable_adamw":
        # max_lr is the peak: the schedule lowers group["lr"] and the decay follows lr / max_lr.
        optimizer = ShardSafeStableAdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                          decouple_lr=cfg.decouple_lr, max_lr=cfg.lr if cfg.decouple_lr else None,
                                          triton=None if device == "gpu" else False)
    elif cfg.name == "adamw":
        # torch AdamW multiplies the decay by lr; decouple_lr rescales so the applied decay per step
        # equals weight_decay * lr / peak lr, as StableAdamW(decouple_lr=True) does.
        for group in groups:
            if cfg.decouple_lr and group["weight_decay"]:
                group["weight_decay"] = group["weight_decay"] / cfg.lr
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    else:  # recipe validation restricts the names; this guards programmatic use
        raise UserError(f"optimizer.name: unknown optimizer {cfg.name!r}")
    return optimizer, summary


__all__ = ["build_optimizer", "ShardSafeStableAdamW", "split_decay_groups", "parameter_kind", "ParamGroupSummary"]

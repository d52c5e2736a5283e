"""Multi-device set-up: the recipe's `parallelism:` section -> composer's parallelism_config, and the
FSDP wrap / activation-checkpointing policies (one FSDP unit and one checkpoint region per encoder layer).

Without `parallelism.fsdp`, composer wraps the model in DDP whenever the launcher starts several ranks.

    parallelism:
      fsdp:
        version: 2                    # 2 (default): torch fully_shard, also on CPU/gloo; 1: FSDP1, CUDA only
        sharding_strategy: FULL_SHARD  # FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD (shard in a node, replicate across)
        mixed_precision: DEFAULT       # composer's DEFAULT | PURE | FULL
        activation_checkpointing: false
        state_dict_type: sharded       # sharded: a folder of .distcp files per checkpoint; full: one .pt on rank 0

Every other key is passed to composer's FSDP2Config / FSDPConfig as it is.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch import nn

from modernbert_train.common.errors import UserError, did_you_mean

FSDP_VERSIONS = (1, 2)
# FSDP2 has no sharding_strategy field: it is reshard_after_forward plus the shape of the device mesh.
FSDP2_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
STATE_DICT_TYPES = ("sharded", "full")


def composer_parallelism_config(fsdp: dict[str, Any] | None, where: str = "") -> dict[str, Any] | None:
    """{'fsdp': FSDPConfig | FSDP2Config} from `parallelism.fsdp` ({version: 2, ...composer keys}).

    FSDP1 needs CUDA; FSDP2 (the default here) also runs on CPU with gloo.
    """
    if not fsdp:
        return None
    from composer.utils.parallelism import FSDP2Config, FSDPConfig

    values = dict(fsdp)
    version = values.pop("version", 2)
    if version not in FSDP_VERSIONS:
        raise UserError(f"{where}parallelism.fsdp.version must be 1 or 2, got {version!r}")
    if values.get("state_dict_type", "sharded") not in STATE_DICT_TYPES:
        raise UserError(f"{where}parallelism.fsdp.state_dict_type must be one of {', '.join(STATE_DICT_TYPES)}, "
                        f"got {values['state_dict_type']!r}")
    config_class = FSDP2Config if version == 2 else FSDPConfig
    valid = [f.name for f in dataclasses.fields(config_class) if f.init and not f.name.startswith("_")]
    if version == 2:
        valid = [name for name in valid if name != "device_mesh"] + ["sharding_strategy"]
        strategy = values.pop("sharding_strategy", "FULL_SHARD")
        if strategy not in FSDP2_STRATEGIES:
            raise UserError(f"{where}parallelism.fsdp.sharding_strategy {strategy!r} is not available with FSDP2 "
                            f"(choose {', '.join(FSDP2_STRATEGIES)}){did_you_mean(str(strategy), FSDP2_STRATEGIES)}")
    for key in values:
        if key not in valid:
            raise UserError(f"{where}unknown key 'parallelism.fsdp.{key}' for FSDP{version}"
                            f"{did_you_mean(str(key), valid)}; valid keys: version, {', '.join(valid)}")
    if version == 1:
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"{where}parallelism.fsdp.version=1 (FSDP1) needs CUDA; use version: 2 on CPU")
        try:
            return {"fsdp": FSDPConfig(**values)}
        except (TypeError, ValueError) as err:
            raise UserError(f"{where}parallelism.fsdp: {err}") from None
    if strategy in ("SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2"):
        if values.get("reshard_after_forward", False) is not False:
            raise UserError(f"{where}parallelism.fsdp: sharding_strategy {strategy} keeps parameters gathered "
                            f"after forward; reshard_after_forward=true contradicts it")
        values["reshard_after_forward"] = False
    if strategy in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        values["device_mesh"] = hybrid_device_mesh(where)
    try:
        return {"fsdp": FSDP2Config(**values)}
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}parallelism.fsdp: {err}") from None


def hybrid_device_mesh(where: str = ""):
    """2-D mesh (nodes, ranks per node): FSDP2 shards over a node's ranks and replicates across nodes."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world % per_node:
        raise UserError(f"{where}parallelism.fsdp: HYBRID_SHARD needs the same number of ranks on every node "
                        f"(WORLD_SIZE={world}, LOCAL_WORLD_SIZE={per_node})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (world // per_node, per_node), mesh_dim_names=("dp_replicate", "dp_shard"))


def attach_wrap_policies(model: nn.Module, layer_type: type[nn.Module]) -> None:
    """Composer reads `fsdp_wrap_fn` / `activation_checkpointing_fn` from the model it is given.

    Composer shards the model itself as the root unit (embeddings, final norm, head and the tied decoder);
    each encoder layer becomes its own unit and, with activation_checkpointing, its own recompute region.
    """
    def is_layer(module: nn.Module) -> bool:
        return isinstance(module, layer_type)

    model.fsdp_wrap_fn = is_layer
    model.activation_checkpointing_fn = is_layer


def check_even_shards(model: nn.Module, shard_group_size: int, optimizer_name: str, where: str = "") -> None:
    """StableAdamW's per-tensor RMS is a DTensor `mean` under FSDP2, which torch reduces as the average of the
    shards' means: exact only when every parameter's first dimension splits evenly over the shard group."""
    if optimizer_name != "stable_adamw" or shard_group_size <= 1:
        return
    for name, param in model.named_parameters():
        if param.dim() and param.shape[0] % shard_group_size:
            raise UserError(f"{where}parallelism.fsdp: parameter {name} has {param.shape[0]} rows, which do not "
                            f"split evenly over {shard_group_size} ranks, so StableAdamW's update RMS would be "
                            f"wrong under FSDP2; pad the model (e.g. vocab_size) or use optimizer.name=adamw")


_gloo_workarounds_installed = False


def install_gloo_workarounds() -> None:
    """Make FSDP2 on gloo (CPU runs, the CPU tests) compute what it computes on NCCL.

    torch 2.7's gloo backend has no ReduceOp.AVG: its reduce_scatter_tensor silently SUMS when asked to
    average (FSDP2's fp32 gradient reduction: gradients world_size times too large), and its all_reduce
    raises (DTensor's `mean`, e.g. StableAdamW's update RMS). Both become SUM followed by a division.
    NCCL groups are untouched.
    """
    global _gloo_workarounds_installed
    if _gloo_workarounds_installed:
        return
    import torch.distributed as torch_dist
    from torch.distributed._functional_collectives import all_reduce
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives
    from torch.distributed.tensor.placement_types import Partial

    original_reduce_value = Partial._reduce_value

    def reduce_value(self, tensor, mesh, mesh_dim):
        if self.reduce_op == "avg" and torch_dist.get_backend(mesh.get_group(mesh_dim)) == "gloo":
            return all_reduce(tensor, reduceOp="sum", group=(mesh, mesh_dim)) / mesh.size(mesh_dim)
        return original_reduce_value(self, tensor, mesh, mesh_dim)

    original_divide_factors = _fsdp_collectives._get_gradient_divide_factors

    def gradient_divide_factors(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type="", *newer):
        if torch_dist.get_backend(reduce_scatter_group) != "gloo":
            return original_divide_factors(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type, *newer)
        if newer:
            # torch >= 2.8 passes (factor, force_sum_reduction_for_comms) and returns the ops too: forcing the
            # SUM reduction makes FSDP2 divide by the world size itself.
            return original_divide_factors(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type,
                                           newer[0], True)
        ranks = reduce_scatter_group.size() * (all_reduce_group.size() if all_reduce_group is not None else 1)
        # torch 2.7: a pre-divide factor (1: no division) makes FSDP2 reduce with SUM; it then divides by `ranks`.
        return 1.0, float(ranks)

    Partial._reduce_value = reduce_value
    _fsdp_collectives._get_gradient_divide_factors = gradient_divide_factors
    _gloo_workarounds_installed = True


def shard_group_size(parallelism: dict[str, Any] | None) -> int:
    """Ranks one parameter is split over (1 without FSDP)."""
    if not parallelism:
        return 1
    mesh = getattr(parallelism["fsdp"], "device_mesh", None)
    if mesh is not None:
        return int(mesh.size(-1))
    return int(os.environ.get("WORLD_SIZE", "1"))


__all__ = ["composer_parallelism_config", "attach_wrap_policies", "check_even_shards", "install_gloo_workarounds",
           "shard_group_size", "hybrid_device_mesh"]

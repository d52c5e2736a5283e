"""Multi-device set-up: the recipe's `parallelism:` section -> composer's parallelism_config, and the
FSDP wrap / activation-checkpointing policies (one FSDP unit and one checkpoint region per encoder layer).

Without `parallelism.fsdp`, composer wraps the model in DDP whenever the launcher starts several ranks.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from modernbert_train.errors import UserError, did_you_mean

FSDP_VERSIONS = (1, 2)


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
    config_class = FSDP2Config if version == 2 else FSDPConfig
    valid = [f.name for f in dataclasses.fields(config_class) if f.init and not f.name.startswith("_")]
    for key in values:
        if key not in valid:
            raise UserError(f"{where}unknown key 'parallelism.fsdp.{key}' for FSDP{version}"
                            f"{did_you_mean(str(key), valid)}; valid keys: version, {', '.join(valid)}")
    try:
        return {"fsdp": config_class(**values)}
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}parallelism.fsdp: {err}") from None


def attach_wrap_policies(model: nn.Module, layer_type: type[nn.Module]) -> None:
    """Composer reads `fsdp_wrap_fn` / `activation_checkpointing_fn` from the model it is given."""
    def is_layer(module: nn.Module) -> bool:
        return isinstance(module, layer_type)

    model.fsdp_wrap_fn = is_layer
    model.activation_checkpointing_fn = is_layer


__all__ = ["composer_parallelism_config", "attach_wrap_policies"]

"""Continuing from an earlier checkpoint: carry its optimizer state into a new phase, or replace the
optimizer settings of a resumed run by the recipe's (the authors' reset_time / restart_override).

A new phase always restarts its own time (schedule, batch warmup, max_duration count from 0). What it
takes from the previous phase is the weights (model.init_from) and, with model.init_optimizer, the Adam
moments; its lr, weight decay, betas and eps are this recipe's either way. A resumed run keeps its
checkpoint's optimizer settings unless checkpoint.restart_override is set; the lr schedule is always
the recipe's.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from modernbert_train.errors import UserError

log = logging.getLogger("modernbert_train")


def optimizer_settings(optimizer) -> list[dict[str, Any]]:
    """Each param group's hyperparameters (everything but the parameters)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def apply_optimizer_settings(optimizer, settings: list[dict[str, Any]]) -> None:
    if len(settings) != len(optimizer.param_groups):
        raise UserError(f"the optimizer has {len(optimizer.param_groups)} parameter groups but the recipe builds "
                        f"{len(settings)}: optimizer.no_decay must match the checkpoint's")
    for group, values in zip(optimizer.param_groups, settings):
        group.update(values)


def carry_optimizer_state(trainer, init_from: str, settings: list[dict[str, Any]], where: str,
                          trust: bool = False) -> None:
    """Load the optimizer state of init_from's checkpoint into the freshly built trainer, then put the
    recipe's settings back (the checkpoint's param groups carry the previous phase's lr and decay)."""
    from modernbert_train.checkpoints import find_checkpoint, load_composer_state

    checkpoint, _ = find_checkpoint(Path(init_from))
    state = load_composer_state(checkpoint, trust=trust)["state"]
    if not state.get("optimizers"):
        raise UserError(f"{where}model.init_optimizer: {checkpoint} holds no optimizer state (an averaged or "
                        f"converted weights-only file?)")
    optimizer = trainer.state.optimizers[0]
    saved = next(iter(state["optimizers"]))
    if saved != type(optimizer).__qualname__:
        raise UserError(f"{where}model.init_optimizer: {checkpoint} was trained with {saved}, this recipe uses "
                        f"{type(optimizer).__qualname__}; the moments cannot be carried over")
    _load_full_optimizer_state(trainer.state, optimizer, state["optimizers"][saved])
    apply_optimizer_settings(optimizer, settings)
    log.info("optimizer state carried over from %s", checkpoint)


def _load_full_optimizer_state(state, optimizer, optim_state: dict[str, Any]) -> None:
    """load_composer_state merges a sharded checkpoint, so the moments are always full tensors here. Composer's
    own `State.load_optim_state` treats them as full only when this run saves full checkpoints; under FSDP2
    with sharded saving it would hand plain tensors to DTensor parameters (a crash at the first step)."""
    from composer.utils.parallelism import FSDPConfig
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=True,
                               cpu_offload=state.fsdp_enabled and isinstance(state.fsdp_config, FSDPConfig))
    set_optimizer_state_dict(model=state.model, optimizers=optimizer, optim_state_dict=optim_state, options=options)


__all__ = ["optimizer_settings", "apply_optimizer_settings", "carry_optimizer_state"]

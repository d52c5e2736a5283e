"""Checkpoint averaging: the elementwise mean of the model weights of several checkpoints.

The released ModernBERT-base averages the best checkpoints of the decay phase with the last one (an EMA
during the decay did not help). Sources may be full checkpoint files, FSDP sharded folders or run
directories (their newest checkpoint), read with the readers of checkpoints.py. The result is a
composer-style .pt holding `state.model` and the last source's timestamp, so `export`, `model.init_from`
and torch.load read it like any checkpoint. The mean is taken in float64 and stored in each tensor's dtype.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from modernbert_train.checkpoint.files import find_checkpoint
from modernbert_train.checkpoint.trust import load_composer_state
from modernbert_train.common.errors import UserError

log = logging.getLogger("modernbert_train")
# What export needs beside the weights (see export.py); copied next to the averaged file when missing there.
RUN_ARTIFACTS = ("model_config.json", "tokenizer.json")


def average_state_dicts(states: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """Elementwise mean of same-shaped state dicts; non-float tensors must agree and are kept as they are."""
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != first.keys():
            extra = sorted(set(state) ^ set(first))
            raise UserError(f"{name} does not hold the same weights as {names[0]} (differs in {extra[0]}"
                            f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''})")
        for key, value in state.items():
            if value.shape != first[key].shape:
                raise UserError(f"{name}: {key} is {tuple(value.shape)} but {tuple(first[key].shape)} in {names[0]}")
    averaged = {}
    for key, value in first.items():
        if not torch.is_floating_point(value):
            if any(not torch.equal(state[key], value) for state in states[1:]):
                raise UserError(f"{key} is not a float tensor and differs between the checkpoints")
            averaged[key] = value.clone()
            continue
        total = torch.zeros(value.shape, dtype=torch.float64)
        for state in states:
            total += state[key].to(torch.float64)
        averaged[key] = (total / len(states)).to(value.dtype)
    return averaged


def average_checkpoints(sources: list[str | Path], out_file: str | Path, *, overwrite: bool = False,
                        trust: bool = False) -> Path:
    """Average the model weights of `sources` into `out_file` (composer-style); returns its path.

    model_config.json and tokenizer.json of the first source's run directory are copied beside the output
    when it has none, so `modernbert-train export OUT_FILE` works on it.
    """
    if not sources:
        raise UserError("give at least one checkpoint to average")
    out_file = Path(out_file)
    if out_file.exists() and not overwrite:
        raise UserError(f"{out_file} exists (pass --overwrite to replace it)")
    states, names, last_state, run_dirs = [], [], None, []
    for source in sources:
        checkpoint, run_dir = find_checkpoint(Path(source))
        composer_state = load_composer_state(checkpoint, trust=trust)
        try:
            states.append(composer_state["state"]["model"])
        except (KeyError, TypeError):
            raise UserError(f"{checkpoint} is not a composer checkpoint (no state.model)") from None
        names.append(str(checkpoint))
        run_dirs.append(run_dir)
        last_state = composer_state
    averaged = average_state_dicts(states, names)
    result = {"state": {"model": averaged, "timestamp": last_state["state"].get("timestamp"),
                        "averaged_from": names}}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    torch.save(result, partial)
    partial.replace(out_file)
    for artifact in RUN_ARTIFACTS:
        source_file = run_dirs[0] / artifact
        if source_file.is_file() and not (out_file.parent / artifact).exists():
            shutil.copyfile(source_file, out_file.parent / artifact)
    log.info("averaged %d checkpoints into %s", len(names), out_file)
    return out_file


__all__ = ["average_checkpoints", "average_state_dicts"]

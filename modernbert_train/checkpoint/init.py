"""Where a run's starting point comes from: random weights, a previous run or checkpoint, a Hugging Face
folder, or centre tiling of a smaller model (`model.init_from`); and the optimizer state carried with it
(`model.init_optimizer`), or the recipe's settings over a resumed run's (the authors' restart_override).

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

import torch

from modernbert_train.checkpoint.files import checkpoint_step, find_checkpoint, latest_checkpoint
from modernbert_train.checkpoint.trust import load_composer_state
from modernbert_train.common.errors import UserError
from modernbert_train.common.ranks import load_on_one_rank

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
    checkpoint, _ = find_checkpoint(Path(init_from))
    # Rank 0 reads the file and keeps only the moments; every rank gets them from it (one read per job).
    state = load_on_one_rank(f"reading the optimizer state of {checkpoint}", lambda: {
        "optimizers": load_composer_state(checkpoint, trust=trust)["state"].get("optimizers")})
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


def initial_model(config_values: dict[str, Any], *, preset: str, init_from: str | None, save_folder: str | Path,
                  data_vocab_size: int, trust: bool = False, where: str = "", explicit_vocab: bool = False):
    """ModernBertForMaskedLM with its starting weights: random (seeded by the caller), a previous phase's run or
    checkpoint, `hf:PATH`, or `tile:SOURCE` (a smaller model centre-tiled into this shape)."""
    from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

    values = dict(config_values)
    if init_from and init_from.startswith("hf:"):
        hf_path = init_from[3:]
        if not Path(hf_path).exists():
            raise UserError(f"{where}model.init_from: Hugging Face folder {hf_path} does not exist")
        # The architecture comes from the folder's config.json; the recipe may still set rope thetas,
        # dropout, backend and context length. An explicit vocab_size must equal the folder's.
        if not explicit_vocab:
            values.pop("vocab_size", None)
        model = ModernBertForMaskedLM.from_hf(hf_path, **values)
        if model.config.vocab_size < data_vocab_size:
            raise UserError(f"{where}model.init_from: {hf_path} has vocab_size {model.config.vocab_size} but the "
                            f"data's tokenizer has {data_vocab_size} ids")
        log.info("initial weights: Hugging Face folder %s", hf_path)
        return model
    model = ModernBertForMaskedLM(ModernBertConfig.preset(preset, **values))
    if init_from and init_from.startswith("tile:"):
        tile_from(model, init_from[len("tile:"):], where, trust=trust)
        return model
    if init_from:
        source = Path(init_from)
        if source.resolve() == Path(save_folder).resolve():
            raise UserError(f"{where}model.init_from points at this run's own save_folder; use the previous phase's "
                            f"run directory (resuming this run is checkpoint.autoresume's job)")
        checkpoint = latest_checkpoint(source) if source.exists() else None
        if checkpoint is None:
            raise UserError(f"{where}model.init_from: {init_from} does not exist (give the previous phase's run "
                            f"directory, a checkpoint file, or hf:PATH)")
        # Rank 0 reads the file, the weights reach the other ranks by broadcast (one read per job).
        state = load_on_one_rank(f"reading the weights of {checkpoint}",
                                 lambda: _model_part(load_composer_state(checkpoint, trust=trust)))
        step = load_model_weights_from_checkpoint(model, checkpoint, where, trust=trust, state=state)
        log.info("initial weights: %s (step %d of the previous phase)", checkpoint, step)
    return model


def tile_from(model, source: str, where: str, trust: bool = False) -> None:
    """Centre-tile a smaller model (run directory, checkpoint, sharded folder or HF folder) into `model`."""
    from modernbert_train.checkpoint.tiling import tile_into
    from modernbert_train.model import ModernBertForMaskedLM

    def read_weights() -> dict:
        path = Path(source)
        if not path.exists():
            raise UserError(f"{where}model.init_from: tile source {source} does not exist (give a run directory, a "
                            f"checkpoint, or a Hugging Face folder of the smaller model)")
        if (path / "config.json").is_file():
            return ModernBertForMaskedLM.from_hf(path).state_dict()
        checkpoint, _ = find_checkpoint(path)
        state = load_composer_state(checkpoint, trust=trust)
        return {k[len("model."):]: v for k, v in state["state"]["model"].items() if k.startswith("model.")}

    # Rank 0 reads the smaller model (a composer checkpoint holds its optimizer moments too), the others get
    # its weights by broadcast: one read per job.
    weights = load_on_one_rank(f"reading the model to tile from {source}", read_weights)
    if weights["model.embeddings.tok_embeddings.weight"].shape[0] != model.config.vocab_size:
        raise UserError(f"{where}model.init_from: {source} has another vocabulary size "
                        f"({weights['model.embeddings.tok_embeddings.weight'].shape[0]}) than this model "
                        f"({model.config.vocab_size}); tiling needs the same tokenizer")
    tile_into(model, weights)
    log.info("initial weights: centre-tiled from %s", source)


def _model_part(state: dict) -> dict:
    """What load_model_weights_from_checkpoint reads of a composer state (the rest is not broadcast)."""
    inner = state.get("state") if isinstance(state, dict) else None
    if not isinstance(inner, dict):
        return state
    return {"state": {"model": inner.get("model"), "timestamp": inner.get("timestamp")}}


def load_model_weights_from_checkpoint(model: torch.nn.Module, checkpoint: Path, where: str = "",
                                       trust: bool = False, state: dict | None = None) -> int:
    """Copy the `model.*` weights of a composer checkpoint into `model`; returns the checkpoint's step.

    A sharded FSDP checkpoint (a folder of .distcp files) is merged first; see load_composer_state for what
    is unpickled when. `state`: the checkpoint's state, already read (by another rank)."""
    if state is None:
        state = load_composer_state(checkpoint, trust=trust)
    try:
        weights = state["state"]["model"]
        weights.items()
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"{where}{checkpoint} is not a composer checkpoint (no state.model)") from None
    prefix = "model."
    inner = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    own = model.state_dict()
    missing = sorted(set(own) - set(inner))
    unexpected = sorted(set(inner) - set(own))
    mismatched = [k for k in own if k in inner and tuple(inner[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            k = mismatched[0]
            details.append(f"{k} is {tuple(inner[k].shape)} there but {tuple(own[k].shape)} here")
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                details.append(f"{label} {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else ""))
        raise UserError(f"{where}weights of {checkpoint} do not fit this recipe's model ({'; '.join(details)}); "
                        f"the phase's model.preset / model.config must describe the same architecture")
    model.load_state_dict(inner, strict=True)
    return checkpoint_step(state)

"""What `--model M` names: an exported Hugging Face folder, a run directory (its newest checkpoint) or a
checkpoint file; `random:M` is M's architecture and tokenizer with freshly initialised weights (the
baseline every pretrained model should beat). Loaded once; every fine-tuning run copies the weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from modernbert_train.common.errors import UserError
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

RANDOM_PREFIX = "random:"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class EvalModel:
    name: str
    source: str
    config: ModernBertConfig
    tokenizer_file: Path
    weights: dict[str, torch.Tensor] | None  # None: random init (seeded by each run)
    step: int = -1  # pretraining steps of a checkpoint, -1 when unknown

    def build(self, seed: int) -> ModernBertForMaskedLM:
        """A fresh MLM model with these weights (or a random init drawn from `seed`)."""
        torch.manual_seed(seed)
        model = ModernBertForMaskedLM(self.config)
        if self.weights is not None:
            model.load_state_dict(self.weights, strict=False)  # a tied decoder is absent from exports
        return model


def _tokenizer_in(folder: Path, source: str) -> Path:
    tokenizer = folder / TOKENIZER_FILE
    if not tokenizer.exists():
        raise UserError(f"--model {source}: {folder} has no {TOKENIZER_FILE} (export with `modernbert-train export`, "
                        f"which writes the tokenizer, or copy the tokenizer.json used for training there)")
    return tokenizer


def load_eval_model(source: str) -> EvalModel:
    if source.startswith(RANDOM_PREFIX):
        base = load_eval_model(source[len(RANDOM_PREFIX):])
        return EvalModel(name=f"random init ({base.name})", source=source, config=base.config,
                         tokenizer_file=base.tokenizer_file, weights=None)
    path = Path(source)
    if not path.exists():
        raise UserError(f"--model {source}: no such file or folder")
    if path.is_dir() and (path / "config.json").exists():
        tokenizer = _tokenizer_in(path, source)
        model = ModernBertForMaskedLM.from_hf(path)
        return EvalModel(name=path.name, source=source, config=model.config, tokenizer_file=tokenizer,
                         weights=model.state_dict())
    from modernbert_train.checkpoint import find_checkpoint, load_model_weights_from_checkpoint
    from modernbert_train.run.export import MODEL_CONFIG_FILE

    checkpoint, run_dir = find_checkpoint(path)
    config_file = run_dir / MODEL_CONFIG_FILE
    if not config_file.exists():
        raise UserError(f"--model {source}: {run_dir} has neither config.json (a Hugging Face folder) nor "
                        f"{MODEL_CONFIG_FILE} (a run directory)")
    config = ModernBertConfig(**json.loads(config_file.read_text()))
    tokenizer = _tokenizer_in(run_dir, source)
    model = ModernBertForMaskedLM(config)
    step = load_model_weights_from_checkpoint(model, checkpoint, where=f"--model {source}: ")
    name = path.name if path.is_dir() else f"{run_dir.name}/{path.name}"
    return EvalModel(name=name, source=source, config=config, tokenizer_file=tokenizer,
                     weights=model.state_dict(), step=step)

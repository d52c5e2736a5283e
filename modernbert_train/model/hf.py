"""Mapping between our model and transformers' ModernBERT: config.json fields and state dicts.

Parameter names are identical on both sides; the only translation is the config. We write the
4.x keys (global_rope_theta, local_rope_theta, global_attn_every_n_layers, local_attention), which
every transformers >= 4.48 reads, and also 5.x's `layer_types` + `rope_parameters` with the same values,
which 4.x ignores; reading accepts either form.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from modernbert_train.common.errors import UserError
from modernbert_train.model.config import ModernBertConfig

TIED_DECODER_KEY = "decoder.weight"
EMBEDDING_KEY = "model.embeddings.tok_embeddings.weight"

# Our field -> config.json key, for fields whose meaning is the same on both sides.
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "global_attn_every_n_layers", "local_attention", "global_rope_theta",
    "local_rope_theta", "norm_eps", "norm_bias", "attention_bias", "mlp_bias", "decoder_bias",
    "hidden_activation", "classifier_activation", "attention_dropout", "embedding_dropout", "mlp_dropout",
    "initializer_range", "initializer_cutoff_factor", "pad_token_id", "cls_token_id", "sep_token_id",
    "bos_token_id", "eos_token_id", "tie_word_embeddings",
)


def config_to_hf_dict(config: ModernBertConfig, torch_dtype: str = "float32") -> dict:
    out = {"architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert"}
    out.update({name: getattr(config, name) for name in _SHARED_FIELDS})
    out["mask_token_id"] = config.mask_token_id
    layer_types = ["full_attention" if config.is_global_layer(i) else "sliding_attention"
                   for i in range(config.num_hidden_layers)]
    out.update(
        # transformers 5.x form of the same facts (4.x ignores these keys).
        layer_types=layer_types,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": float(config.global_rope_theta)},
            "sliding_attention": {"rope_type": "default", "rope_theta": float(config.local_rope_theta)},
        },
        sliding_window=config.local_attention // 2,
        # Defaults of transformers that matter for loading, stated so no version guesses.
        classifier_pooling="mean", classifier_dropout=0.0, classifier_bias=False, sparse_prediction=False,
        sparse_pred_ignore_index=-100, deterministic_flash_attn=False, reference_compile=False,
        repad_logits_with_grad=False, torch_dtype=torch_dtype, dtype=torch_dtype,
    )
    return out


def config_from_hf_dict(values: dict, **overrides) -> ModernBertConfig:
    if values.get("model_type", "modernbert") != "modernbert":
        raise UserError(f"config.json has model_type={values.get('model_type')!r}, expected 'modernbert'")
    fields = {name: values[name] for name in _SHARED_FIELDS if values.get(name) is not None}
    rope = values.get("rope_parameters") or {}
    if "global_rope_theta" not in fields and isinstance(rope.get("full_attention"), dict):
        fields["global_rope_theta"] = rope["full_attention"]["rope_theta"]
    if "local_rope_theta" not in fields and isinstance(rope.get("sliding_attention"), dict):
        fields["local_rope_theta"] = rope["sliding_attention"]["rope_theta"]
    layer_types = values.get("layer_types")
    if "global_attn_every_n_layers" not in fields and layer_types:
        global_layers = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
        every = global_layers[1] - global_layers[0] if len(global_layers) > 1 else len(layer_types)
        fields["global_attn_every_n_layers"] = every
    if "local_attention" not in fields and values.get("sliding_window"):
        fields["local_attention"] = 2 * int(values["sliding_window"])
    # transformers' ModernBertConfig has no mask_token_id: without one here the model simply has none.
    fields["mask_token_id"] = values.get("mask_token_id")
    fields.update(overrides)
    return ModernBertConfig(**fields)


# Our config field -> the tokenizer role that defines it (data.tokenizer.SpecialTokenIds).
_TOKENIZER_ROLES = {"pad_token_id": "pad_id", "cls_token_id": "cls_id", "sep_token_id": "sep_id",
                    "mask_token_id": "mask_id", "bos_token_id": "cls_id", "eos_token_id": "sep_id"}


def special_ids_from_tokenizer(folder: Path) -> dict[str, int]:
    """Special token ids of the folder's tokenizer.json, the authority on its vocabulary; {} without one.

    A ModernBERT with its own vocabulary often keeps transformers' default ids (50281-50284) in config.json."""
    if not (folder / "tokenizer.json").is_file():
        return {}
    from modernbert_train.data.tokenizer import load_tokenizer, special_token_ids

    ids = special_token_ids(load_tokenizer(folder), folder / "tokenizer.json")
    return {field: getattr(ids, role) for field, role in _TOKENIZER_ROLES.items()}


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists() or index.exists():
        from safetensors.torch import load_file

        files = [single] if single.exists() else sorted(
            {folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        state = {}
        for file in files:
            state.update(load_file(str(file)))
        return state
    legacy = folder / "pytorch_model.bin"
    if legacy.exists():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise UserError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_hf(model_cls, source, **config_overrides):
    """source: a transformers ModernBertForMaskedLM instance, or a folder with config.json and weights."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        config_file = folder / "config.json"
        if not config_file.exists():
            raise UserError(f"{folder}: not a Hugging Face model folder (no config.json)")
        config = config_from_hf_dict(json.loads(config_file.read_text()),
                                     **{**special_ids_from_tokenizer(folder), **config_overrides})
        state = _read_state_dict(folder)
    else:
        config = config_from_hf_dict(source.config.to_dict(), **config_overrides)
        state = source.state_dict()
    model = model_cls(config)
    state = {key: value for key, value in state.items() if key != TIED_DECODER_KEY or not config.tie_word_embeddings}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not (key == TIED_DECODER_KEY and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"weights do not match a ModernBertForMaskedLM of this config: "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def save_hf(model, out_dir, dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().to("cpu") for key, value in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop(TIED_DECODER_KEY, None)  # save_pretrained omits tied weights; transformers re-ties on load
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
    save_file({key: value.contiguous() for key, value in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_hf_dict(model.config, dtype_name), indent=2) + "\n")

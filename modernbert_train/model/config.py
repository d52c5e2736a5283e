"""ModernBERT architecture hyper-parameters.

Field names follow transformers' `ModernBertConfig` so the mapping to and from a Hugging Face
`config.json` is one-to-one (see hf.py). Two fields exist only here: `attention_output_dropout`
(dropout after the attention output projection alone, as the ModernBERT authors trained; it keeps
every attention kernel usable because none of them has to drop attention probabilities) and
`attn_backend` (which kernel computes attention); and `head_init`, which only chooses an initialisation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from modernbert_train.common.errors import UserError, did_you_mean

ATTN_BACKENDS = ("auto", "flash_attn", "torch_varlen", "flex", "sdpa")


@dataclass
class ModernBertConfig:
    vocab_size: int = 50368
    hidden_size: int = 768
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    intermediate_size: int = 1152
    max_position_embeddings: int = 8192
    # Every n-th layer (starting at layer 0) attends globally; the others use a sliding window of
    # `local_attention` tokens in all (local_attention // 2 on each side of the query).
    global_attn_every_n_layers: int = 3
    local_attention: int = 128
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    decoder_bias: bool = True
    hidden_activation: str = "gelu"
    classifier_activation: str = "gelu"
    # transformers semantics: drops attention probabilities AND the attention output.
    attention_dropout: float = 0.0
    attention_output_dropout: float = 0.0
    embedding_dropout: float = 0.0
    mlp_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    # The head's dense layer at init: "input" sigma (initializer_range), as the ModernBERT authors trained, or
    # "output" sigma (initializer_range / sqrt(2 layers)), as transformers initialises it. Init only: not exported.
    head_init: str = "input"
    pad_token_id: int = 50283
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    # Only masking needs it (the model never reads it); None for a folder that does not say (transformers'
    # ModernBertConfig has no such field).
    mask_token_id: int | None = 50284
    bos_token_id: int = 50281
    eos_token_id: int = 50282
    tie_word_embeddings: bool = True
    attn_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({self.num_attention_heads})")
        if self.attn_backend not in ATTN_BACKENDS:
            raise UserError(f"attn_backend={self.attn_backend!r} is not one of {ATTN_BACKENDS}"
                            f"{did_you_mean(self.attn_backend, ATTN_BACKENDS)}")
        if self.local_attention % 2 or self.local_attention <= 0:
            raise UserError(f"local_attention must be a positive even number of tokens, got {self.local_attention}")
        for name in ("hidden_activation", "classifier_activation"):
            if getattr(self, name) != "gelu":
                raise UserError(f"{name}={getattr(self, name)!r}: only 'gelu' (exact erf GELU) is implemented")
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
            if getattr(self, name) is None and name == "mask_token_id":
                continue
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise UserError(f"{name}={getattr(self, name)} is outside the vocabulary (vocab_size={self.vocab_size})")
        if self.head_init not in ("input", "output"):
            raise UserError(f"head_init={self.head_init!r} is not one of input, output"
                            f"{did_you_mean(str(self.head_init), ['input', 'output'])}")
        if self.global_rope_theta <= 0 or self.local_rope_theta <= 0:
            # The reference repo exported theta=-1 and got NaN logits; refuse it at the source.
            raise UserError("global_rope_theta and local_rope_theta must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_global_layer(self, layer_id: int) -> bool:
        return layer_id % self.global_attn_every_n_layers == 0

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModernBertConfig":
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}{did_you_mean(name, PRESETS)}")
        values = {**PRESETS[name], **overrides}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            key = sorted(unknown)[0]
            raise UserError(f"unknown model config key {key!r}{did_you_mean(key, [f.name for f in dataclasses.fields(cls)])}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "ModernBertConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict] = {
    # ModernBERT-base, 149M parameters.
    "base": dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152),
    # ModernBERT-large, 395M parameters.
    "large": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, intermediate_size=2624),
    # CPU-sized: two global layers (0, 3) and four local ones, a window short enough that demo sequences
    # exceed it, so every code path of the big models runs.
    "tiny": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=192,
                 local_attention=32, max_position_embeddings=1024),
    # Smallest thing that still has local and global layers: unit tests.
    "micro": dict(hidden_size=32, num_hidden_layers=5, num_attention_heads=2, intermediate_size=48,
                  local_attention=8, max_position_embeddings=512, vocab_size=256,
                  pad_token_id=3, cls_token_id=1, sep_token_id=2, mask_token_id=4, bos_token_id=1, eos_token_id=2),
}


def pad_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Embedding rows rounded up so matmuls hit tensor-core friendly shapes (50280 -> 50368 uses 128)."""
    return -(-vocab_size // multiple) * multiple


__all__ = ["ModernBertConfig", "PRESETS", "ATTN_BACKENDS", "pad_vocab_size"]

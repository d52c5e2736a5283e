"""ModernBERT for masked language modelling, computed on unpadded (packed) token streams.

The whole stack sees one flat stream of tokens: `input_ids` (tokens,), `cu_seqlens` (documents + 1,) and
`max_seqlen`. No FLOP goes to padding except the tail of a fixed-size packed row. Module and parameter
names equal transformers' `ModernBertForMaskedLM`, so state dicts load both ways unchanged.

Initialisation follows the authors' training code, not transformers: the prediction head's dense layer is
an input-side projection and gets the input std (initializer_range, 0.02), where transformers uses the
output-projection std 0.02/sqrt(2 * layers).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from modernbert_train.model.attention import PackedLayout, packed_attention, resolve_backend
from modernbert_train.model.config import ModernBertConfig
from modernbert_train.model.rope import apply_rotary, positions_in_documents, rotary_cos_sin

log = logging.getLogger("modernbert_train")
IGNORE_INDEX = -100


def _layer_norm(config: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


class ModernBertEmbeddings(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.norm = _layer_norm(config)
        self.drop = nn.Dropout(config.embedding_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.tok_embeddings(input_ids)))


class ModernBertAttention(nn.Module):
    def __init__(self, config: ModernBertConfig, layer_id: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.is_global = config.is_global_layer(layer_id)
        self.window_half = None if self.is_global else config.local_attention // 2
        self.rope_theta = config.global_rope_theta if self.is_global else config.local_rope_theta
        self.attention_dropout = config.attention_dropout
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        # transformers drops the output with attention_dropout; the authors' recipe used a separate rate.
        self.out_drop = nn.Dropout(config.attention_dropout + config.attention_output_dropout
                                   - config.attention_dropout * config.attention_output_dropout)

    def forward(self, hidden: torch.Tensor, layout: PackedLayout, rotary: dict, backend: str) -> torch.Tensor:
        qkv = self.Wqkv(hidden).view(-1, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=1)
        cos, sin = rotary[self.rope_theta]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout_p = self.attention_dropout if self.training else 0.0
        out = packed_attention(q, k, v, layout, backend, self.window_half, dropout_p)
        return self.out_drop(self.Wo(out))


class ModernBertMLP(nn.Module):
    """GeGLU: Wi projects to 2x intermediate; the first half goes through GELU and gates the second."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inputs, gate = self.Wi(hidden).chunk(2, dim=-1)
        return self.Wo(self.drop(F.gelu(inputs) * gate))


class ModernBertEncoderLayer(nn.Module):
    def __init__(self, config: ModernBertConfig, layer_id: int):
        super().__init__()
        # The embedding norm already normalises layer 0's input.
        self.attn_norm = nn.Identity() if layer_id == 0 else _layer_norm(config)
        self.attn = ModernBertAttention(config, layer_id)
        self.mlp_norm = _layer_norm(config)
        self.mlp = ModernBertMLP(config)

    def forward(self, hidden: torch.Tensor, layout: PackedLayout, rotary: dict, backend: str) -> torch.Tensor:
        hidden = hidden + self.attn(self.attn_norm(hidden), layout, rotary, backend)
        return self.mlp_residual(hidden)

    def mlp_residual(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mlp(self.mlp_norm(hidden))


class ModernBertModel(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(ModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = _layer_norm(config)
        self._backend_by_device: dict[tuple[torch.device, bool], str] = {}

    def attention_backend(self, device: torch.device) -> str:
        key = (device, self.training and self.config.attention_dropout > 0)
        if key not in self._backend_by_device:
            backend = resolve_backend(self.config.attn_backend, device, prob_dropout=key[1])
            if not torch.compiler.is_compiling():  # a logger call inside a traced region is a graph break
                log.info("attention backend on %s: %s (requested %s)", device, backend, self.config.attn_backend)
            self._backend_by_device[key] = backend
        return self._backend_by_device[key]

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """input_ids (tokens,), cu_seqlens int32 (documents + 1,) -> hidden states (tokens, hidden)."""
        total_tokens = input_ids.shape[0]
        layout = PackedLayout(cu_seqlens.to(torch.int32), int(max_seqlen), total_tokens)
        positions = positions_in_documents(layout.cu_seqlens, total_tokens)
        thetas = {self.config.global_rope_theta, self.config.local_rope_theta}
        rotary = {theta: rotary_cos_sin(positions, self.config.head_dim, theta) for theta in thetas}
        backend = self.attention_backend(input_ids.device)
        hidden = self.embeddings(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, layout, rotary, backend)
        return self.final_norm(hidden)


class ModernBertPredictionHead(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.norm = _layer_norm(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(hidden)))


@dataclass
class MaskedLMOutput:
    logits: torch.Tensor  # (masked tokens, vocab) when labels are given, else one row per input token
    loss: torch.Tensor | None = None  # mean cross-entropy over masked tokens, fp32
    masked_labels: torch.Tensor | None = None  # the labels matching `logits` rows
    num_masked: torch.Tensor | None = None


class ModernBertForMaskedLM(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        if config.tie_word_embeddings:
            self.decoder.weight = self.model.embeddings.tok_embeddings.weight
        self.reset_parameters()

    # -- init ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Megatron-style init: truncated normal (+-cutoff sigma); output projections scaled by 1/sqrt(2 layers).

        The head's dense layer takes the input std, as in the authors' code, unless config.head_init is "output"
        (transformers' choice, which trains the tiny presets faster: bench/RESULTS.md, issue 27)."""
        std_in = self.config.initializer_range
        std_out = std_in / math.sqrt(2.0 * self.config.num_hidden_layers)
        cutoff = self.config.initializer_cutoff_factor

        def init(linear_or_embedding: nn.Module, std: float) -> None:
            nn.init.trunc_normal_(linear_or_embedding.weight, std=std, a=-cutoff * std, b=cutoff * std)
            if getattr(linear_or_embedding, "bias", None) is not None:
                nn.init.zeros_(linear_or_embedding.bias)

        init(self.model.embeddings.tok_embeddings, std_in)
        for layer in self.model.layers:
            init(layer.attn.Wqkv, std_in)
            init(layer.attn.Wo, std_out)
            init(layer.mlp.Wi, std_in)
            init(layer.mlp.Wo, std_out)
        init(self.head.dense, std_in if self.config.head_init == "input" else std_out)
        if not self.config.tie_word_embeddings:
            init(self.decoder, std_out)
        elif self.decoder.bias is not None:
            nn.init.zeros_(self.decoder.bias)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                num_masked: int | None = None) -> MaskedLMOutput:
        """Packed: input_ids (tokens,) + cu_seqlens + max_seqlen. Padded: input_ids (batch, seq) + attention_mask.

        With labels, the head runs only on tokens whose label is not -100 and `logits` has one row per such
        token. Without labels, logits cover every token: (tokens, vocab) packed, (batch, seq, vocab) padded.
        `num_masked` (the count of such labels, known to the packer) lets the GPU select them without
        waiting for the device: no host sync anywhere in a training step.
        """
        if input_ids.dim() == 2:
            return self._forward_padded(input_ids, attention_mask, labels)
        if cu_seqlens is None or max_seqlen is None:
            raise ValueError("a flat input_ids stream needs cu_seqlens and max_seqlen")
        hidden = self.model(input_ids, cu_seqlens, max_seqlen)
        if labels is None:
            return MaskedLMOutput(logits=self.decoder(self.head(hidden)))
        masked = labels != IGNORE_INDEX
        if num_masked is None:
            hidden, labels = hidden[masked], labels[masked]
        else:
            positions = torch.nonzero_static(masked, size=int(num_masked)).squeeze(1)
            hidden, labels = hidden.index_select(0, positions), labels.index_select(0, positions)
        logits, loss = self.head_and_loss(hidden, labels)
        return MaskedLMOutput(logits=logits, loss=loss, masked_labels=labels, num_masked=masked.sum())

    def head_and_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.decoder(self.head(hidden))
        return logits, F.cross_entropy(logits.float(), labels)

    def compile_dense(self) -> "ModernBertForMaskedLM":
        """torch.compile the parts that fuse well (embeddings, every MLP block with its norm and residual,
        head + loss) and leave attention to its kernels. Shapes are static per packed budget, except the
        head's, which follows the number of masked tokens."""
        self.model.embeddings.forward = torch.compile(self.model.embeddings.forward, dynamic=False)
        for layer in self.model.layers:
            layer.mlp_residual = torch.compile(layer.mlp_residual, dynamic=False)
        self.head_and_loss = torch.compile(self.head_and_loss, dynamic=True)
        return self

    def _forward_padded(self, input_ids, attention_mask, labels) -> MaskedLMOutput:
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.reshape(-1).bool()
        lengths = attention_mask.sum(dim=1, dtype=torch.int32)
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        # Real tokens must form a prefix of each row for positions to restart at the row's first token.
        flat_ids = input_ids.reshape(-1)[keep]
        max_seqlen = int(lengths.max()) if batch else 0
        if labels is not None:
            return self(flat_ids, cu_seqlens, max_seqlen, labels=labels.reshape(-1)[keep])
        hidden = self.model(flat_ids, cu_seqlens, max_seqlen)
        logits_real = self.decoder(self.head(hidden))
        logits = logits_real.new_zeros(batch * seq, logits_real.shape[-1])
        logits[keep] = logits_real
        return MaskedLMOutput(logits=logits.view(batch, seq, -1))

    # -- Hugging Face interop -----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source, **config_overrides) -> "ModernBertForMaskedLM":
        """Build from a transformers ModernBertForMaskedLM, or a folder with config.json + weights."""
        from modernbert_train.model import hf

        return hf.load_hf(cls, source, **config_overrides)

    def save_hf(self, out_dir, dtype: torch.dtype | None = None) -> None:
        """Write config.json + model.safetensors that transformers' ModernBertForMaskedLM loads."""
        from modernbert_train.model import hf

        hf.save_hf(self, out_dir, dtype=dtype)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.model.embeddings.tok_embeddings.weight), None)
        return sum(p.numel() for p in params.values())

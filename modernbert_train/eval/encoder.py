"""Fine-tuning models on top of our packed encoder: a sequence classifier and a mean-pooling embedder.

Texts are tokenized with the model's own tokenizer.json ([CLS] a [SEP] or [CLS] a [SEP] b [SEP]) and fed as
one packed stream (no padding). The classifier has the parameter names and the computation of
transformers' `ModernBertForSequenceClassification` (pooling -> head dense/GELU/norm -> dropout -> linear),
so a state dict loads there unchanged; tests/eval check the logits agree on the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from modernbert_train.model import ModernBertForMaskedLM


class TextEncoder:
    """tokenizer.json -> id lists, truncated to `max_length` (pairs: the longer text first)."""

    def __init__(self, tokenizer_file, max_length: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
        self.max_length = max_length

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> list[list[int]]:
        inputs = list(texts) if pairs is None else list(zip(texts, pairs))
        return [e.ids for e in self.tokenizer.encode_batch(inputs)]


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (tokens,)
    cu_seqlens: torch.Tensor  # (docs + 1,) int32
    max_seqlen: int

    @classmethod
    def of(cls, sequences: list[list[int]], device: torch.device | str = "cpu") -> "PackedBatch":
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int32)
        ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device)
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)).to(device)
        return cls(ids, cu, int(lengths.max()))

    @property
    def num_docs(self) -> int:
        return self.cu_seqlens.numel() - 1


def mean_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(tokens, hidden) over packed documents -> (docs, hidden) mean of each document's tokens."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    doc_index = torch.repeat_interleave(torch.arange(lengths.numel(), device=hidden.device), lengths)
    sums = hidden.new_zeros(lengths.numel(), hidden.shape[-1]).index_add_(0, doc_index, hidden)
    return sums / lengths.clamp(min=1).unsqueeze(1).to(hidden.dtype)


class SequenceClassifier(nn.Module):
    """transformers' ModernBertForSequenceClassification on packed input (num_labels 1: regression)."""

    def __init__(self, mlm: ModernBertForMaskedLM, num_labels: int, pooling: str = "mean", dropout: float = 0.0):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', not {pooling!r}")
        self.config = mlm.config
        self.model = mlm.model
        self.head = mlm.head  # the pretrained MLM head's dense + norm, as transformers reuses them
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(mlm.config.hidden_size, num_labels)
        self.pooling = pooling
        std = mlm.config.initializer_range
        nn.init.trunc_normal_(self.classifier.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        hidden = self.model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
        pooled = mean_pool(hidden, batch.cu_seqlens) if self.pooling == "mean" else hidden[batch.cu_seqlens[:-1].long()]
        return self.classifier(self.drop(self.head(pooled)))


class MeanPoolingEmbedder(nn.Module):
    """Single-vector embedder (DPR setting): final hidden states mean-pooled, L2-normalised. This is what
    sentence-transformers computes on the exported folder (its modules.json uses mean pooling)."""

    def __init__(self, mlm: ModernBertForMaskedLM):
        super().__init__()
        self.config = mlm.config
        self.model = mlm.model

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        hidden = self.model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
        return F.normalize(mean_pool(hidden, batch.cu_seqlens), dim=-1)

"""Model FLOPs of one training step (forward + backward = 3x forward), counted the way MFU papers do.

Dense matmuls per token, attention over the keys each query really sees (its document, clipped to the
window on local layers), and the MLM head only on masked tokens. Padding contributes nothing: the
numbers are useful work, so MFU from them is honest. Closed forms only: this runs on the host every step.
"""
from __future__ import annotations

from typing import Sequence

from modernbert_train.model.config import ModernBertConfig


def attended_pairs(length: int, window_half: int | None) -> int:
    """Query-key pairs (i, j) of one document of `length` tokens with |i - j| <= window_half (all if None)."""
    reach = length - 1 if window_half is None else min(window_half, length - 1)
    # The diagonal, plus both sides of every offset d = 1..reach, each offset holding length - d pairs.
    return length + 2 * (reach * length - reach * (reach + 1) // 2) if length > 0 else 0


def training_flops(config: ModernBertConfig, document_lengths: Sequence[int], num_masked: int) -> float:
    h, i = config.hidden_size, config.intermediate_size
    layers = config.num_hidden_layers
    global_layers = sum(config.is_global_layer(layer) for layer in range(layers))
    tokens = sum(document_lengths)
    forward = tokens * 2 * (3 * h * h + h * h + 2 * h * i + i * h) * layers
    global_pairs = sum(attended_pairs(n, None) for n in document_lengths)
    local_pairs = sum(attended_pairs(n, config.local_attention // 2) for n in document_lengths)
    # QK^T and attention x V: 2 matmuls of 2 * head_dim * heads = 2h FLOPs per pair each.
    forward += 4 * h * (global_pairs * global_layers + local_pairs * (layers - global_layers))
    forward += num_masked * (2 * h * h + 2 * h * config.vocab_size)
    return 3.0 * forward

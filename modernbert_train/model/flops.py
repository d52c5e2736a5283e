"""Model FLOPs of one training step (forward + backward = 3x forward), counted the way MFU papers do.

Dense matmuls per token, attention over the keys each query really sees (its document, clipped to the
window on local layers), and the MLM head only on masked tokens. Padding contributes nothing: the
numbers are useful work, so MFU from them is honest.
"""
from __future__ import annotations

from typing import Sequence

from modernbert_train.model.config import ModernBertConfig


def _keys_seen_per_token(length: int, window_half: int | None) -> int:
    """Sum over a document's queries of the number of keys each attends to."""
    if window_half is None or length <= window_half:
        return length * length
    # Query i sees keys max(0, i-w) .. min(L-1, i+w): full windows in the middle, truncated at both ends.
    w = window_half
    full = 2 * w + 1
    if length <= full:
        return sum(min(length - 1, i + w) - max(0, i - w) + 1 for i in range(length))
    edge = sum(min(length - 1, i + w) - max(0, i - w) + 1 for i in range(w))
    return 2 * edge + (length - 2 * w) * full


def training_flops(config: ModernBertConfig, document_lengths: Sequence[int], num_masked: int) -> float:
    h, i = config.hidden_size, config.intermediate_size
    tokens = sum(document_lengths)
    dense_per_token = 2 * (3 * h * h + h * h + 2 * h * i + i * h)
    forward = tokens * dense_per_token * config.num_hidden_layers
    for layer in range(config.num_hidden_layers):
        window = None if config.is_global_layer(layer) else config.local_attention // 2
        key_pairs = sum(_keys_seen_per_token(n, window) for n in document_lengths)
        forward += 4 * h * key_pairs  # QK^T and attention x V
    forward += num_masked * (2 * h * h + 2 * h * config.vocab_size)
    return 3.0 * forward

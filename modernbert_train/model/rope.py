"""Rotary position embedding (GPT-NeoX layout: the head dim's halves rotate together) over packed streams.

Positions restart at 0 at every document boundary of `cu_seqlens`, so a document gets the same
rotations whether it is packed with others or alone. cos/sin are built in fp32 once per forward pass
and theta, and shared by every layer of that theta.
"""
from __future__ import annotations

import torch


def positions_in_documents(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Position of each token inside its own document, (total_tokens,) int64, without a host sync."""
    token_index = torch.arange(total_tokens, device=cu_seqlens.device)
    document = torch.searchsorted(cu_seqlens[1:].to(torch.int64), token_index, right=True)
    return token_index - cu_seqlens.to(torch.int64)[document]


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (tokens, head_dim) in fp32."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim); cos/sin: (tokens, head_dim). Computed in x's dtype, as transformers does."""
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    return x * cos + _rotate_half(x) * sin

"""Attention over packed streams: one interface, several kernels.

Every backend computes the same function: each document of `cu_seqlens` attends only to itself, fully on
global layers and within +-local_attention/2 tokens on local layers, scale head_dim**-0.5, no causal mask.

| backend       | where                                   | dropout on probs |
|---------------|-----------------------------------------|------------------|
| flash_attn    | CUDA with the flash-attn package        | yes              |
| torch_varlen  | CUDA, torch >= 2.10 (nn.attention.varlen) | no             |
| flex          | CUDA (FlexAttention, block mask per batch) | no            |
| sdpa          | anywhere; documents padded to max_seqlen + boolean mask; exact | yes |

`auto` picks the first usable one in that order for the device and dropout setting. A forced backend that
cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from modernbert_train.common.errors import UserError

log = logging.getLogger("modernbert_train")

AUTO_ORDER = ("flash_attn", "torch_varlen", "flex", "sdpa")
BACKENDS_WITH_PROB_DROPOUT = ("flash_attn", "sdpa")
# Backends whose kernels compute in half precision whatever the input dtype (fp32 inputs are cast).
HALF_PRECISION_BACKENDS = ("flash_attn", "torch_varlen")
HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_varlen_qkvpacked_func
    except ImportError:
        return None
    return flash_attn_varlen_qkvpacked_func


@functools.lru_cache(maxsize=None)
def _torch_varlen_func():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    # Local layers need a sliding window; versions without it cannot compute this model.
    return varlen_attn if "window_size" in inspect.signature(varlen_attn).parameters else None


@functools.lru_cache(maxsize=None)
def _flex_funcs():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device`, or None when it can."""
    on_cuda = device.type == "cuda"
    if backend == "sdpa":
        return None
    if backend == "flash_attn":
        if not on_cuda:
            return "flash-attn needs a CUDA device"
        return None if _flash_attn_func() else "the flash-attn package is not installed (pip install 'modernbert-train[flash]')"
    if backend == "torch_varlen":
        if not on_cuda:
            return "torch varlen attention needs a CUDA device"
        return None if _torch_varlen_func() else f"torch {torch.__version__} has no nn.attention.varlen.varlen_attn with window_size"
    if backend == "flex":
        if not on_cuda:
            return "FlexAttention training needs a CUDA device (its CPU backward is not implemented)"
        return None if _flex_funcs() else f"torch {torch.__version__} has no FlexAttention"
    return f"unknown attention backend {backend!r}"


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [name for name in AUTO_ORDER if unavailable_reason(name, device) is None]


def resolve_backend(requested: str, device: torch.device, prob_dropout: bool) -> str:
    if requested == "auto":
        for name in AUTO_ORDER:
            if unavailable_reason(name, device) is None and (not prob_dropout or name in BACKENDS_WITH_PROB_DROPOUT):
                return name
    reason = unavailable_reason(requested, device)
    if reason:
        raise UserError(f"attn_backend={requested!r} cannot run here: {reason}")
    if prob_dropout and requested not in BACKENDS_WITH_PROB_DROPOUT:
        raise UserError(f"attn_backend={requested!r} has no dropout on attention probabilities; set attention_dropout=0 "
                        f"(use attention_output_dropout) or choose one of {BACKENDS_WITH_PROB_DROPOUT}")
    return requested


@dataclass
class PackedLayout:
    """What every layer needs to know about one packed stream; backend metadata is built once and shared."""

    cu_seqlens: torch.Tensor  # int32 (documents + 1,)
    max_seqlen: int
    total_tokens: int
    _cache: dict = field(default_factory=dict)

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def document_of_token(self) -> torch.Tensor:
        def build():
            token_index = torch.arange(self.total_tokens, device=self.cu_seqlens.device)
            return torch.searchsorted(self.cu_seqlens[1:].to(torch.int64), token_index, right=True)
        return self.cached("document_of_token", build)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, backend: str,
                     window_half: int | None, dropout_p: float) -> torch.Tensor:
    """q, k, v: (tokens, heads, head_dim) with RoPE applied. Returns (tokens, heads * head_dim).

    window_half: None on global layers, else keys within +-window_half positions of the query.
    """
    if backend == "sdpa":
        out = _sdpa_padded(q, k, v, layout, window_half, dropout_p)
    elif backend == "flash_attn":
        out = _flash(q, k, v, layout, window_half, dropout_p)
    elif backend == "torch_varlen":
        window = (window_half, window_half) if window_half is not None else (-1, -1)
        dtype = q.dtype
        if dtype not in HALF_DTYPES:  # a flash-attention kernel: half precision only
            q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
        out = _torch_varlen_func()(q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen,
                                   layout.max_seqlen, window_size=window).to(dtype)
    elif backend == "flex":
        out = _flex(q, k, v, layout, window_half)
    else:
        raise UserError(f"unknown attention backend {backend!r}")
    return out.reshape(q.shape[0], -1)


def _flash(q, k, v, layout, window_half, dropout_p):
    qkv = torch.stack((q, k, v), dim=1)
    dtype = qkv.dtype
    if dtype not in HALF_DTYPES:
        qkv = qkv.to(torch.bfloat16)  # flash-attn computes in half precision only
    window = (window_half, window_half) if window_half is not None else (-1, -1)
    out = _flash_attn_func()(qkv, layout.cu_seqlens, layout.max_seqlen, dropout_p=dropout_p, window_size=window)
    return out.to(dtype)


def _flex(q, k, v, layout, window_half):
    flex_attention, create_block_mask = _flex_funcs()
    document = layout.document_of_token

    def build_mask():
        def same_document(b, h, q_idx, kv_idx):
            keep = document[q_idx] == document[kv_idx]
            if window_half is not None:
                keep = keep & ((q_idx - kv_idx).abs() <= window_half)
            return keep
        return create_block_mask(same_document, None, None, layout.total_tokens, layout.total_tokens,
                                 device=q.device, _compile=True)

    block_mask = layout.cached(("flex", window_half), build_mask)
    out = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                         block_mask=block_mask)
    return out[0].transpose(0, 1)


def _sdpa_padded(q, k, v, layout, window_half, dropout_p):
    """Exact reference path: scatter documents into a (documents, max_seqlen) grid, mask, gather back."""
    heads, head_dim = q.shape[1], q.shape[2]
    documents = layout.cu_seqlens.numel() - 1
    width = layout.max_seqlen
    flat_index, grid_mask = layout.cached(("sdpa", window_half), lambda: _sdpa_grid(layout, window_half))

    def to_grid(x):
        grid = x.new_zeros(documents * width, heads, head_dim).index_copy(0, flat_index, x)
        return grid.view(documents, width, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(to_grid(q), to_grid(k), to_grid(v), attn_mask=grid_mask, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(documents * width, heads, head_dim).index_select(0, flat_index)


def _sdpa_grid(layout: PackedLayout, window_half: int | None):
    cu = layout.cu_seqlens.to(torch.int64)
    width = layout.max_seqlen
    document = layout.document_of_token
    position = torch.arange(layout.total_tokens, device=cu.device) - cu[document]
    flat_index = document * width + position
    lengths = cu[1:] - cu[:-1]
    slot = torch.arange(width, device=cu.device)
    real = slot[None, :] < lengths[:, None]  # (documents, width)
    allowed = real[:, None, None, :].expand(-1, 1, width, width)
    if window_half is not None:
        allowed = allowed & ((slot[:, None] - slot[None, :]).abs() <= window_half)
    # Padding queries may see every slot: their rows are dropped afterwards, and an all-masked row would
    # produce NaN whose backward poisons the real keys' gradients.
    allowed = allowed | ~real[:, None, :, None]
    return flat_index, allowed

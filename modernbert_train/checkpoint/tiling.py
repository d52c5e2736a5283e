"""Initialise a larger ModernBERT from a smaller one by centre tiling with wraparound (torch only).

ModernBERT-large started from ModernBERT-base this way rather than from random weights (the authors'
"tile_weights_from_middle"): along every dimension the source is placed in the centre of the target and
repeated with wraparound to fill the rest, so target index i takes source index (i - offset) mod source_size
with offset = (target_size - source_size) // 2. A target dimension smaller than the source keeps the centre.

Layers are not wrapped around: target layer i copies source layer round(i * source_layers / target_layers)
(the authors' depth mapping), so the stack keeps its order from the first layer to the last and a repeated
layer sits next to its copy (6 -> 8 layers: 0, 1, 2, 2, 3, 4, 4, 5). A wraparound order (5, 0, 1, ..., 5, 0)
puts the source's last layer first; measured on the tiny runs it starts above a random init (issue 28).

Fused matrices are tiled per part, so each part keeps its role: Wqkv holds q, k and v stacked on dim 0 and
the GeGLU Wi holds input and gate. Tiling into the same shape is the identity.

Where a matrix's input dimension grows, its tiled weights are divided by the growth (source / target inputs):
every input reaches it repeated that many times, so the sum it computes stays the source's sum. The authors'
code tiles without this, and the wider model then computes a different function: its pre-activations,
attention logits and (through the tied embeddings) output logits grow with the width, more so the longer
the source trained. Measured on the tiny runs (held-out loss, random init 6.55-6.58): a 44-step source
tiled to twice its width started at 7.05 unscaled and 6.02 scaled (the source itself: 6.01); 1.5 times
wider, 6.64 and 6.14 (source 6.14). The embeddings are divided too: their LayerNorm undoes it on the way in,
and the tied decoder needs it on the way out.
"""
from __future__ import annotations

import re

import torch
from torch import nn

# Parameter name suffix -> number of parts stacked along dim 0.
_FUSED_PARTS = {"attn.Wqkv.weight": 3, "attn.Wqkv.bias": 3, "mlp.Wi.weight": 2, "mlp.Wi.bias": 2}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def centre_indices(target: int, source: int) -> torch.Tensor:
    """Source index for every target index: the source centred in the target, wrapping around."""
    offset = (target - source) // 2
    return (torch.arange(target) - offset) % source


def layer_indices(target: int, source: int) -> list[int]:
    """Source layer for every target layer: round(i * source / target), in order (Python's round, as the
    authors' code)."""
    return [min(source - 1, round(i * source / target)) for i in range(target)]


def tile_tensor(source: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """`source` centre-tiled with wraparound to `shape` (same number of dimensions)."""
    if source.dim() != len(shape):
        raise ValueError(f"cannot tile a {source.dim()}-d tensor into shape {tuple(shape)}")
    out = source
    for dim, size in enumerate(shape):
        if out.shape[dim] != size:
            out = out.index_select(dim, centre_indices(size, out.shape[dim]).to(out.device))
    return out.clone()


def tile_parameter(name: str, source: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Tile one named parameter; fused parts (q|k|v, input|gate) are tiled separately and re-stacked, and a
    matrix whose inputs grew is divided by the growth (the module docstring says why)."""
    parts = next((n for suffix, n in _FUSED_PARTS.items() if name.endswith(suffix)), 1)
    if parts == 1:
        tiled = tile_tensor(source, shape)
    else:
        part_shape = (shape[0] // parts, *shape[1:])
        tiled = torch.cat([tile_tensor(chunk, part_shape) for chunk in source.chunk(parts, dim=0)], dim=0)
    if source.dim() == 2 and shape[1] > source.shape[1]:
        tiled *= source.shape[1] / shape[1]
    return tiled


def tile_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of `target` (names and shapes) filled from `source` by centre tiling.

    Layer tensors come from the source layer `layer_indices` maps to; a tensor the mapped source layer
    lacks (layer 0 has no attention norm) keeps the target's own value (a freshly initialised norm).
    """
    source_layers = 1 + max((int(m.group(1)) for k in source if (m := _LAYER.match(k))), default=-1)
    target_layers = 1 + max((int(m.group(1)) for k in target if (m := _LAYER.match(k))), default=-1)
    layer_map = layer_indices(target_layers, source_layers) if source_layers else []
    tiled = {}
    for name, own in target.items():
        match = _LAYER.match(name)
        source_name = f"model.layers.{layer_map[int(match.group(1))]}.{match.group(2)}" if match else name
        if source_name not in source:
            if match:
                tiled[name] = own.clone()
                continue
            raise KeyError(f"the source model has no {source_name}")
        value = source[source_name].to(own.dtype)
        tiled[name] = tile_parameter(name, value, own.shape)
    return tiled


def tile_into(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Load `source` (a smaller or equal model's state dict) into `model` by centre tiling."""
    with torch.no_grad():
        model.load_state_dict(tile_state_dict(source, model.state_dict()), strict=True)


__all__ = ["centre_indices", "layer_indices", "tile_tensor", "tile_parameter", "tile_state_dict", "tile_into"]

"""The padded-sum oracle: the formulation of the TangleNAS seed code.

``W_mix = sum_k mix_k * pad(slice_k(W))``: one padded temporary and one
multiply-add per candidate, autograd keeps about K more. It is the ground truth
every backend is tested against, and the baseline every benchmark compares to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import Layout


def _pad_args(box, shape):
    # F.pad takes (left, right) pairs starting from the LAST dimension.
    pads = []
    for (lo, hi), size in zip(reversed(box), reversed(shape)):
        pads += [lo, size - hi]
    return pads


def superpose_reference(weight: torch.Tensor, mix: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``sum_k mix_k * pad(slice_k(W))`` exactly as the seed code builds it."""
    out = None
    for box, k in zip(layout.boxes, layout.owners):
        sl = weight[tuple(slice(lo, hi) for lo, hi in box)]
        term = mix[k].to(weight.dtype) * F.pad(sl, _pad_args(box, layout.shape))
        out = term if out is None else out + term
    return out


def superpose_masksum(weight: torch.Tensor, mix: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The mask-sum formulation other NAS libraries use: one dense 0/1 mask per
    candidate, ``W * sum_k mix_k * mask_k`` (K weight-sized masks kept alive)."""
    masks = _dense_masks(layout, weight.device, weight.dtype)
    M = (masks * mix.to(weight.dtype).view(-1, *([1] * weight.dim()))).sum(0)
    return weight * M


_MASK_CACHE: dict = {}


def _dense_masks(layout: Layout, device, dtype) -> torch.Tensor:
    key = (layout, str(device), dtype)
    m = _MASK_CACHE.get(key)
    if m is None:
        m = torch.zeros((layout.K, *layout.shape), device=device, dtype=dtype)
        for box, k in zip(layout.boxes, layout.owners):
            m[(k, *[slice(lo, hi) for lo, hi in box])] = 1
        if len(_MASK_CACHE) > 64:
            _MASK_CACHE.clear()
        _MASK_CACHE[key] = m
    return m

"""Vectorised pure-PyTorch backend: no K temporaries, any device.

The mask is expanded from the cell values with two ``index_select`` (an
``R x ncg`` intermediate, then the ``R x C`` mask); the per-cell sums use two
``index_add_`` reductions. Half-precision inputs are computed in float32.
On CUDA ``index_add_`` uses atomics, so this backend's d mix is not bitwise
deterministic there (the triton/cuda backends have a deterministic mode).
"""

from __future__ import annotations

import torch


def _mask2d(t: torch.Tensor, tabs: dict) -> torch.Tensor:
    return t.index_select(0, tabs["rowgrp_l"]).index_select(1, tabs["colgrp_l"])


def _long_tables(tabs: dict) -> dict:
    if "rowgrp_l" not in tabs:
        tabs["rowgrp_l"] = tabs["rowgrp"].long()
        tabs["colgrp_l"] = tabs["colgrp"].long()
    return tabs


def forward(w2d: torch.Tensor, t: torch.Tensor, tabs: dict) -> torch.Tensor:
    tabs = _long_tables(tabs)
    M = _mask2d(t, tabs)
    return (w2d.to(t.dtype) * M).to(w2d.dtype)


def backward(g2d: torch.Tensor, w2d: torch.Tensor, t: torch.Tensor, tabs: dict):
    tabs = _long_tables(tabs)
    M = _mask2d(t, tabs)
    gt = g2d.to(t.dtype)
    dw = (gt * M).to(w2d.dtype)
    prod = gt * w2d.to(t.dtype)
    nrg, ncg = t.shape
    q = torch.zeros((prod.shape[0], ncg), dtype=t.dtype, device=t.device)
    q.index_add_(1, tabs["colgrp_l"], prod)
    p = torch.zeros((nrg, ncg), dtype=t.dtype, device=t.device)
    p.index_add_(0, tabs["rowgrp_l"], q)
    return dw, p

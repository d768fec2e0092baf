"""superpose on CPU (csrc/cpu/superpose_cpu.cpp). d mix is bitwise deterministic for
any number of threads."""

from __future__ import annotations

import torch

from ..._ext import DTYPE_CODES, _C


def forward(w2d: torch.Tensor, t: torch.Tensor, tabs: dict) -> torch.Tensor:
    """``W * T[cell]`` of the ``[R, C]`` weight view (copied to contiguous if needed)."""
    w2d = w2d.contiguous()
    t = t.contiguous()
    out = torch.empty_like(w2d)
    R, C = w2d.shape
    runs = tabs["runs"]
    _C.superpose_forward_cpu(
        dtype=DTYPE_CODES[w2d.dtype], R=R, C=C, nrg=t.shape[0], ncg=t.shape[1],
        w=w2d.data_ptr(), out=out.data_ptr(), t=t.data_ptr(), rowgrp=tabs["rowgrp"].data_ptr(),
        runs=runs.data_ptr(), nruns=runs.shape[0],
    )
    return out


def backward(g2d: torch.Tensor, w2d: torch.Tensor, t: torch.Tensor, tabs: dict):
    """``(dW, P)``: ``dW = G * T[cell]`` and the per-cell sums ``P = sum_cell G * W``."""
    w2d = w2d.contiguous()
    g2d = g2d.contiguous()
    t = t.contiguous()
    dw = torch.empty_like(w2d)
    p = torch.empty_like(t)
    R, C = w2d.shape
    runs = tabs["runs"]
    _C.superpose_backward_cpu(
        dtype=DTYPE_CODES[w2d.dtype], R=R, C=C, nrg=t.shape[0], ncg=t.shape[1],
        w=w2d.data_ptr(), g=g2d.data_ptr(), dw=dw.data_ptr(), t=t.data_ptr(), p=p.data_ptr(),
        rowgrp=tabs["rowgrp"].data_ptr(), runs=runs.data_ptr(), nruns=runs.shape[0],
    )
    return dw, p

"""C++/OpenMP backend (csrc/cpu/superpose_cpu.cpp) through ``tangle_kernels._C``.

The extension takes raw pointers; this wrapper guarantees contiguity, dtype and
device. d mix is bitwise deterministic for any number of threads.
"""

from __future__ import annotations

import torch

from .._ext import _C

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def forward(w2d: torch.Tensor, t: torch.Tensor, tabs: dict) -> torch.Tensor:
    w2d = w2d.contiguous()
    t = t.contiguous()
    out = torch.empty_like(w2d)
    R, C = w2d.shape
    runs = tabs["runs"]
    _C.superpose_forward_cpu(
        DTYPE_CODES[w2d.dtype], R, C, t.shape[0], t.shape[1], w2d.data_ptr(), out.data_ptr(),
        t.data_ptr(), tabs["rowgrp"].data_ptr(), runs.data_ptr(), runs.shape[0],
    )
    return out


def backward(g2d: torch.Tensor, w2d: torch.Tensor, t: torch.Tensor, tabs: dict):
    w2d = w2d.contiguous()
    g2d = g2d.contiguous()
    t = t.contiguous()
    dw = torch.empty_like(w2d)
    p = torch.empty_like(t)
    R, C = w2d.shape
    runs = tabs["runs"]
    _C.superpose_backward_cpu(
        DTYPE_CODES[w2d.dtype], R, C, t.shape[0], t.shape[1], w2d.data_ptr(), g2d.data_ptr(),
        dw.data_ptr(), t.data_ptr(), p.data_ptr(), tabs["rowgrp"].data_ptr(), runs.data_ptr(),
        runs.shape[0],
    )
    return dw, p

"""CUDA backend (csrc/cuda/superpose_cuda.cu) through ``tangle_kernels._C``.

Launches on PyTorch's current stream. ``deterministic`` (default: follows
``torch.are_deterministic_algorithms_enabled()`` or ``TANGLE_DETERMINISTIC=1``)
reduces per-block partials in a fixed order instead of using atomics.
"""

from __future__ import annotations

import os

import torch

from .._ext import _C
from .cpu import DTYPE_CODES


def deterministic_mode() -> bool:
    return torch.are_deterministic_algorithms_enabled() or os.environ.get(
        "TANGLE_DETERMINISTIC", "0"
    ) not in ("", "0")


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def forward(w2d: torch.Tensor, t: torch.Tensor, tabs: dict) -> torch.Tensor:
    w2d = w2d.contiguous()
    t = t.contiguous()
    out = torch.empty_like(w2d)
    R, C = w2d.shape
    _C.superpose_forward_cuda(
        DTYPE_CODES[w2d.dtype], R, C, t.shape[0], t.shape[1], w2d.data_ptr(), out.data_ptr(),
        t.data_ptr(), tabs["rowgrp"].data_ptr(), tabs["colgrp"].data_ptr(), _stream(w2d),
    )
    return out


def backward(g2d: torch.Tensor, w2d: torch.Tensor, t: torch.Tensor, tabs: dict):
    w2d = w2d.contiguous()
    g2d = g2d.contiguous()
    t = t.contiguous()
    dw = torch.empty_like(w2d)
    p = torch.empty_like(t)
    R, C = w2d.shape
    nrg, ncg = t.shape
    det = deterministic_mode()
    nbytes = _C.superpose_backward_cuda_workspace(R, C, nrg, ncg) if det else 0
    ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=w2d.device)
    _C.superpose_backward_cuda(
        DTYPE_CODES[w2d.dtype], R, C, nrg, ncg, w2d.data_ptr(), g2d.data_ptr(), dw.data_ptr(),
        t.data_ptr(), p.data_ptr(), tabs["rowgrp"].data_ptr(), tabs["colgrp"].data_ptr(),
        ws.data_ptr(), nbytes, int(det), _stream(w2d),
    )
    return dw, p

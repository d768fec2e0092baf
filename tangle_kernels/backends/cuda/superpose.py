"""superpose on CUDA (csrc/cuda/superpose_cuda.cu) through ``tangle_kernels._C``.

Kernels: row-group-aware tiles (each thread owns 16 bytes of columns for a run of
rows, so the mask values are loaded once per run), 128-bit vector loads when the
columns and pointers allow it, a grid sized to the SMs. Launches on PyTorch's
current stream.

P (per-cell sums of G * W, float32; float64 for float64 weights) has two modes:
``deterministic`` (per-block partials to a workspace, then a fixed-order reduction
kernel; bitwise repeatable on a given GPU model) and ``atomic`` (one atomicAdd per
cell and block run). The default follows :func:`deterministic_mode`:
``torch.are_deterministic_algorithms_enabled()`` or ``TANGLE_DETERMINISTIC=1``.
Non-contiguous weights/grads are made contiguous (a copy) before the launch.
"""

from __future__ import annotations

import torch

from ..._ext import DTYPE_CODES, _C
from .. import deterministic_mode  # noqa: F401  (re-exported: the mode of the P reduction)


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what inductor uses


def _stream(idx: int) -> int:
    if _raw_stream is not None:
        return _raw_stream(idx)
    return torch.cuda.current_stream(idx).cuda_stream  # pragma: no cover


class _on_device:
    """``torch.cuda.device(idx)`` only when ``idx`` is not already current (the
    context manager costs more than a small kernel launch)."""

    __slots__ = ("idx", "prev")

    def __init__(self, idx: int):
        self.idx = idx
        self.prev = None

    def __enter__(self):
        cur = torch.cuda.current_device()
        if cur != self.idx:
            self.prev = cur
            torch.cuda.set_device(self.idx)
        return self

    def __exit__(self, *exc):
        if self.prev is not None:
            torch.cuda.set_device(self.prev)
        return False


def forward(w2d: torch.Tensor, t: torch.Tensor, tabs: dict) -> torch.Tensor:
    w2d = w2d.contiguous()
    t = t.contiguous()
    out = torch.empty_like(w2d)
    R, C = w2d.shape
    idx = w2d.device.index
    with _on_device(idx):
        _C.superpose_forward_cuda(
            dtype=DTYPE_CODES[w2d.dtype], R=R, C=C, nrg=t.shape[0], ncg=t.shape[1],
            w=w2d.data_ptr(), out=out.data_ptr(), t=t.data_ptr(), rowgrp=tabs["rowgrp"].data_ptr(),
            colgrp=tabs["colgrp"].data_ptr(), stream=_stream(idx),
        )
    return out


def backward(g2d: torch.Tensor, w2d: torch.Tensor, t: torch.Tensor, tabs: dict, mode: str | None = None):
    """``(dW, P)``; ``mode`` is ``"deterministic"``, ``"atomic"`` or None (see module doc)."""
    w2d = w2d.contiguous()
    g2d = g2d.to(w2d.dtype).contiguous()
    t = t.contiguous()
    dw = torch.empty_like(w2d)
    p = torch.empty_like(t)
    R, C = w2d.shape
    nrg, ncg = t.shape
    if mode is None:
        det = deterministic_mode()
    elif mode in ("deterministic", "atomic"):
        det = mode == "deterministic"
    else:
        raise ValueError(f"mode: expected 'deterministic' or 'atomic', got {mode!r}")
    code = DTYPE_CODES[w2d.dtype]
    idx = w2d.device.index
    with _on_device(idx):
        nbytes = 0
        if det:
            nbytes = _C.superpose_backward_cuda_workspace(
                dtype=code, R=R, C=C, nrg=nrg, ncg=ncg, w=w2d.data_ptr(), g=g2d.data_ptr(),
                dw=dw.data_ptr(),
            )
        ws = torch.empty(max(nbytes, 16), dtype=torch.uint8, device=w2d.device)
        _C.superpose_backward_cuda(
            dtype=code, R=R, C=C, nrg=nrg, ncg=ncg, w=w2d.data_ptr(), g=g2d.data_ptr(),
            dw=dw.data_ptr(), t=t.data_ptr(), p=p.data_ptr(), rowgrp=tabs["rowgrp"].data_ptr(),
            colgrp=tabs["colgrp"].data_ptr(), workspace=ws.data_ptr(), workspace_bytes=nbytes,
            deterministic=int(det), stream=_stream(idx),
        )
    return dw, p

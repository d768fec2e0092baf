"""The superposed LayerNorm on CPU (csrc/cpu/layernorm_mix_cpu.cpp); the math is in
tangle_kernels/ops/mixed_layernorm.py."""

from __future__ import annotations

import torch

from ..._ext import DTYPE_CODES, _C


def why_unavailable() -> str | None:
    if not hasattr(_C, "mixed_layernorm_forward_cpu"):
        return "tangle_kernels._C has no mixed_layernorm_forward_cpu (rebuild the extension)"
    return None


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def forward(x2d, widths, mix, eps, weight, bmix):
    """``x2d [N, E]`` (contiguous columns) -> ``(y [N, E], mu [N, K], rstd [N, K])``
    (``weight``, ``bmix``: contiguous ``[E]`` of x's dtype, or None; ``mix``: floats)."""
    N, E = x2d.shape
    K = len(widths)
    y = torch.empty(N, E, dtype=x2d.dtype)
    mu = torch.empty(N, K, dtype=torch.float64)
    rstd = torch.empty(N, K, dtype=torch.float64)
    _C.mixed_layernorm_forward_cpu(
        dtype=DTYPE_CODES[x2d.dtype], N=N, E=E, widths=list(widths), mix=list(mix),
        eps=float(eps), x=x2d.data_ptr(), sx=x2d.stride(0), w=_ptr(weight), bmix=_ptr(bmix),
        y=y.data_ptr(), mu=mu.data_ptr(), rstd=rstd.data_ptr(),
    )
    return y, mu, rstd


def backward(g2d, x2d, widths, mix, weight, mu, rstd, *, want_w, want_b):
    """``(dx [N, E], dw [E] or None, d bmix [E] or None, d mix [K] float64)``."""
    N, E = x2d.shape
    dx = torch.empty(N, E, dtype=x2d.dtype)
    dw = torch.empty(E, dtype=x2d.dtype) if want_w else None
    db = torch.empty(E, dtype=x2d.dtype) if want_b else None
    dmix = torch.empty(len(widths), dtype=torch.float64)
    _C.mixed_layernorm_backward_cpu(
        dtype=DTYPE_CODES[x2d.dtype], N=N, E=E, widths=list(widths), mix=list(mix),
        x=x2d.data_ptr(), sx=x2d.stride(0), w=_ptr(weight), mu=mu.data_ptr(),
        rstd=rstd.data_ptr(), g=g2d.data_ptr(), sg=g2d.stride(0), dx=dx.data_ptr(),
        dw=_ptr(dw), dbmix=_ptr(db), dmix=dmix.data_ptr(),
    )
    return dx, dw, db, dmix

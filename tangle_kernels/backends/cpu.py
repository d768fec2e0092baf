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


def _rows(t: torch.Tensor, ndim: int):
    if t.dim() != ndim or t.stride(-1) != 1:
        raise ValueError(f"head partition: expected a {ndim}-D tensor with contiguous columns, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")
    return t.stride()


def head_partition(scatter: bool, src: torch.Tensor, dst: torch.Tensor, heads: int,
                   widths, coefs, *, accumulate: bool, other: torch.Tensor | None = None):
    """The head-partition gather (``scatter=False``: ``src [B, T, >=E]`` -> ``dst [B, T,
    h, D]``) or scatter (``scatter=True``: ``src [B, T, h, D]`` -> ``dst [B, T, E]``) of
    csrc/cpu/head_partition_cpu.cpp, on strided views (columns contiguous) in place.
    ``widths``/``coefs``: per embedding candidate its head width ``d_i`` and coefficient.
    Returns the dots with ``other`` (float64 ``[m]``) or None."""
    if src.dtype not in (torch.float32, torch.float64) or dst.dtype != src.dtype:
        raise ValueError(f"head partition: float32/float64, got {src.dtype} -> {dst.dtype}")
    hd, flat = (src, dst) if scatter else (dst, src)
    B, T, h, D = hd.shape
    if h != heads:
        raise ValueError(f"head partition: {hd.shape[2]} head slots for {heads} heads")
    s = _rows(src, 4 if scatter else 3)
    d = _rows(dst, 3 if scatter else 4)
    dots = None
    o = (0, 0, 0)
    if other is not None:
        if other.dtype != src.dtype or other.shape != dst.shape:
            raise ValueError("head partition: other must have dst's shape and dtype")
        o = _rows(other, dst.dim())
        dots = torch.empty(len(widths), dtype=torch.float64)
    _C.head_partition_cpu(
        bool(scatter), DTYPE_CODES[src.dtype], B, T, h * D, h, list(widths), list(coefs),
        src.data_ptr(), s[0], s[1], s[2] if scatter else 0,
        dst.data_ptr(), d[0], d[1], 0 if scatter else d[2], bool(accumulate),
        other.data_ptr() if other is not None else 0, o[0], o[1],
        (o[2] if not scatter else 0) if other is not None else 0,
        dots.data_ptr() if dots is not None else 0,
    )
    return dots


def mixed_layernorm_forward(x2d, widths, mix, eps, weight, bmix):
    """``x2d [N, E]`` (contiguous columns) -> ``(y [N, E], mu [N, K], rstd [N, K])`` of
    csrc/cpu/layernorm_mix_cpu.cpp (``weight``, ``bmix``: ``[E]`` or None)."""
    N, E = x2d.shape
    K = len(widths)
    y = torch.empty(N, E, dtype=x2d.dtype)
    mu = torch.empty(N, K, dtype=torch.float64)
    rstd = torch.empty(N, K, dtype=torch.float64)
    _C.mixed_layernorm_cpu(
        False, DTYPE_CODES[x2d.dtype], N, E, list(widths), list(mix), float(eps),
        x2d.data_ptr(), x2d.stride(0),
        weight.data_ptr() if weight is not None else 0,
        bmix.data_ptr() if bmix is not None else 0,
        y.data_ptr(), mu.data_ptr(), rstd.data_ptr(), 0, 0, 0, 0, 0, 0,
    )
    return y, mu, rstd


def mixed_layernorm_backward(g2d, x2d, widths, mix, weight, mu, rstd, *, want_w, want_b):
    """``(dx [N, E], dw [E] or None, d bmix [E] or None, d mix [K] float64)``."""
    N, E = x2d.shape
    dx = torch.empty(N, E, dtype=x2d.dtype)
    dw = torch.empty(E, dtype=x2d.dtype) if want_w else None
    db = torch.empty(E, dtype=x2d.dtype) if want_b else None
    dmix = torch.empty(len(widths), dtype=torch.float64)
    _C.mixed_layernorm_cpu(
        True, DTYPE_CODES[x2d.dtype], N, E, list(widths), list(mix), 0.0,
        x2d.data_ptr(), x2d.stride(0), weight.data_ptr() if weight is not None else 0, 0, 0,
        mu.data_ptr(), rstd.data_ptr(), g2d.data_ptr(), g2d.stride(0), dx.data_ptr(),
        dw.data_ptr() if dw is not None else 0, db.data_ptr() if db is not None else 0,
        dmix.data_ptr(),
    )
    return dx, dw, db, dmix


def head_scatter_multi(srcs, dst: torch.Tensor, heads, widths, coefs, *, accumulate: bool,
                       other: torch.Tensor | None = None):
    """The head-partition scatters of several head counts (``srcs[j] [B, T, h_j, D_j]``,
    ``widths[j]``, ``coefs[j]`` per candidate) into ONE ``dst [B, T, E]`` in one pass
    over its rows (csrc/cpu/head_partition_cpu.cpp); the first writes unless
    ``accumulate``. Returns per head count the dots with ``other`` (float64 ``[m_j]``)
    or None."""
    dt = dst.dtype
    if dt not in (torch.float32, torch.float64) or any(s.dtype != dt for s in srcs):
        raise ValueError(f"head partition: float32/float64, got {[s.dtype for s in srcs]} -> {dt}")
    B, T, E = dst.shape
    d = _rows(dst, 3)
    st = []
    for s, h in zip(srcs, heads):
        if s.shape != (B, T, h, E // h):
            raise ValueError(f"head partition: source of shape {tuple(s.shape)} for {h} heads, "
                             f"expected {(B, T, h, E // h)}")
        st.append(tuple(_rows(s, 4)[:3]))
    o = (0, 0)
    dots = None
    if other is not None:
        if other.dtype != dt or other.shape != dst.shape:
            raise ValueError("head partition: other must have dst's shape and dtype")
        o = _rows(other, 3)[:2]
        dots = torch.empty(sum(len(w) for w in widths), dtype=torch.float64)
    _C.head_scatter_multi_cpu(
        DTYPE_CODES[dt], B, T, E, [int(h) for h in heads], [list(w) for w in widths],
        [list(c) for c in coefs], [s.data_ptr() for s in srcs], st, dst.data_ptr(), d[0], d[1],
        bool(accumulate), other.data_ptr() if other is not None else 0, o[0], o[1],
        dots.data_ptr() if dots is not None else 0,
    )
    if dots is None:
        return None
    return list(torch.split(dots, [len(w) for w in widths]))

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


def head_gather_multi(srcs, dsts, heads, widths, coefs):
    """Several head-partition gathers (``srcs[g] [B, T, >=E_g]`` -> ``dsts[g] [B, T, h_g,
    D_g]``, strided, columns contiguous; each writes its dst) over the same rows in ONE
    pass (csrc/cpu/head_partition_cpu.cpp): every source row is read once for all."""
    entries = []
    B = T = None
    for s, d, h, w, c in zip(srcs, dsts, heads, widths, coefs):
        if s.dtype not in (torch.float32, torch.float64) or d.dtype != s.dtype:
            raise ValueError(f"head partition: float32/float64, got {s.dtype} -> {d.dtype}")
        Bd, Td, hd, Dd = d.shape
        if hd != h or s.shape[:2] != (Bd, Td) or (B is not None and (Bd, Td) != (B, T)):
            raise ValueError(f"head partition: gather {tuple(s.shape)} -> {tuple(d.shape)} for {h} heads "
                             "(all gathers over the same rows)")
        B, T = Bd, Td
        ss, ds = _rows(s, 3), _rows(d, 4)
        entries.append((h * Dd, int(h), list(w), list(c), s.data_ptr(), ss[0], ss[1],
                        d.data_ptr(), ds[0], ds[1], ds[2], False))
    if not entries:
        return
    dtype = srcs[0].dtype
    if any(s.dtype != dtype for s in srcs):
        raise ValueError("head partition: all gathers of one dtype")
    _C.head_gather_multi_cpu(DTYPE_CODES[dtype], B, T, entries)


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


# --- fused attention with dropout (csrc/cpu/attention_cpu.cpp) ---------------------------

_BLAS_STATE: list = []  # [] = not probed yet; [reason or None]


def _find_blas():
    """Addresses of the Fortran ``sgemm_`` / ``dgemm_`` that torch's CPU library links
    (MKL on x86 wheels, OpenBLAS elsewhere), or None."""
    import ctypes
    import os

    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    names = sorted(n for n in os.listdir(libdir) if n.startswith("libtorch_cpu")) if os.path.isdir(libdir) else []
    for name in names:
        try:
            lib = ctypes.CDLL(os.path.join(libdir, name))
            return (ctypes.cast(lib.sgemm_, ctypes.c_void_p).value,
                    ctypes.cast(lib.dgemm_, ctypes.c_void_p).value)
        except (OSError, AttributeError):
            continue
    return None


def attention_unavailable() -> str | None:
    """Why the fused CPU attention cannot run here (None when it can). Set
    ``TANGLE_FUSED_ATTENTION=0`` to turn it off."""
    import os

    if os.environ.get("TANGLE_FUSED_ATTENTION", "1") == "0":
        return "turned off by TANGLE_FUSED_ATTENTION=0"
    if _C is None or not hasattr(_C, "attention_forward_cpu"):
        return "tangle_kernels._C has no attention_forward_cpu (rebuild the extension)"
    if not _BLAS_STATE:
        addrs = _find_blas()
        if addrs is None or not all(addrs):
            _BLAS_STATE.append("torch's CPU library exports no sgemm_/dgemm_")
        else:
            _C.set_blas(*addrs)
            _BLAS_STATE.append(None)
    return _BLAS_STATE[0]


def _bhtd(t: torch.Tensor, what: str):
    if t.dim() != 4 or t.stride(-1) != 1:
        raise ValueError(f"attention: {what} must be [B, H, T, D] with a contiguous last dim, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")
    return (t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def _check_qkv(q, k, v):
    if q.dtype not in (torch.float32, torch.float64) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: float32/float64 q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != "cpu" or k.device.type != "cpu" or v.device.type != "cpu":
        raise ValueError("attention: CPU tensors only")
    B, H, Tq, D = q.shape
    if k.shape != (B, H, k.shape[2], D) or v.shape != k.shape:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not match (same B, H, D; k, v the same length)")
    return B, H, Tq, k.shape[2], D


def attention_forward(q, k, v, *, causal: bool, scale: float, dropout_p: float, seed: int,
                      out: torch.Tensor | None = None):
    """``q [B, H, Tq, D]``, ``k, v [B, H, Tk, D]`` (strided, last dim contiguous) ->
    ``(o [B, H, Tq, D], lse [B, H, Tq])``; ``out`` (a view) receives o when given."""
    why = attention_unavailable()
    if why:
        raise RuntimeError(f"fused attention unavailable: {why}")
    B, H, Tq, Tk, D = _check_qkv(q, k, v)
    o = out if out is not None else torch.empty(B, H, Tq, D, dtype=q.dtype)
    if o.shape != q.shape or o.dtype != q.dtype:
        raise ValueError("attention: out must have q's shape and dtype")
    lse = torch.empty(B, H, Tq, dtype=q.dtype)
    _C.attention_forward_cpu(DTYPE_CODES[q.dtype], B, H, Tq, Tk, D, bool(causal), float(scale),
                             float(dropout_p), int(seed) & (2**64 - 1), _bhtd(q, "q"),
                             _bhtd(k, "k"), _bhtd(v, "v"), _bhtd(o, "out"), lse.data_ptr())
    return o, lse


def attention_backward(g, q, k, v, o, lse, *, causal: bool, scale: float, dropout_p: float,
                       seed: int, dq=None, dk=None, dv=None):
    """The gradients ``(dq, dk, dv)`` of :func:`attention_forward` for ``g = dL/do``
    (the same seed regenerates the dropout mask); ``dq``/``dk``/``dv`` (views) receive
    them when given."""
    why = attention_unavailable()
    if why:
        raise RuntimeError(f"fused attention unavailable: {why}")
    B, H, Tq, Tk, D = _check_qkv(q, k, v)
    if g.shape != q.shape or o.shape != q.shape or lse.shape != (B, H, Tq) or not lse.is_contiguous():
        raise ValueError("attention: g, o must have q's shape and lse be contiguous [B, H, Tq]")
    dq = dq if dq is not None else torch.empty(B, H, Tq, D, dtype=q.dtype)
    dk = dk if dk is not None else torch.empty(B, H, Tk, D, dtype=q.dtype)
    dv = dv if dv is not None else torch.empty(B, H, Tk, D, dtype=q.dtype)
    _C.attention_backward_cpu(DTYPE_CODES[q.dtype], B, H, Tq, Tk, D, bool(causal), float(scale),
                              float(dropout_p), int(seed) & (2**64 - 1), _bhtd(q, "q"),
                              _bhtd(k, "k"), _bhtd(v, "v"), _bhtd(o, "o"), lse.data_ptr(),
                              _bhtd(g, "g"), _bhtd(dq, "dq"), _bhtd(dk, "dk"), _bhtd(dv, "dv"))
    return dq, dk, dv


def dropout_keep(seed: int, B: int, H: int, Tq: int, Tk: int, p: float) -> torch.Tensor:
    """The keep mask (bool ``[B, H, Tq, Tk]``) the fused attention draws for ``seed``."""
    out = torch.empty(B, H, Tq, Tk, dtype=torch.uint8)
    _C.dropout_keep_cpu(int(seed) & (2**64 - 1), B * H, Tq, Tk, float(p), out.data_ptr())
    return out.bool()

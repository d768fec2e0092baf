"""Head-partition gathers and scatters on CPU (csrc/cpu/head_partition_cpu.cpp), on
strided views with contiguous columns, in place; the math is in
tangle_kernels/ops/head_partition.py.

``widths``/``coefs``: per embedding candidate its head width ``d_i`` and coefficient.
A gather reads ``src [B, T, >=E]`` into ``dst [B, T, h, D]``; a scatter reads ``src [B,
T, h, D]`` into ``dst [B, T, E]``. With ``other`` (dst's shape and dtype) they also
return the per-candidate dots with it (float64).
"""

from __future__ import annotations

import torch

from ..._ext import DTYPE_CODES, _C


def why_unavailable() -> str | None:
    if not hasattr(_C, "head_gather_cpu"):
        return "tangle_kernels._C has no head_gather_cpu (rebuild the extension)"
    return None


def _rows(t: torch.Tensor, ndim: int):
    if t.dim() != ndim or t.stride(-1) != 1:
        raise ValueError(f"head partition: expected a {ndim}-D tensor with contiguous columns, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")
    return t.stride()


def _check_dtypes(srcs, dsts) -> None:
    dt = srcs[0].dtype
    if dt not in (torch.float32, torch.float64) or any(t.dtype != dt for t in (*srcs, *dsts)):
        raise ValueError(f"head partition: float32/float64 of one dtype, got "
                         f"{[t.dtype for t in srcs]} -> {[t.dtype for t in dsts]}")


def _call(fn, src, dst, hd, heads, widths, coefs, accumulate, other):
    _check_dtypes([src], [dst])
    B, T, h, D = hd.shape
    if h != heads:
        raise ValueError(f"head partition: {h} head slots for {heads} heads")
    dots = None
    o = ()
    if other is not None:
        if other.dtype != src.dtype or other.shape != dst.shape:
            raise ValueError("head partition: other must have dst's shape and dtype")
        o = tuple(_rows(other, dst.dim())[:dst.dim() - 1])
        dots = torch.empty(len(widths), dtype=torch.float64)
    fn(dtype=DTYPE_CODES[src.dtype], B=B, T=T, E=h * D, h=h, widths=list(widths),
       coefs=list(coefs), src=src.data_ptr(), src_strides=tuple(_rows(src, src.dim())[:src.dim() - 1]),
       dst=dst.data_ptr(), dst_strides=tuple(_rows(dst, dst.dim())[:dst.dim() - 1]),
       accumulate=bool(accumulate), other=other.data_ptr() if other is not None else 0,
       other_strides=o, dots=dots.data_ptr() if dots is not None else 0)
    return dots


def head_gather(src, dst, heads: int, widths, coefs, *, accumulate: bool = False, other=None):
    """``src [B, T, >=E] -> dst [B, T, h, D]``: slot ``(r, t)`` of head count ``h`` gets
    ``sum_i coefs[i] src[r d_i + t]`` (``t < d_i``). Returns the dots or None."""
    _rows(src, 3)
    _rows(dst, 4)
    return _call(_C.head_gather_cpu, src, dst, dst, heads, widths, coefs, accumulate, other)


def head_scatter(src, dst, heads: int, widths, coefs, *, accumulate: bool = False, other=None):
    """``src [B, T, h, D] -> dst [B, T, E]``, the transpose of :func:`head_gather`
    (``dst`` is written, or added to with ``accumulate``). Returns the dots or None."""
    _rows(src, 4)
    _rows(dst, 3)
    return _call(_C.head_scatter_cpu, src, dst, src, heads, widths, coefs, accumulate, other)


def head_gather_multi(srcs, dsts, heads, widths, coefs):
    """Several gathers (``srcs[g] [B, T, >=E_g]`` -> ``dsts[g] [B, T, h_g, D_g]``; each
    writes its dst) over the same rows in ONE pass: every source row is read once."""
    if not srcs:
        return
    _check_dtypes(list(srcs), list(dsts))
    entries = []
    B = T = None
    for s, d, h, w, c in zip(srcs, dsts, heads, widths, coefs):
        Bd, Td, hd, Dd = d.shape
        if hd != h or s.shape[:2] != (Bd, Td) or (B is not None and (Bd, Td) != (B, T)):
            raise ValueError(f"head partition: gather {tuple(s.shape)} -> {tuple(d.shape)} for {h} heads "
                             "(all gathers over the same rows)")
        B, T = Bd, Td
        ss, ds = _rows(s, 3), _rows(d, 4)
        entries.append((h * Dd, int(h), list(w), list(c), s.data_ptr(), ss[0], ss[1],
                        d.data_ptr(), ds[0], ds[1], ds[2], False))
    _C.head_gather_multi_cpu(dtype=DTYPE_CODES[srcs[0].dtype], B=B, T=T, gathers=entries)


def head_scatter_multi(srcs, dst: torch.Tensor, heads, widths, coefs, *, accumulate: bool,
                       other: torch.Tensor | None = None):
    """The scatters of several head counts (``srcs[j] [B, T, h_j, D_j]``, ``widths[j]``,
    ``coefs[j]`` per candidate) into ONE ``dst [B, T, E]`` in one pass over its rows;
    the first writes unless ``accumulate``. Returns per head count the dots with
    ``other`` (float64 ``[m_j]``) or None."""
    _check_dtypes(list(srcs), [dst])
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
        if other.dtype != dst.dtype or other.shape != dst.shape:
            raise ValueError("head partition: other must have dst's shape and dtype")
        o = _rows(other, 3)[:2]
        dots = torch.empty(sum(len(w) for w in widths), dtype=torch.float64)
    _C.head_scatter_multi_cpu(
        dtype=DTYPE_CODES[dst.dtype], B=B, T=T, E=E, heads=[int(h) for h in heads],
        widths=[list(w) for w in widths], coefs=[list(c) for c in coefs],
        srcs=[s.data_ptr() for s in srcs], src_strides=st, dst=dst.data_ptr(), d_sB=d[0],
        d_sT=d[1], accumulate=bool(accumulate), other=other.data_ptr() if other is not None else 0,
        o_sB=o[0], o_sT=o[1], dots=dots.data_ptr() if dots is not None else 0,
    )
    if dots is None:
        return None
    return list(torch.split(dots, [len(w) for w in widths]))

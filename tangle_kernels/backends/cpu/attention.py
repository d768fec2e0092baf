"""Fused scaled-dot-product attention with dropout on CPU (csrc/cpu/attention_cpu.cpp);
the math is in tangle_kernels/ops/attention.py. Its block matmuls call the BLAS that
torch's CPU library links (``sgemm_``/``dgemm_``), found here once."""

from __future__ import annotations

import os

import torch

from ..._ext import DTYPE_CODES, _C

ENV = "TANGLE_FUSED_ATTENTION"  # "0": turned off
_BLAS_STATE: list = []  # [] = not probed yet; [reason or None]


def _find_blas():
    """Addresses of the Fortran ``sgemm_`` / ``dgemm_`` that torch's CPU library links
    (MKL on x86 wheels, OpenBLAS elsewhere), or None."""
    import ctypes

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


def why_unavailable() -> str | None:
    """Why the fused CPU attention cannot run here (None when it can). Set
    ``TANGLE_FUSED_ATTENTION=0`` to turn it off."""
    if os.environ.get(ENV, "1") == "0":
        return f"turned off by {ENV}=0"
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


def _require():
    why = why_unavailable()
    if why:
        raise RuntimeError(f"fused attention unavailable: {why}")


def _common(q, k, v, causal, scale, dropout_p, seed):
    B, H, Tq, Tk, D = _check_qkv(q, k, v)
    return dict(dtype=DTYPE_CODES[q.dtype], B=B, H=H, Tq=Tq, Tk=Tk, D=D, causal=bool(causal),
                scale=float(scale), dropout_p=float(dropout_p), seed=int(seed) & (2**64 - 1),
                q=_bhtd(q, "q"), k=_bhtd(k, "k"), v=_bhtd(v, "v"))


def forward(q, k, v, *, causal: bool, scale: float, dropout_p: float, seed: int,
            out: torch.Tensor | None = None):
    """``q [B, H, Tq, D]``, ``k, v [B, H, Tk, D]`` (strided, last dim contiguous) ->
    ``(o [B, H, Tq, D], lse [B, H, Tq])``; ``out`` (a view) receives o when given."""
    _require()
    args = _common(q, k, v, causal, scale, dropout_p, seed)
    B, H, Tq, D = q.shape
    o = out if out is not None else torch.empty(B, H, Tq, D, dtype=q.dtype)
    if o.shape != q.shape or o.dtype != q.dtype:
        raise ValueError("attention: out must have q's shape and dtype")
    lse = torch.empty(B, H, Tq, dtype=q.dtype)
    _C.attention_forward_cpu(**args, o=_bhtd(o, "out"), lse=lse.data_ptr())
    return o, lse


def backward(g, q, k, v, o, lse, *, causal: bool, scale: float, dropout_p: float, seed: int,
             dq=None, dk=None, dv=None):
    """The gradients ``(dq, dk, dv)`` of :func:`forward` for ``g = dL/do`` (the same seed
    regenerates the dropout mask); ``dq``/``dk``/``dv`` (views) receive them when given."""
    _require()
    args = _common(q, k, v, causal, scale, dropout_p, seed)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if g.shape != q.shape or o.shape != q.shape or lse.shape != (B, H, Tq) or not lse.is_contiguous():
        raise ValueError("attention: g, o must have q's shape and lse be contiguous [B, H, Tq]")
    dq = dq if dq is not None else torch.empty(B, H, Tq, D, dtype=q.dtype)
    dk = dk if dk is not None else torch.empty(B, H, Tk, D, dtype=q.dtype)
    dv = dv if dv is not None else torch.empty(B, H, Tk, D, dtype=q.dtype)
    _C.attention_backward_cpu(**args, o=_bhtd(o, "o"), lse=lse.data_ptr(), g=_bhtd(g, "g"),
                              dq=_bhtd(dq, "dq"), dk=_bhtd(dk, "dk"), dv=_bhtd(dv, "dv"))
    return dq, dk, dv


def dropout_keep(seed: int, B: int, H: int, Tq: int, Tk: int, p: float) -> torch.Tensor:
    """The keep mask (bool ``[B, H, Tq, Tk]``) the fused attention draws for ``seed``."""
    out = torch.empty(B, H, Tq, Tk, dtype=torch.uint8)
    _C.dropout_keep_cpu(seed=int(seed) & (2**64 - 1), BH=B * H, Tq=Tq, Tk=Tk, p=float(p),
                        out=out.data_ptr())
    return out.bool()

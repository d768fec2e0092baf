"""The superposed LayerNorm of :class:`~tangle_kernels.nn.EntangledLayerNorm` as one
autograd node on CPU (C++ kernels, csrc/cpu/layernorm_mix_cpu.cpp).

Candidate ``k`` normalises its own prefix ``x[..., :c_k]``; the soft forward is::

    y = sum_k mix_k * pad(layer_norm(x[..., :c_k], w[:c_k], 0)) + b_mix
      = w * (x * A[seg] - Bv[seg]) + b_mix

with per row and segment ``A = sum_k mix_k rstd_k``, ``Bv = sum_k mix_k mu_k rstd_k``
(``b_mix`` is the superposed bias, computed by the caller with :func:`superpose`). The
kernel reads each row once into cache, forms the K candidates' statistics from it and
writes ``y``; the backward does the same for ``dx``, with the column sums ``dw``, ``d
b_mix`` and the candidate sums ``d mix`` reduced in fixed chunks (bitwise deterministic
for any thread count). The torch composition of ``EntangledLayerNorm.mixed_xhat`` is
the path elsewhere (CUDA, half precision, autocast, torch.compile) and the oracle.
"""

from __future__ import annotations

import torch

__all__ = ["mixed_layer_norm", "fused_available"]


def fused_available(x: torch.Tensor) -> bool:
    """Whether the one-node CPU kernel path can take ``x``."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    from .._ext import _C

    return _C is not None and hasattr(_C, "mixed_layernorm_cpu")


class _MixedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bmix, mix, widths, eps):
        from ..backends.cpu import mixed_layernorm_forward

        E = x.shape[-1]
        x2 = x.reshape(-1, E)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        w = weight.detach().to(x.dtype).contiguous() if weight is not None else None
        b = bmix.detach().to(x.dtype).contiguous() if bmix is not None else None
        m = mix.detach().double().tolist()
        y, mu, rstd = mixed_layernorm_forward(x2, widths, m, eps, w, b)
        ctx.widths, ctx.m, ctx.shape = widths, m, x.shape
        ctx.dtypes = (weight.dtype if weight is not None else None,
                      bmix.dtype if bmix is not None else None, mix.dtype)
        ctx.has_w, ctx.has_b = weight is not None, bmix is not None
        ctx.save_for_backward(x2, w if w is not None else x2.new_empty(0), mu, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, g):
        from ..backends.cpu import mixed_layernorm_backward

        x2, w, mu, rstd = ctx.saved_tensors
        w = w if ctx.has_w else None
        E = x2.shape[-1]
        g2 = g.reshape(-1, E)
        if g2.stride(-1) != 1:
            g2 = g2.contiguous()
        need = ctx.needs_input_grad
        dx, dw, db, dmix = mixed_layernorm_backward(
            g2, x2, ctx.widths, ctx.m, w, mu, rstd,
            want_w=bool(ctx.has_w and need[1]), want_b=bool(ctx.has_b and need[2]),
        )
        wdt, bdt, mdt = ctx.dtypes
        return (
            dx.view(ctx.shape) if need[0] else None,
            dw.to(wdt) if dw is not None else None,
            db.to(bdt) if db is not None else None,
            dmix.to(mdt) if need[3] else None,
            None,
            None,
        )


def mixed_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bmix: torch.Tensor | None,
                     mix: torch.Tensor, widths, eps: float) -> torch.Tensor:
    """``x [..., E]`` -> the superposed LayerNorm (module docstring); ``widths[k]`` is
    candidate ``k``'s prefix width, ``mix [K]`` its weight. CPU float32/float64 only
    (see :func:`fused_available`)."""
    return _MixedLayerNorm.apply(x, weight, bmix, mix, tuple(int(c) for c in widths), float(eps))

"""The superposed LayerNorm of :class:`~tangle_kernels.nn.EntangledLayerNorm`: the op
:func:`entangled_layer_norm` and its routing; on CPU one autograd node of C++ kernels
(backends/cpu/layernorm.py, csrc/cpu/layernorm_mix_cpu.cpp).

Candidate ``k`` normalises its own prefix ``x[..., :c_k]``; the soft forward is::

    y = sum_k mix_k * pad(layer_norm(x[..., :c_k], w[:c_k], 0)) + b_mix
      = w * (x * A[seg] - Bv[seg]) + b_mix

with per row and segment ``A = sum_k mix_k rstd_k``, ``Bv = sum_k mix_k mu_k rstd_k``
(``b_mix`` is the superposed bias, computed by the caller with :func:`superpose`). The
kernel reads each row once into cache, forms the K candidates' statistics from it and
writes ``y``; the backward does the same for ``dx``, with the column sums ``dw``, ``d
b_mix`` and the candidate sums ``d mix`` reduced in fixed chunks (bitwise deterministic
for any thread count). The torch composition
(:func:`~tangle_kernels.backends.reference.mixed_layernorm_reference`) is the path
elsewhere (CUDA, half precision, autocast, torch.compile) and the oracle.

Second order: when a graph is requested the node differentiates that composition
(twice differentiable, the composition's second derivatives).
"""

from __future__ import annotations

import torch

from .. import backends
from ..backends.reference import mixed_layernorm_reference, mixed_xhat
from ..layout import Layout
from ._autograd import graph_backward, refuse_functorch
from .superpose import superpose

__all__ = ["entangled_layer_norm", "mixed_layer_norm", "fused_available"]


def fused_available(x: torch.Tensor) -> bool:
    """Whether the one-node CPU kernel path can take ``x``."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    return backends.resolve("layernorm", None, x.device) == "cpu"


_LAYOUTS: dict = {}


def _prefix_layout(E: int, widths: tuple[int, ...]) -> Layout:
    """The 1-D layout of the prefixes ``[0, c_k)`` (cached)."""
    key = (E, widths)
    lay = _LAYOUTS.get(key)
    if lay is None:
        lay = _LAYOUTS[key] = Layout((E,), [[(0, c)] for c in widths])
    return lay


class _MixedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bmix, mix, widths, eps):
        from ..backends.cpu.layernorm import forward as mixed_layernorm_forward

        E = x.shape[-1]
        x2 = x.reshape(-1, E)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        w = weight.detach().to(x.dtype).contiguous() if weight is not None else None
        b = bmix.detach().to(x.dtype).contiguous() if bmix is not None else None
        m = mix.detach().double().tolist()
        y, mu, rstd = mixed_layernorm_forward(x2, widths, m, eps, w, b)
        ctx.widths, ctx.m, ctx.shape, ctx.eps = widths, m, x.shape, eps
        ctx.dtypes = (weight.dtype if weight is not None else None,
                      bmix.dtype if bmix is not None else None, mix.dtype)
        ctx.has_w, ctx.has_b = weight is not None, bmix is not None
        ctx.save_for_backward(x2, w if w is not None else x2.new_empty(0), mu, rstd, x, weight,
                              bmix, mix)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, g):
        from ..backends.cpu.layernorm import backward as mixed_layernorm_backward

        x2, w, mu, rstd, x, weight, bmix, mix = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph is requested: differentiate the composition
            lay = _prefix_layout(x.shape[-1], ctx.widths)

            def fn(x, weight, bmix, mix):
                y = mixed_xhat(x, mix, lay, ctx.eps)
                y = y * weight if weight is not None else y
                return y + bmix if bmix is not None else y

            return (*graph_backward(fn, (x, weight, bmix, mix), ctx.needs_input_grad[:4], (g,)),
                    None, None)
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
    """The CPU node: ``x [..., E]`` -> the superposed LayerNorm (module docstring) with
    the superposed bias ``bmix`` given; ``widths[k]`` is candidate ``k``'s prefix width,
    ``mix [K]`` its weight. CPU float32/float64 only (see :func:`fused_available`)."""
    refuse_functorch("mixed_layer_norm", "cpu", x, weight, bmix, mix)
    return _MixedLayerNorm.apply(x, weight, bmix, mix, tuple(int(c) for c in widths), float(eps))


def entangled_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         mix: torch.Tensor, layout: Layout, eps: float) -> torch.Tensor:
    """``sum_k mix_k * pad(layer_norm(x[..., :c_k], w[:c_k], b[:c_k]))`` for the 1-D
    prefix ``layout`` of the widths ``c_k``: the CPU node where it can run
    (:func:`fused_available`), the composition
    (:func:`~tangle_kernels.backends.reference.mixed_layernorm_reference`, its bias
    by :func:`superpose`) elsewhere."""
    if fused_available(x):
        bmix = superpose(bias, mix, layout) if bias is not None else None
        widths = [hi for ((lo, hi),) in layout.boxes]
        return mixed_layer_norm(x, weight, bmix, mix, widths, eps)
    y = mixed_layernorm_reference(x, weight, None, mix, layout, eps)
    return y + superpose(bias, mix, layout) if bias is not None else y

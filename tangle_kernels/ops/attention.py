"""Fused scaled-dot-product attention with dropout on CPU: one autograd node that keeps
only the output and the row log-sum-exp, and regenerates its dropout mask in backward.

For ``q [B, H, Tq, D]``, ``k, v [B, H, Tk, D]``, scale ``s``, dropout probability ``p``
and a keep mask ``z`` (``P(z_ij = 0) = p``; causal: query ``i`` sees keys ``j <= i``)::

    O = (softmax(s q k^T + causal mask) * z / (1 - p)) v

which is ``torch.nn.functional.scaled_dot_product_attention`` with ``dropout_p=p`` up to
the dropout mask's random stream: the mask here is a counter-based hash of a seed drawn
from torch's default CPU generator (so ``torch.manual_seed`` makes it repeatable) and of
the position (batch * head, i, j); :func:`dropout_keep_mask` returns it, and
:func:`attention_reference` is the plain-torch oracle under a given mask.

Why it exists: torch has no CPU flash kernel with dropout, so its CPU attention with
dropout materialises and keeps the scores, probabilities, mask and dropped
probabilities of every call and draws the mask with ``aten::bernoulli_``; in the nanoGPT
supernet (one call per head count, the paper's Tiny Shakespeare preset has attention
dropout 0.2) that was most of the step's attention time and its memory above the
plain model. The kernel (csrc/cpu/attention_cpu.cpp) runs its block matmuls on the BLAS
torch links (``sgemm_``/``dgemm_``); where that is not found, or
``TANGLE_FUSED_ATTENTION=0``, :func:`fused_attention_available` says why and callers
keep torch's attention.

Second order: when a graph is requested the node differentiates
:func:`~tangle_kernels.backends.reference.attention_reference` under the same keep mask
(regenerated from the seed): twice differentiable, the reference's second derivatives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backends
from ..backends import cpu as _cpu
from ..backends.reference import attention_reference
from ._autograd import graph_backward, refuse_functorch

__all__ = ["fused_attention", "fused_attention_available", "attention_reference",
           "dropout_keep_mask", "draw_seed", "attention"]


def fused_attention_available() -> str | None:
    """None when the fused CPU attention can run, else the reason it cannot."""
    return backends.why_unavailable("attention", "cpu", torch.device("cpu"))


def draw_seed() -> int:
    """A 63-bit dropout seed from torch's default CPU generator."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def dropout_keep_mask(seed: int, B: int, H: int, Tq: int, Tk: int, p: float) -> torch.Tensor:
    """The keep mask (bool ``[B, H, Tq, Tk]``) of a call with this seed and ``p``."""
    return _cpu.dropout_keep(seed, B, H, Tq, Tk, p)


def _composition(causal, scale, p, seed):
    """The node's math under its keep mask, as a differentiable function of q, k, v."""
    def fn(q, k, v):
        keep = None
        if p > 0.0:
            B, H, Tq, _ = q.shape
            keep = dropout_keep_mask(seed, B, H, Tq, k.shape[2], p)
        return attention_reference(q, k, v, causal=causal, scale=scale, dropout_p=p, keep=keep)
    return fn


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, dropout_p, seed):
        o, lse = _cpu.attention_forward(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p,
                                        seed=seed)
        ctx.cfg = (causal, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, g):
        causal, scale, p, seed = ctx.cfg
        q, k, v, o, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph is requested: differentiate the reference
            grads = graph_backward(_composition(causal, scale, p, seed), (q, k, v),
                                   ctx.needs_input_grad[:3], (g,))
            return (*grads, None, None, None, None)
        if g.stride(-1) != 1:
            g = g.contiguous()
        dq, dk, dv = _cpu.attention_backward(g, q, k, v, o, lse, causal=causal, scale=scale,
                                             dropout_p=p, seed=seed)
        return dq, dk, dv, None, None, None, None


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, dropout_p: float = 0.0,
                    seed: int | None = None) -> torch.Tensor:
    """``q [B, H, Tq, D]``, ``k, v [B, H, Tk, D]`` (CPU, float32/float64, any strides with
    a contiguous last dim) -> ``[B, H, Tq, D]``; ``seed`` (default: drawn from torch's
    generator) fixes the dropout mask. Raises when the kernel is unavailable (see
    :func:`fused_attention_available`). Eager mode only: :func:`attention` routes to it
    where it pays and to torch's ``scaled_dot_product_attention`` elsewhere (CUDA, half
    precision, autocast, under ``torch.compile``)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, T, D], got {q.dim()}, {k.dim()}, {v.dim()}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if seed is None:
        seed = draw_seed() if dropout_p > 0.0 else 0
    refuse_functorch("fused_attention", "cpu", q, k, v)
    return _FusedAttention.apply(q, k, v, bool(causal), s, float(dropout_p), int(seed))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` routed: the fused kernel where it pays (CPU
    float32/float64 with dropout, eager, no autocast, the kernel available: torch's CPU
    attention with dropout is its math path), torch's own everywhere else."""
    if (dropout_p > 0.0 and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
            and k.dtype == q.dtype and v.dtype == q.dtype and q.dim() == 4
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and fused_attention_available() is None):
        return fused_attention(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)

"""Every op's oracle, in plain differentiable PyTorch: the ground truth every backend
is tested against, the baseline every benchmark compares to, and the route of each op
where it has no kernel (``backend="reference"``).

- :func:`superpose_reference`: the padded sum of the TangleNAS seed code, ``W_mix =
  sum_k mix_k * pad(slice_k(W))`` (one padded temporary and one multiply-add per
  candidate; autograd keeps about K more); :func:`superpose_masksum` the dense-mask
  form other NAS libraries use.
- :func:`mixed_xhat` / :func:`mixed_layernorm_reference`: the superposed LayerNorm.
- :func:`attention_reference`: attention under a given dropout keep mask.
- :func:`partition_attention_reference`: the head-partition attention.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..layout import Layout


def _pad_args(box, shape):
    # F.pad takes (left, right) pairs starting from the LAST dimension.
    pads = []
    for (lo, hi), size in zip(reversed(box), reversed(shape)):
        pads += [lo, size - hi]
    return pads


def superpose_reference(weight: torch.Tensor, mix: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``sum_k mix_k * pad(slice_k(W))`` exactly as the seed code builds it."""
    out = None
    for box, k in zip(layout.boxes, layout.owners):
        sl = weight[tuple(slice(lo, hi) for lo, hi in box)]
        term = mix[k].to(weight.dtype) * F.pad(sl, _pad_args(box, layout.shape))
        out = term if out is None else out + term
    return out


def superpose_masksum(weight: torch.Tensor, mix: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The mask-sum formulation other NAS libraries use: one dense 0/1 mask per
    candidate, ``W * sum_k mix_k * mask_k`` (K weight-sized masks kept alive)."""
    masks = _dense_masks(layout, weight.device, weight.dtype)
    M = (masks * mix.to(weight.dtype).view(-1, *([1] * weight.dim()))).sum(0)
    return weight * M


_MASK_CACHE: dict = {}


def _dense_masks(layout: Layout, device, dtype) -> torch.Tensor:
    key = (layout, str(device), dtype)
    m = _MASK_CACHE.get(key)
    if m is None:
        m = torch.zeros((layout.K, *layout.shape), device=device, dtype=dtype)
        for box, k in zip(layout.boxes, layout.owners):
            m[(k, *[slice(lo, hi) for lo, hi in box])] = 1
        if len(_MASK_CACHE) > 64:
            _MASK_CACHE.clear()
        _MASK_CACHE[key] = m
    return m


# ------------------------------------------------------------------ layer norm
def mixed_xhat(x: torch.Tensor, mix: torch.Tensor, layout: Layout, eps: float) -> torch.Tensor:
    """``xhat_mix = sum_k mix_k pad((x[..., :c_k] - mu_k) rstd_k)`` in the dtype of x, for
    the 1-D prefix ``layout`` of the widths ``c_k`` (see ops/mixed_layernorm.py).

    The per-candidate statistics come from prefix sums over the layout's segments of
    ``x - s`` and ``(x - s)^2``: one pass over ``x`` for all K candidates. The shift
    ``s`` (the row mean over the smallest candidate, detached: the variance formula is
    exact for any constant shift) avoids the cancellation of ``E[x^2] - E[x]^2``.
    Statistics in float32 for half inputs."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    cuts = layout.cuts[0]
    widths = [hi for ((lo, hi),) in layout.boxes]
    xs = x.to(cdt)
    shift = xs[..., : min(widths)].mean(-1, keepdim=True).detach()
    xs = xs - shift
    segs = [(cuts[j], cuts[j + 1]) for j in range(len(cuts) - 1)]
    s1 = torch.stack([xs[..., lo:hi].sum(-1) for lo, hi in segs], -1)
    s2 = torch.stack([xs[..., lo:hi].pow(2).sum(-1) for lo, hi in segs], -1)
    tabs = layout.tables(x.device)
    end = tabs["end_seg"]  # candidate k's prefix ends after segment end[k]
    c = (tabs["box_hi64"] if cdt == torch.float64 else tabs["box_hi32"])
    p1 = s1.cumsum(-1).index_select(-1, end)  # [..., K] prefix sums per candidate
    p2 = s2.cumsum(-1).index_select(-1, end)
    mu = p1 / c
    var = (p2 / c - mu * mu).clamp_min(0)
    rstd = torch.rsqrt(var + eps)
    m = mix.to(cdt)
    Bt = (tabs["B64"] if cdt == torch.float64 else tabs["B32"]).t()  # [K, nseg]
    A = (m * rstd) @ Bt  # [..., nseg]
    Bv = (m * mu * rstd) @ Bt
    seg = tabs["colgrp_l"]
    xhat = xs * A.index_select(-1, seg) - Bv.index_select(-1, seg)
    return xhat.to(x.dtype)


def mixed_layernorm_reference(x, weight, bias, mix, layout: Layout, eps: float) -> torch.Tensor:
    """``sum_k mix_k pad(layer_norm(x[..., :c_k], w[:c_k], b[:c_k])) = w * xhat_mix +
    superpose(b, mix)`` (bias superposed by the padded sum)."""
    y = mixed_xhat(x, mix, layout, eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + superpose_reference(bias, mix, layout)
    return y


# ------------------------------------------------------------------ attention
def attention_reference(q, k, v, *, causal: bool = False, scale: float | None = None,
                        dropout_p: float = 0.0, keep: torch.Tensor | None = None):
    """``(softmax(s q k^T + causal mask) * keep / (1 - p)) v``: ``keep`` is the dropout
    keep mask (bool ``[B, H, Tq, Tk]``, needed when ``dropout_p > 0``)."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    att = (q @ k.transpose(-1, -2)) * s
    if causal:
        Tq, Tk = att.shape[-2:]
        m = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
        att = att.masked_fill(~m, float("-inf"))
    att = torch.softmax(att, dim=-1)
    if dropout_p > 0.0:
        att = att * keep.to(att.dtype) / (1.0 - dropout_p)
    return att @ v


def partition_gather_reference(qkv, a, plan) -> list[torch.Tensor]:
    """``[Q_1, K_1, V_1, Q_2, ...]`` (each ``[B, T, h_j, D_j]``): ``Q_j = sum_i a_i
    d_ij^(-1/2) G_ij(q)``, ``K_j = sum_i a_i G_ij(k)``, ``V_j = sum_i a_i G_ij(v)`` with
    the zero-padding gathers ``G_ij`` (ops/head_partition.py)."""
    B, T, _ = qkv.shape
    E = plan.E
    X = qkv.view(B, T, 3, E)
    out = []
    for h in plan.heads:
        D = E // h
        parts = [None, None, None]
        for i, e in enumerate(plan.embeds):
            d = e // h
            src = F.pad(X[..., :e].view(B, T, 3, h, d), (0, D - d))
            for p in range(3):
                t = src[:, :, p] * (a[i] * (d ** -0.5 if p == 0 else 1.0)).to(qkv.dtype)
                parts[p] = t if parts[p] is None else parts[p] + t
        out += parts
    return out


def partition_scatter_reference(a, b, plan, outs) -> torch.Tensor:
    """``y = sum_j b_j sum_i a_i G_ij^T(O_j)`` for ``outs[j] = O_j [B, T, h_j, D_j]``."""
    B, T = outs[0].shape[:2]
    E = plan.E
    y = None
    for j, (h, o) in enumerate(zip(plan.heads, outs)):
        for i, e in enumerate(plan.embeds):
            d = e // h
            t = o[..., :d].reshape(B, T, e) * (b[j] * a[i]).to(o.dtype)
            t = F.pad(t, (0, E - e))
            y = t if y is None else y + t
    return y


def partition_attention_reference(qkv, a, b, plan, *, causal: bool = True,
                                  dropout_p: float = 0.0,
                                  attend: Callable | None = None) -> torch.Tensor:
    """The head-partition attention (ops/head_partition.py) with zero padding and
    ``scaled_dot_product_attention``: ``qkv [B, T, 3 E]``, ``a [m]``, ``b [n]``, a
    ``PartitionPlan``. ``attend(j, q, k, v)`` (``[B, h_j, T, D_j]``, q pre-scaled)
    replaces head count ``j``'s attention call (the tests pass one with the fused
    kernel's dropout masks)."""
    g = partition_gather_reference(qkv, a, plan)
    outs = []
    for j in range(len(plan.heads)):
        q, k, v = (t.transpose(1, 2) for t in g[3 * j:3 * j + 3])
        if attend is not None:
            o = attend(j, q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                               scale=1.0)
        outs.append(o.transpose(1, 2))  # [B, T, h, D]
    return partition_scatter_reference(a, b, plan, outs)

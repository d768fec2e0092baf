"""The autograd nodes of the head-partition attention on CPU (ops/head_partition.py has
the math and the routing): the whole op as one node (:class:`PartitionAttention`), and
the gather and scatter nodes around torch's attention calls with dropout. Their kernels
are backends/cpu/head_partition.py (and the fused attention, backends/cpu/attention.py).

Every node returns gradients without a graph from its kernels; when a graph is
requested it differentiates its reference composition instead (backends/reference.py,
under the same dropout masks): twice differentiable, the reference's second
derivatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import cpu as _cpu
from ..backends.reference import (
    attention_reference,
    partition_attention_reference,
    partition_gather_reference,
    partition_scatter_reference,
)
from . import head_partition as hp
from ._autograd import graph_backward
from .attention import draw_seed, dropout_keep_mask


def _widths(plan, j: int) -> list[int]:
    return [e // plan.heads[j] for e in plan.embeds]


def _coefs(plan, j: int, av: list[float]) -> list[list[float]]:
    """Per q | k | v part the gather coefficients ``a_i s_pi`` of head count ``j`` (``s``:
    ``d_ij^(-1/2)`` for q, 1 for k and v)."""
    w = _widths(plan, j)
    return [[ai * (wi ** -0.5 if p == 0 else 1.0) for ai, wi in zip(av, w)] for p in range(3)]


# The d a / d b accumulation, written once. The coefficient of candidate i in head count
# j's scatter is b_j a_i (y = sum_j b_j sum_i a_i G_ij^T(O_j)), in its part-p gather
# a_i s_pij; the kernels return the dots of each coefficient's term with the upstream
# gradient.
def scatter_dots(da: list, db: list, dots: torch.Tensor, av: list, bv: list, j: int) -> None:
    """Add the scatter dots of head count ``j`` (per candidate i) to ``d a`` and ``d b``."""
    for i, v in enumerate(dots.tolist()):
        db[j] += v * av[i]
        da[i] += v * bv[j]


def gather_dots(da: list, dots: torch.Tensor, widths: list, p: int) -> None:
    """Add the part-``p`` gather dots of one head count (per candidate i) to ``d a``."""
    for i, v in enumerate(dots.tolist()):
        da[i] += v * (widths[i] ** -0.5 if p == 0 else 1.0)


def _as_tensor(vals, like: torch.Tensor):
    return None if vals is None else torch.tensor(vals, dtype=like.dtype)


def graph_grads(qkv, a, b, plan, causal: bool, dropout_p: float, seeds, dy, needs):
    """``(dqkv, d a, d b)`` with their graph: the reference composition under the fused
    kernel's dropout masks (``seeds``), differentiated with ``create_graph=True``."""
    def attend(j, q, k, v):
        keep = None
        if dropout_p > 0.0:
            B, H, T, _ = q.shape
            keep = dropout_keep_mask(seeds[j], B, H, T, k.shape[2], dropout_p)
        return attention_reference(q, k, v, causal=causal, scale=1.0, dropout_p=dropout_p,
                                   keep=keep)

    def fn(qkv, a, b):
        return partition_attention_reference(qkv, a, b, plan, causal=causal, attend=attend)

    return graph_backward(fn, (qkv, a, b), needs, (dy,))


def node_forward(qkv, a, b, plan: hp.PartitionPlan, causal: bool, dropout_p: float, seeds):
    """The CPU node's forward: per head count the gather of q | k | v (C++ kernel, one
    pass), one attention call (torch's flash kernel without dropout; the fused kernel
    with dropout, its mask from ``seeds[j]``), the scatter of its output into ``y``.
    Returns ``(y, outs, lses)``: each call's output ``[B, T, h, D]`` (contiguous) and
    log-sum-exp ``[B, h, T]``."""
    B, T, _ = qkv.shape
    E = plan.E
    X = qkv.view(B, T, 3, E)
    av, bv = a.detach().double().tolist(), b.detach().double().tolist()
    y = qkv.new_empty(B, T, E)
    outs, lses = [], []
    parts = [X[:, :, p] for p in range(3)]
    for j, h in enumerate(plan.heads):
        w = _widths(plan, j)
        G = qkv.new_empty(B, T, 3, h, E // h)
        _cpu.head_gather_multi(parts, [G[:, :, p] for p in range(3)], [h] * 3, [w] * 3,
                          _coefs(plan, j, av))  # q | k | v of each row in one pass
        q, k, v = (G[:, :, p].transpose(1, 2) for p in range(3))
        if dropout_p > 0.0:  # the fused kernel (its mask from a seed per call)
            o = qkv.new_empty(B, T, h, E // h)
            _, lse = _cpu.attention_forward(q, k, v, causal=causal, scale=1.0, dropout_p=dropout_p,
                                       seed=seeds[j], out=o.transpose(1, 2))
        else:
            o, lse = hp._FLASH(q, k, v, 0.0, causal, scale=1.0)
            o = o.transpose(1, 2)
            if not o.is_contiguous():
                o = o.contiguous()
            lse = lse.contiguous()
        _cpu.head_scatter(o, y, h, w, [bv[j] * ai for ai in av], accumulate=j > 0)
        outs.append(o)
        lses.append(lse)
    return y, outs, lses


def node_backward(dy, qkv, a, b, plan: hp.PartitionPlan, causal: bool, dropout_p: float, seeds,
                   outs, lses, need_a: bool, need_b: bool):
    """The CPU node's backward: ``(dqkv, d a as floats or None, d b or None)``; recomputes
    the gathers (and the dropout masks from the seeds)."""
    nh = len(plan.heads)
    B, T, _ = qkv.shape
    E = plan.E
    X = qkv.view(B, T, 3, E)
    av, bv = a.detach().double().tolist(), b.detach().double().tolist()
    need = need_a or need_b
    da = [0.0] * len(av)
    db = [0.0] * nh
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dX = qkv.new_empty(B, T, 3, E)
    dGs = []
    parts = [X[:, :, p] for p in range(3)]
    widths = [_widths(plan, j) for j in range(nh)]
    coefs = [_coefs(plan, j, av) for j in range(nh)]  # [j][part][candidate]
    for j, h in enumerate(plan.heads):
        w = widths[j]
        D = E // h
        G = qkv.new_empty(B, T, 3, h, D)
        _cpu.head_gather_multi(parts, [G[:, :, p] for p in range(3)], [h] * 3, [w] * 3, coefs[j])
        q, k, v = (G[:, :, p].transpose(1, 2) for p in range(3))
        o, lse = outs[j], lses[j]  # o: [B, T, h, D]
        dO = qkv.new_empty(B, T, h, D)
        dc = _cpu.head_gather(dy, dO, h, w, [bv[j] * ai for ai in av],
                              other=o if need else None)
        if need:
            scatter_dots(da, db, dc, av, bv, j)
        if dropout_p > 0.0:
            dG = qkv.new_empty(B, T, 3, h, D)
            grads = _cpu.attention_backward(dO.transpose(1, 2), q, k, v, o.transpose(1, 2), lse,
                                       causal=causal, scale=1.0, dropout_p=dropout_p,
                                       seed=seeds[j], dq=dG[:, :, 0].transpose(1, 2),
                                       dk=dG[:, :, 1].transpose(1, 2),
                                       dv=dG[:, :, 2].transpose(1, 2))
        else:
            grads = hp._FLASH_BWD(dO.transpose(1, 2), q, k, v, o.transpose(1, 2), lse, 0.0, causal,
                               scale=1.0)
        del G, q, k, v, dO
        dGs.append([gp.transpose(1, 2) for gp in grads])  # [B, T, h, D] views
        del grads
    for p in range(3):  # Q_j = sum_i a_i s_pij G_ij(q), ...: one pass over dqkv's part p
        dots = _cpu.head_scatter_multi([dGs[j][p] for j in range(nh)], dX[:, :, p], list(plan.heads),
                                  widths, [coefs[j][p] for j in range(nh)], accumulate=False,
                                  other=X[:, :, p] if need_a else None)
        if need_a:
            for j, dC in enumerate(dots):
                gather_dots(da, dC, widths[j], p)
    del dGs
    return dX.view(B, T, 3 * E), (da if need_a else None), (db if need_b else None)


class _PartitionAttention(torch.autograd.Function):
    """One node on CPU (eager): :func:`node_forward` / :func:`node_backward`. Saves
    ``qkv`` and each call's output and log-sum-exp, and the dropout seeds (one per head
    count, drawn from torch's generator)."""

    @staticmethod
    def forward(ctx, qkv, a, b, plan, causal, dropout_p):
        seeds = [draw_seed() for _ in plan.heads] if dropout_p > 0.0 else []
        y, outs, lses = node_forward(qkv, a, b, plan, causal, dropout_p, seeds)
        ctx.plan, ctx.causal, ctx.dropout = plan, causal, (dropout_p, seeds)
        ctx.save_for_backward(qkv, a, b, *outs, *lses)
        return y

    @staticmethod
    def backward(ctx, dy):
        dropout_p, seeds = ctx.dropout
        qkv, a, b, *rest = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph is requested: differentiate the reference
            grads = graph_grads(qkv, a, b, ctx.plan, ctx.causal, dropout_p, seeds, dy,
                                ctx.needs_input_grad[:3])
            return (*grads, None, None, None)
        nh = len(ctx.plan.heads)
        dX, da, db = node_backward(dy, qkv, a, b, ctx.plan, ctx.causal, dropout_p, seeds,
                                   rest[:nh], rest[nh:], ctx.needs_input_grad[1],
                                   ctx.needs_input_grad[2])
        return dX, _as_tensor(da, a), _as_tensor(db, b), None, None, None


class _PartitionGather(torch.autograd.Function):
    """``qkv [B, T, 3 E], a -> (Q_j, K_j, V_j)_j`` (each ``[B, T, h_j, D_j]``): the q, k, v
    of every head count's partition (C++ gathers); backward: the transposed scatters
    into one ``dqkv`` and the coefficient dots for ``d a``. Saves ``qkv`` only."""

    @staticmethod
    def forward(ctx, qkv, a, plan):
        B, T, _ = qkv.shape
        E = plan.E
        X = qkv.view(B, T, 3, E)
        av = a.detach().double().tolist()
        outs, srcs, heads, widths, coefs = [], [], [], [], []
        for j, h in enumerate(plan.heads):
            for p, c in enumerate(_coefs(plan, j, av)):  # separate outputs: no select nodes
                outs.append(qkv.new_empty(B, T, h, E // h))
                srcs.append(X[:, :, p])
                heads.append(h)
                widths.append(_widths(plan, j))
                coefs.append(c)
        _cpu.head_gather_multi(srcs, outs, heads, widths, coefs)  # every qkv row read once
        ctx.plan = plan
        ctx.save_for_backward(qkv, a)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dGs):
        plan = ctx.plan
        qkv, a = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph is requested: differentiate the reference
            grads = graph_backward(lambda qkv, a: partition_gather_reference(qkv, a, plan),
                                   (qkv, a), ctx.needs_input_grad[:2], dGs)
            return (*grads, None)
        B, T, _ = qkv.shape
        E = plan.E
        X = qkv.view(B, T, 3, E)
        av = a.detach().double().tolist()
        need_a = ctx.needs_input_grad[1]
        da = [0.0] * len(av)
        dX = qkv.new_empty(B, T, 3, E)
        coefs = [_coefs(plan, j, av) for j in range(len(plan.heads))]
        for p in range(3):  # one pass over dqkv's part p for every head count
            js = [j for j in range(len(plan.heads)) if dGs[3 * j + p] is not None]
            if not js:
                dX[:, :, p].zero_()
                continue
            srcs = [dGs[3 * j + p] if dGs[3 * j + p].stride(-1) == 1 else dGs[3 * j + p].contiguous()
                    for j in js]
            dots = _cpu.head_scatter_multi(srcs, dX[:, :, p], [plan.heads[j] for j in js],
                                           [_widths(plan, j) for j in js], [coefs[j][p] for j in js],
                                           accumulate=False, other=X[:, :, p] if need_a else None)
            if need_a:
                for j, dC in zip(js, dots):
                    gather_dots(da, dC, _widths(plan, j), p)
        return dX.view(B, T, 3 * E), (_as_tensor(da, a) if need_a else None), None


class _PartitionScatter(torch.autograd.Function):
    """``a, b, (O_j [B, T, h_j, D_j])_j -> y = sum_j b_j sum_i a_i G_ij^T(O_j)`` (C++
    scatters into one ``y``); backward: the gathers of ``dy`` and the coefficient dots
    for ``d a``, ``d b``. Saves the ``O_j``."""

    @staticmethod
    def forward(ctx, a, b, plan, *outs):
        B, T = outs[0].shape[:2]
        av, bv = a.detach().double().tolist(), b.detach().double().tolist()
        y = outs[0].new_empty(B, T, plan.E)
        for j, (h, o) in enumerate(zip(plan.heads, outs)):
            _cpu.head_scatter(o, y, h, _widths(plan, j), [bv[j] * ai for ai in av], accumulate=j > 0)
        ctx.plan = plan
        ctx.save_for_backward(a, b, *outs)
        return y

    @staticmethod
    def backward(ctx, dy):
        plan = ctx.plan
        a, b, *outs = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph is requested: differentiate the reference
            needs = ctx.needs_input_grad
            grads = graph_backward(lambda a, b, *o: partition_scatter_reference(a, b, plan, o),
                                   (a, b, *outs), (needs[0], needs[1], *needs[3:]), (dy,))
            return (grads[0], grads[1], None, *grads[2:])
        av, bv = a.detach().double().tolist(), b.detach().double().tolist()
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        da, db, dOs = [0.0] * len(av), [0.0] * len(bv), []
        for j, (h, o) in enumerate(zip(plan.heads, outs)):
            dO = o.new_empty(o.shape)
            dc = _cpu.head_gather(dy, dO, h, _widths(plan, j), [bv[j] * ai for ai in av],
                                  other=o if (need_a or need_b) else None)
            if dc is not None:
                scatter_dots(da, db, dc, av, bv, j)
            dOs.append(dO)
        return (_as_tensor(da, a) if need_a else None, _as_tensor(db, b) if need_b else None,
                None, *dOs)


def partition_attention_dropout(qkv, a, b, plan, causal: bool, dropout_p: float):
    """With attention dropout (CPU float32/float64): the gathers and the scatter are one
    node each (C++ kernels) and the attention calls are torch's own
    ``scaled_dot_product_attention`` with its dropout and autograd, one per head count,
    as the plain model runs its one call (no zero-padded temporaries per candidate)."""
    qkvs = _PartitionGather.apply(qkv, a, plan)
    outs = []
    for j in range(len(plan.heads)):
        q, k, v = (t.transpose(1, 2) for t in qkvs[3 * j:3 * j + 3])
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=1.0)
        outs.append(o.transpose(1, 2))  # [B, T, h, D] (a view: the scatter reads it in place)
    return _PartitionScatter.apply(a, b, plan, *outs)

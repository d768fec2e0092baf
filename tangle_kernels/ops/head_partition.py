"""Head-partition attention: the nanoGPT space's attention under a soft architecture at
the cost of one attention call per head-count candidate.

In the nanoGPT space the heads partition the embedding width: a sub-network of width
``e`` with ``h`` heads has head width ``d = e / h``, head ``r`` reading the columns
``[r d, (r + 1) d)`` of q, k and v. A head count re-partitions the width, so it cannot
be expressed as a weight mask; TangleNAS mixes q, k and v over the embedding candidates
inside each head count's partition and runs ONE attention call per head count. With
``E`` the max width, ``a_i`` the weights of the embedding candidates ``e_i`` and
``b_j`` those of the head counts ``h_j`` (``D_j = E / h_j``, ``d_ij = e_i / h_j``), and
``G_ij`` the zero-padding gather that puts column ``r d_ij + t`` (``t < d_ij``) of a
``[.., E]`` tensor at slot ``(r, t)`` of an ``[.., h_j, D_j]`` tensor::

    Q_j = sum_i a_i d_ij^(-1/2) G_ij(q)        K_j = sum_i a_i G_ij(k)
    V_j = sum_i a_i G_ij(v)
    O_j = softmax(Q_j K_j^T + causal mask) V_j        (one call, h_j heads of width D_j,
                                                       scale 1: q is pre-scaled)
    y   = sum_j b_j sum_i a_i G_ij^T(O_j)              (G^T: scatter back to r d_ij + t)

Under a one-hot choice ``(e, h)`` this is exactly the sub-network's attention, its
output zero-padded to ``E``: the zero q/k columns leave the dot products unchanged, the
zero v columns give zero output columns, the pre-scale is the sub-network's
``1/sqrt(e/h)``, and the scatter puts head ``r``'s output where the sub-network's
output projection reads it (``r e/h``).

The paper's code differs for a non-max embedding width: its padded head slots put head
``r``'s output at ``r E / h`` (where the extracted network's projection reads ``r e /
h``) and it scales by ``1/sqrt(E/h)``, so its one-hot soft forward is not the extracted
sub-network. This op keeps that invariant.

:func:`partition_attention` is one autograd node on CPU (float32/float64): the forward
saves only ``qkv``, each call's output and log-sum-exp; the backward recomputes the
gathers (activation-sized copies, no attention recompute) and runs the attention
backward of each call. The attention calls are torch's CPU flash kernel without
dropout, and with attention dropout the fused kernel of :mod:`tangle_kernels.ops.attention`
(its masks drawn from one seed per call, regenerated in backward; torch has no CPU
flash kernel with dropout, and its math path keeps every call's attention matrices).
Where that kernel is unavailable (no BLAS symbol found, ``TANGLE_FUSED_ATTENTION=0``)
the dropout path is a gather node and a scatter node (the same C++ kernels) around
torch's own attention calls with dropout, one per head count. Elsewhere (CUDA, half
precision, torch.compile) the same math runs as a plain autograd composition
(:func:`partition_attention_reference`, also the oracle of the tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
import torch.nn.functional as F

from .attention import draw_seed, fused_attention_available

__all__ = ["partition_attention", "partition_attention_reference", "PartitionPlan"]


class PartitionPlan:
    """The static shape of one head-partition attention: max width ``E``, embedding
    candidate widths ``embeds`` (any order, repeats allowed) and head counts ``heads``.
    Every head count must divide every embedding width."""

    def __init__(self, E: int, embeds: Sequence[int], heads: Sequence[int]):
        self.E = int(E)
        self.embeds = tuple(int(e) for e in embeds)
        self.heads = tuple(int(h) for h in heads)
        if not self.embeds or not self.heads:
            raise ValueError("PartitionPlan: needs at least one embedding width and head count")
        if max(self.embeds) > self.E:
            raise ValueError(f"PartitionPlan: embedding width {max(self.embeds)} > E={self.E}")
        for h in self.heads:
            if h < 1 or self.E % h:
                raise ValueError(f"PartitionPlan: {h} heads do not divide E={self.E}")
            for e in self.embeds:
                if e % h:
                    raise ValueError(f"PartitionPlan: {h} heads do not divide embed {e}")

    def head_width(self, j: int) -> int:
        return self.E // self.heads[j]


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _kernels_available() -> bool:
    from .._ext import _C

    return _C is not None and hasattr(_C, "head_partition_cpu")


def _widths(plan: PartitionPlan, j: int) -> list[int]:
    return [e // plan.heads[j] for e in plan.embeds]


def _coefs(plan: PartitionPlan, j: int, av: list[float]) -> list[list[float]]:
    """Per q | k | v part the gather coefficients ``a_i s_pi`` of head count ``j`` (``s``:
    ``d_ij^(-1/2)`` for q, 1 for k and v)."""
    w = _widths(plan, j)
    return [[ai * (wi ** -0.5 if p == 0 else 1.0) for ai, wi in zip(av, w)] for p in range(3)]


def _node_forward(qkv, a, b, plan: PartitionPlan, causal: bool, dropout_p: float, seeds):
    """The CPU node's forward: per head count the gather of q | k | v (C++ kernel, one
    pass), one attention call (torch's flash kernel without dropout; the fused kernel
    with dropout, its mask from ``seeds[j]``), the scatter of its output into ``y``.
    Returns ``(y, outs, lses)``: each call's output ``[B, T, h, D]`` (contiguous) and
    log-sum-exp ``[B, h, T]``."""
    from ..backends.cpu import attention_forward, head_gather_multi, head_partition

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
        head_gather_multi(parts, [G[:, :, p] for p in range(3)], [h] * 3, [w] * 3,
                          _coefs(plan, j, av))  # q | k | v of each row in one pass
        q, k, v = (G[:, :, p].transpose(1, 2) for p in range(3))
        if dropout_p > 0.0:  # the fused kernel (its mask from a seed per call)
            o = qkv.new_empty(B, T, h, E // h)
            _, lse = attention_forward(q, k, v, causal=causal, scale=1.0, dropout_p=dropout_p,
                                       seed=seeds[j], out=o.transpose(1, 2))
        else:
            o, lse = _FLASH(q, k, v, 0.0, causal, scale=1.0)
            o = o.transpose(1, 2)
            if not o.is_contiguous():
                o = o.contiguous()
            lse = lse.contiguous()
        head_partition(True, o, y, h, w, [bv[j] * ai for ai in av], accumulate=j > 0)
        outs.append(o)
        lses.append(lse)
    return y, outs, lses


def _node_backward(dy, qkv, a, b, plan: PartitionPlan, causal: bool, dropout_p: float, seeds,
                   outs, lses, need_a: bool, need_b: bool):
    """The CPU node's backward: ``(dqkv, d a as floats or None, d b or None)``; recomputes
    the gathers (and the dropout masks from the seeds)."""
    from ..backends.cpu import (attention_backward, head_gather_multi, head_partition,
                                head_scatter_multi)

    nh = len(plan.heads)
    B, T, _ = qkv.shape
    E = plan.E
    X = qkv.view(B, T, 3, E)
    av, bv = a.detach().double().tolist(), b.detach().double().tolist()
    m = len(av)
    need = need_a or need_b
    da = [0.0] * m
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
        head_gather_multi(parts, [G[:, :, p] for p in range(3)], [h] * 3, [w] * 3, coefs[j])
        q, k, v = (G[:, :, p].transpose(1, 2) for p in range(3))
        o, lse = outs[j], lses[j]  # o: [B, T, h, D]
        dO = qkv.new_empty(B, T, h, D)
        dc = head_partition(False, dy, dO, h, w, [bv[j] * ai for ai in av],
                            accumulate=False, other=o if need else None)
        if need:  # y = sum_j b_j sum_i a_i G_ij^T(O_j)
            dc = dc.tolist()
            for i in range(m):
                db[j] += dc[i] * av[i]
                da[i] += dc[i] * bv[j]
        if dropout_p > 0.0:
            dG = qkv.new_empty(B, T, 3, h, D)
            grads = attention_backward(dO.transpose(1, 2), q, k, v, o.transpose(1, 2), lse,
                                       causal=causal, scale=1.0, dropout_p=dropout_p,
                                       seed=seeds[j], dq=dG[:, :, 0].transpose(1, 2),
                                       dk=dG[:, :, 1].transpose(1, 2),
                                       dv=dG[:, :, 2].transpose(1, 2))
        else:
            grads = _FLASH_BWD(dO.transpose(1, 2), q, k, v, o.transpose(1, 2), lse, 0.0, causal,
                               scale=1.0)
        del G, q, k, v, dO
        dGs.append([gp.transpose(1, 2) for gp in grads])  # [B, T, h, D] views
        del grads
    for p in range(3):  # Q_j = sum_i a_i s_pij G_ij(q), ...: one pass over dqkv's part p
        dots = head_scatter_multi([dGs[j][p] for j in range(nh)], dX[:, :, p], list(plan.heads),
                                  widths, [coefs[j][p] for j in range(nh)], accumulate=False,
                                  other=X[:, :, p] if need_a else None)
        if need_a:
            for j, dC in enumerate(dots):
                for i, v in enumerate(dC.tolist()):
                    da[i] += v * (widths[j][i] ** -0.5 if p == 0 else 1.0)
    del dGs
    return dX.view(B, T, 3 * E), (da if need_a else None), (db if need_b else None)


class _PartitionAttention(torch.autograd.Function):
    """One node on CPU (eager): :func:`_node_forward` / :func:`_node_backward`. Saves
    ``qkv`` and each call's output and log-sum-exp, and the dropout seeds (one per head
    count, drawn from torch's generator)."""

    @staticmethod
    def forward(ctx, qkv, a, b, plan, causal, dropout_p):
        seeds = [draw_seed() for _ in plan.heads] if dropout_p > 0.0 else []
        y, outs, lses = _node_forward(qkv, a, b, plan, causal, dropout_p, seeds)
        ctx.plan, ctx.causal, ctx.dropout = plan, causal, (dropout_p, seeds)
        ctx.save_for_backward(qkv, a, b, *outs, *lses)
        return y

    @staticmethod
    def backward(ctx, dy):
        dropout_p, seeds = ctx.dropout
        qkv, a, b, *rest = ctx.saved_tensors
        nh = len(ctx.plan.heads)
        dX, da, db = _node_backward(dy, qkv, a, b, ctx.plan, ctx.causal, dropout_p, seeds,
                                    rest[:nh], rest[nh:], ctx.needs_input_grad[1],
                                    ctx.needs_input_grad[2])
        return (dX, None if da is None else torch.tensor(da, dtype=a.dtype),
                None if db is None else torch.tensor(db, dtype=b.dtype), None, None, None)


# --- the torch.compile route: the same node as custom ops -------------------------------

_PLANS: dict = {}


def _plan_of(E: int, embeds, heads) -> PartitionPlan:
    key = (int(E), tuple(embeds), tuple(heads))
    if key not in _PLANS:
        _PLANS[key] = PartitionPlan(*key)
    return _PLANS[key]


@torch.library.custom_op("tangle::partition_attention_fwd", mutates_args=())
def _pa_fwd_op(qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seeds: torch.Tensor, E: int,
               embeds: list[int], heads: list[int], causal: bool,
               dropout_p: float) -> list[torch.Tensor]:
    """``[y, O_1.., L_1..]`` of :func:`_node_forward` (CPU; ``seeds``: int64 ``[n]``)."""
    y, outs, lses = _node_forward(qkv.contiguous(), a, b, _plan_of(E, embeds, heads), causal,
                                  dropout_p, seeds.tolist())
    return [y, *outs, *lses]


@_pa_fwd_op.register_fake
def _(qkv, a, b, seeds, E, embeds, heads, causal, dropout_p):
    B, T, _ = qkv.shape
    return ([qkv.new_empty(B, T, E)] + [qkv.new_empty(B, T, h, E // h) for h in heads]
            + [qkv.new_empty(B, h, T) for h in heads])


@torch.library.custom_op("tangle::partition_attention_bwd", mutates_args=())
def _pa_bwd_op(dy: torch.Tensor, qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               seeds: torch.Tensor, saved: list[torch.Tensor], E: int, embeds: list[int],
               heads: list[int], causal: bool, dropout_p: float) -> list[torch.Tensor]:
    """``[dqkv, d a, d b]`` of :func:`_node_backward`."""
    nh = len(heads)
    dX, da, db = _node_backward(dy, qkv.contiguous(), a, b, _plan_of(E, embeds, heads), causal,
                                dropout_p, seeds.tolist(), saved[:nh], saved[nh:], True, True)
    return [dX, torch.tensor(da, dtype=a.dtype), torch.tensor(db, dtype=b.dtype)]


@_pa_bwd_op.register_fake
def _(dy, qkv, a, b, seeds, saved, E, embeds, heads, causal, dropout_p):
    return [torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(a),
            torch.empty_like(b)]


def _pa_setup_context(ctx, inputs, output):
    qkv, a, b, seeds, E, embeds, heads, causal, dropout_p = inputs
    ctx.cfg = (E, list(embeds), list(heads), causal, dropout_p)
    ctx.save_for_backward(qkv, a, b, seeds, *output[1:])


def _pa_backward(ctx, grads):
    qkv, a, b, seeds, *saved = ctx.saved_tensors
    E, embeds, heads, causal, dropout_p = ctx.cfg
    dX, da, db = _pa_bwd_op(grads[0], qkv, a, b, seeds, list(saved), E, embeds, heads, causal,
                            dropout_p)
    return dX, da, db, None, None, None, None, None, None


_pa_fwd_op.register_autograd(_pa_backward, setup_context=_pa_setup_context)


@torch.compiler.assume_constant_result
def _fused_ok() -> bool:
    """The fused attention can run (a constant for torch.compile: probed outside the graph)."""
    return fused_attention_available() is None


def _partition_attention_op(qkv, a, b, plan: PartitionPlan, causal: bool, dropout_p: float):
    """The compile route on CPU: the custom ops, the seeds drawn in the graph."""
    nh = len(plan.heads)
    if dropout_p > 0.0:
        seeds = torch.randint(0, 2**62, (nh,), dtype=torch.int64, device=qkv.device)
    else:
        seeds = torch.zeros(nh, dtype=torch.int64, device=qkv.device)
    return _pa_fwd_op(qkv, a, b, seeds, plan.E, list(plan.embeds), list(plan.heads), causal,
                      dropout_p)[0]


class _PartitionGather(torch.autograd.Function):
    """``qkv [B, T, 3 E], a -> (Q_j, K_j, V_j)_j`` (each ``[B, T, h_j, D_j]``): the q, k, v
    of every head count's partition (C++ gathers); backward: the transposed scatters
    into one ``dqkv`` and the coefficient dots for ``d a``. Saves ``qkv`` only."""

    @staticmethod
    def forward(ctx, qkv, a, plan):
        from ..backends.cpu import head_gather_multi

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
        head_gather_multi(srcs, outs, heads, widths, coefs)  # every qkv row read once
        ctx.plan = plan
        ctx.save_for_backward(qkv, a)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dGs):
        from ..backends.cpu import head_scatter_multi

        plan = ctx.plan
        qkv, a = ctx.saved_tensors
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
            dots = head_scatter_multi(srcs, dX[:, :, p], [plan.heads[j] for j in js],
                                      [_widths(plan, j) for j in js], [coefs[j][p] for j in js],
                                      accumulate=False, other=X[:, :, p] if need_a else None)
            if need_a:
                for j, dC in zip(js, dots):
                    w = _widths(plan, j)
                    for i, v in enumerate(dC.tolist()):
                        da[i] += v * (w[i] ** -0.5 if p == 0 else 1.0)
        return (dX.view(B, T, 3 * E), torch.tensor(da, dtype=a.dtype) if need_a else None, None)


class _PartitionScatter(torch.autograd.Function):
    """``a, b, (O_j [B, T, h_j, D_j])_j -> y = sum_j b_j sum_i a_i G_ij^T(O_j)`` (C++
    scatters into one ``y``); backward: the gathers of ``dy`` and the coefficient dots
    for ``d a``, ``d b``. Saves the ``O_j``."""

    @staticmethod
    def forward(ctx, a, b, plan, *outs):
        from ..backends.cpu import head_partition

        B, T = outs[0].shape[:2]
        av, bv = a.detach().double().tolist(), b.detach().double().tolist()
        y = outs[0].new_empty(B, T, plan.E)
        for j, (h, o) in enumerate(zip(plan.heads, outs)):
            head_partition(True, o, y, h, _widths(plan, j), [bv[j] * ai for ai in av], accumulate=j > 0)
        ctx.plan = plan
        ctx.save_for_backward(a, b, *outs)
        return y

    @staticmethod
    def backward(ctx, dy):
        from ..backends.cpu import head_partition

        plan = ctx.plan
        a, b, *outs = ctx.saved_tensors
        av, bv = a.detach().double().tolist(), b.detach().double().tolist()
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        da, db, dOs = [0.0] * len(av), [0.0] * len(bv), []
        for j, (h, o) in enumerate(zip(plan.heads, outs)):
            dO = o.new_empty(o.shape)
            dc = head_partition(False, dy, dO, h, _widths(plan, j), [bv[j] * ai for ai in av],
                                accumulate=False, other=o if (need_a or need_b) else None)
            if dc is not None:
                for i, v in enumerate(dc.tolist()):
                    db[j] += v * av[i]
                    da[i] += v * bv[j]
            dOs.append(dO)
        return (torch.tensor(da, dtype=a.dtype) if need_a else None,
                torch.tensor(db, dtype=b.dtype) if need_b else None, None, *dOs)


def _partition_attention_dropout(qkv, a, b, plan: PartitionPlan, causal: bool, dropout_p: float):
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


def partition_attention_reference(qkv, a, b, plan: PartitionPlan, *, causal: bool = True,
                                  dropout_p: float = 0.0,
                                  attend: Callable | None = None) -> torch.Tensor:
    """The same math as :func:`partition_attention` in plain differentiable torch ops
    (zero padding, ``scaled_dot_product_attention``); the oracle of the tests and the
    path on CUDA, under compile and autocast. ``attend(j, q, k, v)`` (``[B, h_j, T,
    D_j]``, q pre-scaled) replaces head count ``j``'s attention call (the tests pass one
    with the fused kernel's dropout masks)."""
    B, T, _ = qkv.shape
    E = plan.E
    X = qkv.view(B, T, 3, E)
    y = None
    for j, h in enumerate(plan.heads):
        D = E // h
        parts = [None, None, None]
        for i, e in enumerate(plan.embeds):
            d = e // h
            src = F.pad(X[..., :e].view(B, T, 3, h, d), (0, D - d))
            for p in range(3):
                t = src[:, :, p] * (a[i] * (d ** -0.5 if p == 0 else 1.0)).to(qkv.dtype)
                parts[p] = t if parts[p] is None else parts[p] + t
        q, k, v = (t.transpose(1, 2) for t in parts)
        if attend is not None:
            o = attend(j, q, k, v).transpose(1, 2)
        else:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                               scale=1.0).transpose(1, 2)  # [B, T, h, D]
        for i, e in enumerate(plan.embeds):
            d = e // h
            t = o[..., :d].reshape(B, T, e) * (b[j] * a[i]).to(qkv.dtype)
            t = F.pad(t, (0, E - e))
            y = t if y is None else y + t
    return y


def partition_attention(qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        plan: PartitionPlan, *, causal: bool = True,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """``qkv [B, T, 3 E]`` (q | k | v), ``a [m]`` embedding weights, ``b [n]`` head-count
    weights -> ``y [B, T, E]`` (see the module docstring for the math)."""
    if qkv.dim() != 3 or qkv.shape[-1] != 3 * plan.E:
        raise ValueError(f"qkv: expected [B, T, {3 * plan.E}], got {tuple(qkv.shape)}")
    if a.shape != (len(plan.embeds),) or b.shape != (len(plan.heads),):
        raise ValueError(
            f"a, b: expected shapes ({len(plan.embeds)},) and ({len(plan.heads)},), got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    cpu_kernels = (
        _kernels_available()
        and qkv.device.type == "cpu"
        and qkv.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
    )
    attention_ok = _FLASH is not None if dropout_p == 0.0 else _fused_ok()
    if torch.compiler.is_compiling():
        # With dropout the compiled reference would run torch's CPU math attention (its
        # matrices and masks kept): the custom ops of the node instead (Tiny Shakespeare
        # step: 2.89 -> 2.11 s, peak 1307 -> 466 MiB, compile 188 -> 80 s). Without
        # dropout inductor fuses the reference around torch's flash kernel, which was
        # faster than the ops at the default space's size (31.3 vs 33.5 ms a step).
        if cpu_kernels and attention_ok and dropout_p > 0.0:
            return _partition_attention_op(qkv, a, b, plan, bool(causal), float(dropout_p))
        return partition_attention_reference(qkv, a, b, plan, causal=causal, dropout_p=dropout_p)
    if not cpu_kernels or (dropout_p == 0.0 and _FLASH is None):
        return partition_attention_reference(qkv, a, b, plan, causal=causal, dropout_p=dropout_p)
    if not qkv.is_contiguous():
        qkv = qkv.contiguous()
    if dropout_p > 0.0 and not _fused_ok():
        return _partition_attention_dropout(qkv, a, b, plan, bool(causal), float(dropout_p))
    return _PartitionAttention.apply(qkv, a, b, plan, bool(causal), float(dropout_p))

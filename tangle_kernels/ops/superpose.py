"""superpose: the entangled superposition and its gradients in one pass.

    W_mix = W * M(mix),   M(mix)[i] = sum_k mix_k * [i in candidate k]

which equals the padded-sum formulation ``sum_k mix_k * pad(slice_k(W))`` of the
seed code. With the layout's cell values ``T = B @ mix``:

    forward:   W_mix[i] = W[i] * T[cell(i)]
    backward:  dW[i]    = G[i] * T[cell(i)]
               P[c]     = sum over i in cell c of G[i] * W[i]     (one sweep with dW)
               d mix_k  = sum over the cells c inside k of P[c]    (a masked B^T P)

Name chain: backend kernels -> ``tangle::superpose_fwd`` / ``tangle::superpose_bwd``
(custom ops, torch.compile- and opcheck-clean) -> public :func:`superpose`.

Two routes to the same kernels. Under ``torch.compile`` :func:`superpose` emits the
custom ops (traced once, so their dispatch cost does not matter). In eager mode it
calls the backend through one ``torch.autograd.Function`` (:class:`_SuperposeFn`):
the custom-op dispatcher and the autograd graph of ``T = B @ mix`` cost several
times the kernel itself at GPT-2 sizes, and an op is called once per layer per step.
The two routes run the same backend functions and agree in W_mix and dW bitwise up to
the sign of zero (d mix to rounding: the same products summed by different reduction
kernels; tests).

Non-finite values follow the padded sum (:func:`~tangle_kernels.backends.reference.
superpose_reference`) on every backend: ``d mix_k`` and ``dW`` in candidate k's box
depend only on the cells inside candidate k (``d mix_k = sum_{c in k} P[c]``, never
``0 * P[c]``), and the cells no candidate covers are 0 in ``W_mix`` and ``dW`` whatever
W holds there.

Second order: the op is linear in W and in mix, so when a graph is requested the
backward is written in differentiable terms of the same op (``dW = superpose(G,
mix)``, ``d mix_k = sum over candidate k of G * W``); it is twice (indeed arbitrarily
often) differentiable on every backend.
"""

from __future__ import annotations

import torch

from .. import backends
from ..backends.reference import superpose_reference
from ..layout import Layout
from ._autograd import refuse_functorch

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _tabs(rowgrp, colgrp, runs):
    return {"rowgrp": rowgrp, "colgrp": colgrp, "runs": runs}


@torch.library.custom_op("tangle::superpose_fwd", mutates_args=())
def superpose_forward(
    weight: torch.Tensor,
    t: torch.Tensor,
    rowgrp: torch.Tensor,
    colgrp: torch.Tensor,
    runs: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """``W * T[cell]`` with the kernel tables of a :class:`Layout` (see module docstring)."""
    w2d = weight.reshape(rowgrp.numel(), colgrp.numel())
    out = backends.get("superpose", backend).forward(w2d, t, _tabs(rowgrp, colgrp, runs))
    return out.reshape(weight.shape)


@superpose_forward.register_fake
def _(weight, t, rowgrp, colgrp, runs, backend):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.custom_op("tangle::superpose_bwd", mutates_args=())
def superpose_backward(
    grad: torch.Tensor,
    weight: torch.Tensor,
    t: torch.Tensor,
    rowgrp: torch.Tensor,
    colgrp: torch.Tensor,
    runs: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dW, P)``: ``dW = G * T[cell]`` and the per-cell sums ``P = sum_cell G * W``."""
    R, C = rowgrp.numel(), colgrp.numel()
    dw, p = backends.get("superpose", backend).backward(
        grad.reshape(R, C), weight.reshape(R, C), t, _tabs(rowgrp, colgrp, runs)
    )
    return dw.reshape(weight.shape), p


@superpose_backward.register_fake
def _(grad, weight, t, rowgrp, colgrp, runs, backend):
    return (
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(t, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    weight, t, rowgrp, colgrp, runs, backend = inputs
    ctx.save_for_backward(weight, t, rowgrp, colgrp, runs)
    ctx.backend = backend


def _backward(ctx, grad):
    weight, t, rowgrp, colgrp, runs = ctx.saved_tensors
    if torch.is_grad_enabled():  # a graph is requested: differentiable terms of the same op
        dw = superpose_forward(grad, t, rowgrp, colgrp, runs, ctx.backend)
        p = _cell_sums(grad * weight, rowgrp, colgrp, t)
        return dw, p, None, None, None, None
    dw, p = superpose_backward(grad, weight, t, rowgrp, colgrp, runs, ctx.backend)
    return dw, p, None, None, None, None


superpose_forward.register_autograd(_backward, setup_context=_setup_context)


def _cell_sums(x: torch.Tensor, rowgrp, colgrp, t) -> torch.Tensor:
    """``P[c] = sum over cell c of x`` (``[nrg, ncg]``, t's dtype), differentiable."""
    x2 = x.reshape(rowgrp.numel(), colgrp.numel()).to(t.dtype)
    q = torch.zeros((x2.shape[0], t.shape[1]), dtype=t.dtype, device=t.device)
    q = q.index_add(1, colgrp.long(), x2)
    p = torch.zeros(t.shape, dtype=t.dtype, device=t.device)
    return p.index_add(0, rowgrp.long(), q)


def _check_backend(backend) -> None:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(
            f"backend: expected a str (one of {', '.join(backends.BACKENDS)}) or None, "
            f"got {type(backend).__name__} {backend!r}"
        )


def _check_inputs(weight, mix, layout) -> None:
    if not isinstance(layout, Layout):
        raise TypeError(f"layout: expected a tangle_kernels.Layout, got {type(layout).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if not isinstance(mix, torch.Tensor):
        raise TypeError(f"mix: expected a torch.Tensor, got {type(mix).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"weight: dtype {weight.dtype} is not supported (float32, float64, float16, bfloat16)"
        )
    layout.check_weight(weight)
    if not mix.is_floating_point():
        raise TypeError(f"mix: must be a floating tensor, got dtype {mix.dtype}")
    if mix.dim() != 1 or mix.shape[0] != layout.K:
        raise ValueError(
            f"mix: expected a vector of length K={layout.K} (one weight per candidate), "
            f"got shape {tuple(mix.shape)}"
        )
    if mix.device != weight.device:
        raise ValueError(f"mix: is on {mix.device} but weight is on {weight.device}")


def _cell_values(B: torch.Tensor, mix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``T = B @ mix`` (flat, ``dtype``) outside autograd, computed exactly as
    :meth:`Layout.cell_values` does (multiply + sum, which autocast leaves in
    ``dtype``), so both routes of :func:`superpose` give the same bits."""
    m = mix.detach()
    if m.dtype != dtype:
        m = m.to(dtype)
    return (B * m).sum(dim=1)


def _masked_cell_values(tabs, mix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``T[c] = sum over the candidates k covering c of mix_k`` (flat): the cell values
    of the backward, where a non-finite ``mix_k`` reaches only candidate k's cells (as
    in the padded sum's dW). Equal to :func:`_cell_values` for finite mix."""
    m = mix.detach()
    if m.dtype != dtype:
        m = m.to(dtype)
    return torch.where(tabs["Bmask"], m, 0).sum(dim=1)


def _mix_grad(tabs, B: torch.Tensor, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``d mix_k = sum over the cells c inside candidate k of P[c]`` in B's dtype
    (float32; float64 for float64 weights), then ``dtype``. A masked sum, not ``B^T
    P``: a non-finite ``P[c]`` must not reach the candidates that do not cover c
    (``0 * inf`` is NaN)."""
    p = p.reshape(-1, 1)
    if p.dtype != B.dtype:
        p = p.to(B.dtype)
    g = torch.where(tabs["Bmask"], p, 0).sum(dim=0)
    return g if g.dtype == dtype else g.to(dtype)


def _box_sums(x: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """``[sum of x over candidate k]_k`` in ``dtype``, differentiable (the second-order
    route's ``d mix``)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    sums = [x.new_zeros((), dtype=cdt) for _ in range(layout.K)]
    for box, k in zip(layout.boxes, layout.owners):
        sums[k] = sums[k] + x[tuple(slice(lo, hi) for lo, hi in box)].to(cdt).sum()
    return torch.stack(sums).to(dtype)


def _zero_uncovered(out: torch.Tensor, layout: Layout, fill) -> torch.Tensor:
    """``out`` with the elements of the cells no candidate covers set to ``fill`` (the
    padded sum's value there: 0, or NaN when a mix value is not finite)."""
    if not layout.uncovered:
        return out
    mask = layout.tables(out.device)["covered_el"].view(out.shape)
    return torch.where(mask, out, fill)


def _eager_forward(weight, mix, layout, name):
    """``(W_mix, T, kern)`` of the eager route: the cell values outside autograd, then
    the backend's forward kernel. ``kern = (tabs, B, (rows, cols), layout, name)`` is
    what the eager backward (:func:`_eager_backward`, :func:`_recompute`) needs."""
    tdtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    tabs = layout.tables(weight.device)
    B = tabs["B64"] if tdtype == torch.float64 else tabs["B32"]
    t = _cell_values(B, mix, tdtype).view(layout.nrg, layout.ncg)
    shape2d = (layout.rows, layout.cols)
    out = backends.get("superpose", name).forward(weight.reshape(shape2d), t, tabs)
    out = out if weight.dim() == 2 else out.view(weight.shape)
    if layout.uncovered:
        out = _zero_uncovered(out, layout, (mix.detach().to(tdtype) * 0).sum().to(out.dtype))
    return out, t, (tabs, B, shape2d, layout, name)


def _recompute(impl, weight, t, kern):
    """W_mix again (the layer nodes' backward recomputes it instead of saving it)."""
    tabs, _, shape2d, layout, _ = kern
    out = impl.forward(weight.reshape(shape2d), t, tabs).view(weight.shape)
    return _zero_uncovered(out, layout, 0) if layout.uncovered else out


def _eager_backward(impl, grad, weight, mix, kern, mix_dtype, need_w, need_mix):
    """``(dW or None, d mix or None)`` from the upstream gradient of W_mix: the
    backend's backward kernel on the 2-D views with the masked cell values (dW and the
    per-cell sums P), then ``d mix = sum_{c in k} P[c]``."""
    tabs, B, shape2d, layout, _ = kern
    tb = _masked_cell_values(tabs, mix, B.dtype).view(layout.nrg, layout.ncg)
    dw, p = impl.backward(grad.reshape(shape2d), weight.reshape(shape2d), tb, tabs)
    dw = dw.view(weight.shape)
    if need_w and layout.uncovered:
        dw = _zero_uncovered(dw, layout, 0)
    return (dw if need_w else None), (_mix_grad(tabs, B, p, mix_dtype) if need_mix else None)


def _graph_backward(grad, weight, mix, layout, name, need_w, need_mix):
    """The second-order route: ``(dW, d mix)`` in differentiable terms of the same op."""
    dw = superpose(grad, mix, layout, backend=name) if need_w else None
    dmix = _box_sums(grad * weight, layout, mix.dtype) if need_mix else None
    return dw, dmix


def _layer_node_route(name, x, weight, bias, leaves) -> bool:
    """True when a layer op (``entangled_linear``'s unfused path, ``entangled_conv2d``)
    takes its one-autograd-node eager route: a kernel backend (not the ``reference``
    oracle), not tracing for torch.compile, not under autocast (where the layer's own
    casts define the numerics), one dtype throughout, and a gradient to compute."""
    return (
        name != "reference"
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(weight.device.type)
        and x.dtype == weight.dtype
        and (bias is None or bias.dtype == weight.dtype)
        and torch.is_grad_enabled()
        and any(v is not None and v.requires_grad for v in leaves)
    )


class _SuperposeFn(torch.autograd.Function):
    """Eager route: ``(weight, mix) -> W_mix``; backward ``(dW, d mix)`` by the kernels,
    or by :func:`_graph_backward` when a graph is requested."""

    @staticmethod
    def forward(ctx, weight, mix, layout, name):
        out, _, kern = _eager_forward(weight, mix, layout, name)
        ctx.save_for_backward(weight, mix)
        ctx.impl, ctx.kern, ctx.mix_dtype = backends.get("superpose", name), kern, mix.dtype
        ctx.layout, ctx.name = layout, name
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, mix = ctx.saved_tensors
        need_w, need_mix = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            dw, dmix = _graph_backward(grad, weight, mix, ctx.layout, ctx.name, need_w, need_mix)
        else:
            dw, dmix = _eager_backward(ctx.impl, grad, weight, mix, ctx.kern, ctx.mix_dtype,
                                       need_w, need_mix)
        return dw, dmix, None, None


def superpose(
    weight: torch.Tensor,
    mix: torch.Tensor,
    layout: Layout,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The superposed weight ``W_mix = W * M(mix)`` of the ``layout``'s K candidates.

    Args:
        weight: the max-size weight, shape ``layout.shape``; float32, float64,
            float16 or bfloat16. Non-contiguous weights are copied to contiguous.
        mix: ``[K]`` candidate weights (from a sampler, usually requiring grad), on
            the weight's device; any floating dtype.
        layout: the :class:`~tangle_kernels.Layout` of the candidates.
        backend: ``"reference"``, ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or
            ``None`` (``TANGLE_KERNELS_BACKEND``, else automatic by device).

    Returns:
        ``W_mix`` with the weight's shape and dtype. Gradients flow to ``weight``
        (``dW = G * M``) and to ``mix`` (``d mix_k = sum over candidate k of G * W``,
        accumulated in float32, float64 for float64 weights).

    The mask is computed in float32 (float64 for float64 weights) and the product
    rounded once to the weight's dtype. ``mix`` is not checked for NaN or sign (that
    would synchronise with the device): the op is linear in ``mix``, so negative
    values are superposed as given, and non-finite values behave as in the padded
    sum: a NaN or inf ``mix_k`` makes every element of ``W_mix`` NaN (the zero padding
    times NaN) but only candidate k's box of ``dW`` (``d mix`` does not depend on
    ``mix``); a NaN or inf weight element reaches only the ``d mix_k`` of the
    candidates covering it; the cells no candidate covers are 0 in ``W_mix``.

    Differentiable any number of times (``torch.autograd``, ``create_graph=True``
    included). ``torch.func`` transforms (``grad``, ``vmap``) run only with
    ``backend="reference"``; the kernel backends refuse them with a clear error.
    """
    _check_backend(backend)
    _check_inputs(weight, mix, layout)
    name = backends.resolve("superpose", backend, weight.device)
    if name == "reference":
        return superpose_reference(weight, mix, layout)
    refuse_functorch("superpose", name, weight, mix)
    if not torch.compiler.is_compiling():
        if torch.is_grad_enabled() and (weight.requires_grad or mix.requires_grad):
            return _SuperposeFn.apply(weight, mix, layout, name)
        return _eager_forward(weight, mix, layout, name)[0]
    return _superpose_custom_op(weight, mix, layout, name)


def _superpose_custom_op(weight, mix, layout, name):
    """The torch.compile route: the ``tangle::superpose_fwd`` custom op, with the
    masked ``T`` (and so ``d mix = sum_{c in k} P[c]``) left to autograd; the padded
    sum's ``0 * mix`` terms added back as one scalar (NaN when a mix value is not
    finite), the uncovered cells set to it."""
    tdtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    t = layout.masked_cell_values(mix, tdtype)
    tabs = layout.tables(weight.device)
    out = superpose_forward(weight, t, tabs["rowgrp"], tabs["colgrp"], tabs["runs"], name)
    poison = (mix.to(tdtype) * 0).sum().to(weight.dtype)
    return _zero_uncovered(out + poison, layout, poison)

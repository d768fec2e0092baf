"""entangled_linear: ``y = x @ W_mix^T + b_mix`` with ``W_mix = superpose(W, mix, layout)``.

The bias is superposed with the projection of the weight's layout on its output
dimension (dim 0, :func:`bias_layout`).

Two paths, chosen by ``backend``:

- ``"triton"`` (fused; explicit, or automatic on CUDA with ``TANGLE_FUSED_LINEAR=1``):
  Triton GEMMs in which ``W_mix`` is never written. The mask is piecewise constant
  along each GEMM's reduction dimension, so it is applied to the accumulator: the
  main loop runs over the maximal runs of one mask group as a plain pipelined GEMM
  and scales each run's partial tile by the run's mask column (see
  backends/triton/linear.py). Backward: ``dx = dy @ W_mix`` the same way over the
  row runs, and ``G = dy^T @ x`` whose epilogue writes ``dW = G * T[cell]`` and
  reduces ``P[c] = sum_cell G * W`` (``d mix_k = sum_{c in k} P[c]``): one GEMM per output and no
  extra weight-sized pass. The bias is superposed by ``superpose`` (a vector) and
  added in the forward epilogue; ``d b_mix = dy.sum(0)``. Eager calls go through one
  ``torch.autograd.Function``; under ``torch.compile`` the custom ops
  ``tangle::entangled_linear_fwd`` / ``_bwd``. Supports float32/float16/bfloat16
  (float32 only under ``TRITON_INTERPRET=1``). With ``TANGLE_FUSED_LINEAR=1`` the
  automatic choice takes it where the GEMM runs on tensor cores (16-bit inputs, or
  float32 with ``torch.backends.cuda.matmul.allow_tf32``); IEEE float32 dots would
  run on the CUDA cores, where cuBLAS SGEMM is the faster GEMM.
- any other backend name (``"cpu"``, ``"torch"``, ``"cuda"``, ``"reference"``):
  ``superpose`` with that backend + ``F.linear`` (cuBLAS / MKL). The automatic
  choice on CPU and (unless ``TANGLE_FUSED_LINEAR=1``) on CUDA. In
  eager mode it is one autograd node (:class:`_UnfusedLinearFn`: the superpose
  kernels of W and b, the GEMMs, and in backward the superpose backward kernels) in
  place of three; the plain composition under torch.compile, autocast and for the
  ``reference`` oracle.

Which is faster where: on CPU the unfused path (there is no fused CPU GEMM). On GPU
the fused path saves the weight-sized passes of the superpose kernels (W_mix written,
re-read and recomputed), which are a small part of a large layer's GEMM time, so it
can only win where its Triton GEMM is about as fast as cuBLAS; until the GPU lane
shows that (benchmarks/results/, rows ``ours[triton]`` and ``ours[cuda]``;
scripts/gpu_probe.py rows ``fused_triton`` and ``superpose_cuda+F.linear``), the
automatic choice on CUDA is the unfused path (cuBLAS GEMMs + the CUDA superpose
kernels) and the fused GEMM is opt-in: ``backend="triton"``, or
``TANGLE_FUSED_LINEAR=1`` for the automatic choice.

Second order: when a graph is requested (``create_graph=True``) both nodes
differentiate their composition ``F.linear(x, superpose(W, mix), b_mix)`` instead of
running their kernels, so the op is twice differentiable with the composition's
second derivatives. ``torch.func`` transforms run only with ``backend="reference"``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import backends
from ..layout import Layout
from ._autograd import graph_backward, refuse_functorch
from .superpose import (
    _cell_values,
    _check_backend,
    _check_inputs,
    _eager_backward,
    _eager_forward,
    _layer_node_route,
    _mix_grad,
    _recompute,
    _zero_uncovered,
    superpose,
)

FUSED_ENV = "TANGLE_FUSED_LINEAR"  # "1": the automatic choice may take the fused GEMM


def bias_layout(layout: Layout) -> Layout:
    """The layout of the bias that goes with a ``(out, in)`` weight layout: its
    projection on dim 0, cached on the layout (:meth:`Layout.project`). Safe to call
    while torch.compile traces: the projection is then built outside the trace."""
    return layout.project((0,))


def _triton_linear():
    backends._module_check("linear", "triton")  # imported outside a torch.compile trace
    return backends.get("linear", "triton")


# ------------------------------------------------------------------ custom ops
def _tabs(rowgrp, colgrp, runs, rowruns):
    return {"rowgrp": rowgrp, "colgrp": colgrp, "runs": runs, "rowruns": rowruns}


@torch.library.custom_op("tangle::entangled_linear_fwd", mutates_args=())
def entangled_linear_forward(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    t: torch.Tensor,
    rowgrp: torch.Tensor,
    colgrp: torch.Tensor,
    runs: torch.Tensor,
    rowruns: torch.Tensor,
    aligned_cols: bool,
    aligned_rows: bool,
    bias_mix: torch.Tensor | None,
) -> torch.Tensor:
    """Fused ``x2d @ (W * T[cell])^T + bias_mix`` (Triton); x2d ``[M, in]``.
    ``aligned_cols/rows``: the run boundaries are multiples of 16 (``layout.run_alignment``)."""
    tabs = _tabs(rowgrp, colgrp, runs, rowruns)
    return _triton_linear().linear_forward(x2d, weight, t, tabs, bias_mix, aligned=aligned_cols)


@entangled_linear_forward.register_fake
def _(x2d, weight, t, rowgrp, colgrp, runs, rowruns, aligned_cols, aligned_rows, bias_mix):
    return x2d.new_empty((x2d.shape[0], weight.shape[0]))


@torch.library.custom_op("tangle::entangled_linear_bwd", mutates_args=())
def entangled_linear_backward(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    t: torch.Tensor,
    rowgrp: torch.Tensor,
    colgrp: torch.Tensor,
    runs: torch.Tensor,
    rowruns: torch.Tensor,
    aligned_rows: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dW, P)`` of the fused linear (see module docstring)."""
    tabs = _tabs(rowgrp, colgrp, runs, rowruns)
    return _triton_linear().linear_backward(dy, x2d, weight, t, tabs, aligned_rows=aligned_rows)


@entangled_linear_backward.register_fake
def _(dy, x2d, weight, t, rowgrp, colgrp, runs, rowruns, aligned_rows):
    return (
        torch.empty_like(x2d, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(t, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    x2d, weight, t, rowgrp, colgrp, runs, rowruns, aligned_cols, aligned_rows, bias_mix = inputs
    ctx.save_for_backward(x2d, weight, t, rowgrp, colgrp, runs, rowruns)
    ctx.aligned_rows = aligned_rows
    ctx.has_bias = bias_mix is not None
    ctx.bias_dtype = bias_mix.dtype if bias_mix is not None else None


def _backward(ctx, dy):
    x2d, weight, t, rowgrp, colgrp, runs, rowruns = ctx.saved_tensors
    if torch.is_grad_enabled():  # a graph is requested: differentiable terms
        from .superpose import _cell_sums, superpose_forward

        w_mix = superpose_forward(weight, t, rowgrp, colgrp, runs, "torch")
        g = dy.t() @ x2d
        dx = dy @ w_mix
        dw = superpose_forward(g, t, rowgrp, colgrp, runs, "torch")
        p = _cell_sums(g * weight, rowgrp, colgrp, t)
    else:
        dx, dw, p = entangled_linear_backward(dy, x2d, weight, t, rowgrp, colgrp, runs, rowruns,
                                              ctx.aligned_rows)
    db = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.has_bias else None
    return dx, dw, p, None, None, None, None, None, None, db


entangled_linear_forward.register_autograd(_backward, setup_context=_setup_context)


def _fused_composition(layout):
    """The fused node's math as a differentiable composition (its second-order route)."""
    def fn(x2d, weight, mix, b_mix):
        return F.linear(x2d, superpose(weight, mix, layout, backend="torch"), b_mix)
    return fn


class _FusedLinearFn(torch.autograd.Function):
    """Eager route of the fused path (no custom-op dispatch, ``T`` outside autograd):
    ``(x2d, weight, mix, b_mix) -> y``; backward ``(dx, dW, d mix = sum_{c in k} P[c],
    d b_mix)``, or the composition's gradients with their graph when one is requested."""

    @staticmethod
    def forward(ctx, x2d, weight, mix, b_mix, layout):
        tabs = layout.tables(weight.device)
        t = _cell_values(tabs["B32"], mix, torch.float32).view(layout.nrg, layout.ncg)
        aligned, starts = layout.run_alignment, layout.run_start_align
        w_in = _zero_uncovered(weight, layout, 0) if layout.uncovered else weight
        y = _triton_linear().linear_forward(x2d, w_in, t, tabs, b_mix, aligned=aligned[0],
                                            start_align=starts[0])
        ctx.save_for_backward(x2d, weight, mix, b_mix)
        ctx.tabs, ctx.aligned, ctx.B, ctx.mix_dtype = tabs, aligned, tabs["B32"], mix.dtype
        ctx.starts, ctx.layout = starts, layout
        ctx.bias_dtype = b_mix.dtype if b_mix is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, mix, b_mix = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*graph_backward(_fused_composition(ctx.layout), (x2d, weight, mix, b_mix),
                                    ctx.needs_input_grad[:4], (dy,)), None)
        layout = ctx.layout
        t = layout.masked_cell_values(mix.detach(), torch.float32)
        dx, dw, p = _triton_linear().linear_backward(dy, x2d, weight, t, ctx.tabs, aligned_rows=ctx.aligned[1],
                                                     start_align_rows=ctx.starts[1])
        if layout.uncovered:
            dw = _zero_uncovered(dw, layout, 0)
        dmix = _mix_grad(ctx.tabs, ctx.B, p, ctx.mix_dtype) if ctx.needs_input_grad[2] else None
        db = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            db = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dw, dmix, db, None


def _unfused_composition(layout, name):
    """``F.linear(x, superpose(W), superpose(b))`` as a function of the node's inputs
    (the second-order route of :class:`_UnfusedLinearFn`)."""
    def fn(x, weight, bias, mix):
        b_mix = superpose(bias, mix, bias_layout(layout), backend=name) if bias is not None else None
        return F.linear(x, superpose(weight, mix, layout, backend=name), b_mix)
    return fn


class _UnfusedLinearFn(torch.autograd.Function):
    """Eager route of the unfused path in ONE autograd node: the superpose kernels of
    W and b, then ``F.linear``; backward: ``dx = dy W_mix`` (W_mix recomputed),
    ``G = dy^T x``, ``g_b = sum dy``, then the superpose backward kernels of W and b
    (``dW``, ``db``, ``d mix = sum_{c in k} (P_W + P_b)[c]``). The same kernels and GEMMs
    as ``F.linear(x, superpose(W), superpose(b))`` with a third of the autograd nodes,
    which is most of the per-call cost of a small layer. When a graph is requested the
    backward differentiates that composition instead (twice differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mix, layout, name):
        w_mix, t, ctx.kern = _eager_forward(weight, mix, layout, name)
        b_mix = None
        if bias is not None:
            b_mix, _, ctx.bkern = _eager_forward(bias, mix, bias_layout(layout), name)
        # W_mix is not saved: backward recomputes it for dx (one weight-sized pass), so no
        # layer holds a superposed copy of its weight from its forward to its backward
        # (F.linear on superpose's output would).
        ctx.save_for_backward(x, weight, t, bias, mix)
        ctx.impl, ctx.mix_dtype = backends.get("superpose", name), mix.dtype
        ctx.layout, ctx.name = layout, name
        return F.linear(x, w_mix, b_mix)

    @staticmethod
    def backward(ctx, dy):
        x, weight, t, bias, mix = ctx.saved_tensors
        need_x, need_w, need_b, need_mix = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            return (*graph_backward(_unfused_composition(ctx.layout, ctx.name),
                                    (x, weight, bias, mix), (need_x, need_w, need_b, need_mix),
                                    (dy,)), None, None)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = dmix = None
        if need_x:
            dx = (dy2 @ _recompute(ctx.impl, weight, t, ctx.kern)).view(x.shape)
        if need_w or need_mix:
            g = dy2.t() @ x.reshape(-1, x.shape[-1])
            dw, dmix = _eager_backward(ctx.impl, g, weight, mix, ctx.kern, ctx.mix_dtype, need_w, need_mix)
        if bias is not None and (need_b or need_mix):
            db, dmix_b = _eager_backward(ctx.impl, dy2.sum(0), bias, mix, ctx.bkern, ctx.mix_dtype,
                                         need_b, need_mix)
            if need_mix:
                dmix = dmix + dmix_b
        return dx, dw, db, dmix, None, None


def _unfused(x, weight, bias, mix, layout, backend):
    """``F.linear(x, superpose(W), superpose(b))``: one autograd node in eager mode
    (:class:`_UnfusedLinearFn`), the composition under torch.compile, with the
    reference backend (the oracle) and under autocast (where ``F.linear``'s own casts
    and saved tensors define the numerics)."""
    _check_inputs(weight, mix, layout)
    name = backends.resolve("superpose", backend, weight.device)
    if name != "reference":
        refuse_functorch("entangled_linear", name, x, weight, bias, mix)
    if _layer_node_route(name, x, weight, bias, (x, weight, bias, mix)):
        if bias is not None:
            _check_inputs(bias, mix, bias_layout(layout))
        return _UnfusedLinearFn.apply(x, weight, bias, mix, layout, name)
    w_mix = superpose(weight, mix, layout, backend=backend)
    b_mix = None
    if bias is not None:
        b_mix = superpose(bias, mix, bias_layout(layout), backend=backend)
    return F.linear(x, w_mix, b_mix)


# ------------------------------------------------------------------ public op
def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = weight.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _use_fused(backend: str | None, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for the fused Triton path. Explicit ``backend="triton"`` (argument or
    environment) with a dtype it cannot run raises; another explicit name means the
    unfused path with that superpose backend. Automatic: unfused, unless
    ``TANGLE_FUSED_LINEAR=1``; then fused on CUDA when the triton backend can run
    there (whatever the automatic superpose backend is) and the GEMM runs on tensor
    cores (16-bit inputs, or float32 with ``torch.backends.cuda.matmul.allow_tf32``)."""
    explicit = backend if backend is not None else (os.environ.get(backends.ENV_VAR) or None)
    if explicit is not None:
        if backends.resolve("superpose", backend, weight.device) != "triton":
            return False
    elif os.environ.get(FUSED_ENV, "0") in ("", "0"):
        return False
    elif weight.device.type != "cuda" or backends.why_unavailable("linear", "triton", weight.device) is not None:
        return False
    triton_linear = _triton_linear()

    dt = _compute_dtype(x, weight)
    why = None
    if dt not in triton_linear.SUPPORTED:
        why = f"dtype {dt} (supported: float32, float16, bfloat16)"
    elif backends.triton_interpret() and weight.device.type == "cpu" and dt != torch.float32:
        why = f"dtype {dt} under TRITON_INTERPRET=1 (float32 only)"
    if why is None:
        if explicit is None and dt == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
            # IEEE float32 dots run on the CUDA cores (no TF32 tensor cores): cuBLAS
            # SGEMM on the superposed weight is the faster automatic choice there.
            return False
        return True
    if explicit is not None:
        raise TypeError(f"weight: the fused triton linear cannot run {why}")
    return False


def entangled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mix: torch.Tensor,
    layout: Layout,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.linear(x, superpose(W, mix, layout), superpose(b, mix, bias_layout(layout)))``.

    Args:
        x: ``[..., in]`` input at the max input width.
        weight: ``[out, in]`` max-size weight; ``layout.shape == weight.shape``.
        bias: ``[out]`` or None.
        mix: ``[K]`` candidate weights (gradients flow to it).
        backend: ``"triton"`` = the fused GEMM (mask applied on load, d mix from the dW
            GEMM's epilogue); another backend name = ``superpose`` with it + ``F.linear``;
            None = automatic (unfused; fused on CUDA tensor cores with
            ``TANGLE_FUSED_LINEAR=1``).

    Under autocast the fused path casts x, W and the bias to the autocast dtype first
    (as ``F.linear`` would); the mask is still applied in float32.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [out, in] tensor, got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x: last dimension {x.shape[-1]} != weight's input features {weight.shape[1]}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_backend(backend)
    if not _use_fused(backend, x, weight):
        return _unfused(x, weight, bias, mix, layout, backend)

    _check_inputs(weight, mix, layout)
    dt = _compute_dtype(x, weight)
    if dt != weight.dtype:  # autocast
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    elif x.dtype != weight.dtype:
        raise TypeError(f"x: dtype {x.dtype} != weight dtype {weight.dtype}")
    b_mix = None
    if bias is not None:
        b_mix = superpose(bias, mix, bias_layout(layout), backend=backend)
    x2d = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        t = layout.masked_cell_values(mix, torch.float32)
        tabs = layout.tables(weight.device)
        ac, ar = layout.run_alignment
        w_in = _zero_uncovered(weight, layout, 0) if layout.uncovered else weight
        y = entangled_linear_forward(
            x2d, w_in, t, tabs["rowgrp"], tabs["colgrp"], tabs["runs"], tabs["rowruns"], ac, ar, b_mix
        )
        y = y + (mix.to(torch.float32) * 0).sum().to(y.dtype)  # the padded sum's 0 * mix
    else:
        refuse_functorch("entangled_linear", "triton", x2d, weight, mix)
        y = _FusedLinearFn.apply(x2d, weight, mix, b_mix, layout)
    return y.reshape(*x.shape[:-1], weight.shape[0])

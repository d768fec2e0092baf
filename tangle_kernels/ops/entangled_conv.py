"""entangled_conv2d: ``F.conv2d(x, superpose(W, mix, layout), superpose(b, bias_mix,
bias_layout), ...)`` as one autograd node.

The convolution runs on the superposed weight (cuDNN / oneDNN: there is no fused
masked convolution); what this op adds over the plain composition:

- one autograd node in eager mode instead of three (the two superposes and the
  convolution), which is most of the per-call cost of a small layer;
- ``W_mix`` is not kept from the forward to the backward: the backward recomputes it
  (one weight-sized pass) for ``aten.convolution_backward``, so a supernet does not
  hold a superposed copy of every conv weight between its forward and backward;
- the backward runs the superpose backward kernels on the weight and bias gradients
  (``dW``, ``db``, ``d mix = B^T P``) right after the convolution's backward.

When a graph is requested (``create_graph=True``) the backward differentiates the
plain composition instead of running the kernels: twice differentiable, with the
composition's second derivatives.

Under ``torch.compile``, under autocast (where ``F.conv2d``'s own casts define the
numerics), with the ``reference`` backend (the oracle) and when nothing needs a
gradient it is the plain composition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import backends
from ..layout import Layout
from ._autograd import graph_backward, refuse_functorch
from .superpose import (
    _check_backend,
    _check_inputs,
    _eager_backward,
    _eager_forward,
    _layer_node_route,
    _recompute,
    superpose,
)


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(a, int) for a in v):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")
    return v


def _composition(layout, bias_layout, name, conv):
    """``F.conv2d(x, superpose(W), superpose(b))`` as a function of the node's inputs
    (the second-order route of :class:`_ConvFn`)."""
    def fn(x, weight, bias, mix, bias_mix):
        b = bias
        if bias is not None and bias_layout is not None:
            b = superpose(bias, bias_mix, bias_layout, backend=name)
        return F.conv2d(x, superpose(weight, mix, layout, backend=name), b, *conv)
    return fn


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mix, bias_mix, layout, bias_layout, name, conv):
        w_mix, t, ctx.kern = _eager_forward(weight, mix, layout, name)
        b_mix = bias
        if bias is not None and bias_layout is not None:
            b_mix, _, ctx.bkern = _eager_forward(bias, bias_mix, bias_layout, name)
            ctx.bmix_dtype = bias_mix.dtype
        y = F.conv2d(x, w_mix, b_mix, *conv)
        ctx.save_for_backward(x, weight, t, bias, mix, bias_mix)
        ctx.impl, ctx.mix_dtype, ctx.conv = backends.get("superpose", name), mix.dtype, conv
        ctx.layouts, ctx.name = (layout, bias_layout), name
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, t, bias, mix, bias_mix = ctx.saved_tensors
        need_x, need_w, need_b, need_mix, need_bmix = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # a graph is requested: differentiate the composition
            fn = _composition(*ctx.layouts, ctx.name, ctx.conv)
            grads = graph_backward(fn, (x, weight, bias, mix, bias_mix), ctx.needs_input_grad[:5], (dy,))
            return (*grads, None, None, None, None)
        stride, padding, dilation, groups = ctx.conv
        has_b = bias is not None
        want_gw = need_w or need_mix
        want_gb = has_b and (need_b or need_bmix)
        gi, gw, gb = torch.ops.aten.convolution_backward(
            dy, x, _recompute(ctx.impl, weight, t, ctx.kern), [weight.shape[0]] if has_b else None,
            list(stride), list(padding), list(dilation), False, [0, 0], groups, [need_x, want_gw, want_gb],
        )
        dw = db = dmix = dbmix = None
        if want_gw:
            dw, dmix = _eager_backward(ctx.impl, gw, weight, mix, ctx.kern, ctx.mix_dtype, need_w, need_mix)
        if want_gb:
            if bias_mix is not None:
                db, dbmix = _eager_backward(ctx.impl, gb, bias, bias_mix, ctx.bkern, ctx.bmix_dtype,
                                            need_b, need_bmix)
            else:
                db = gb
        return (gi if need_x else None), (dw if need_w else None), (db if need_b else None), dmix, dbmix, \
            None, None, None, None


def entangled_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mix: torch.Tensor,
    layout: Layout,
    *,
    bias_mix: torch.Tensor | None = None,
    bias_layout: Layout | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, superpose(weight, mix, layout), b_mix, stride, padding, dilation,
    groups)`` with ``b_mix = superpose(bias, bias_mix, bias_layout)`` (or ``bias``
    itself when ``bias_layout`` is None).

    Args:
        x: ``[N, C_in, H, W]`` at the max input width.
        weight: ``[C_out, C_in / groups, kh, kw]``, ``layout.shape == weight.shape``.
        mix: the weight layout's ``[K]`` candidate weights.
        bias_mix, bias_layout: the bias's candidate weights and layout (both or neither).
        stride, padding, dilation: ints or pairs of ints (no string padding).
        backend: the superpose backend (None: automatic).
    """
    if weight.dim() != 4:
        raise ValueError(f"weight: expected a 4-D [out, in/groups, kh, kw] tensor, got shape {tuple(weight.shape)}")
    if (bias_mix is None) != (bias_layout is None):
        raise ValueError("bias_mix and bias_layout: give both or neither")
    if bias_layout is not None and bias is None:
        raise ValueError("bias_layout given but bias is None")
    _check_backend(backend)
    conv = (_pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), int(groups))
    _check_inputs(weight, mix, layout)
    if bias_layout is not None:
        _check_inputs(bias, bias_mix, bias_layout)
    name = backends.resolve("superpose", backend, weight.device)
    if name != "reference":
        refuse_functorch("entangled_conv2d", name, x, weight, bias, mix, bias_mix)
    if _layer_node_route(name, x, weight, bias, (x, weight, bias, mix, bias_mix)):
        return _ConvFn.apply(x, weight, bias, mix, bias_mix, layout, bias_layout, name, conv)
    w = superpose(weight, mix, layout, backend=backend)
    b = bias
    if bias_layout is not None:
        b = superpose(bias, bias_mix, bias_layout, backend=backend)
    return F.conv2d(x, w, b, *conv)

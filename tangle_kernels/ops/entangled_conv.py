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
from .superpose import _check_inputs, _eager_forward, _layer_node_route, _mix_grad, superpose


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(a, int) for a in v):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")
    return v


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mix, bias_mix, layout, bias_layout, name, conv):
        stride, padding, dilation, groups = conv
        w_mix, t, tabs, B = _eager_forward(weight, mix, layout, name)
        b_mix, tb = bias, None
        if bias is not None and bias_layout is not None:
            b_mix, tb, btabs, Bb = _eager_forward(bias, bias_mix, bias_layout, name)
            ctx.btabs, ctx.Bb, ctx.bshape = btabs, Bb, (bias_layout.rows, bias_layout.cols)
            ctx.bmix_dtype = bias_mix.dtype
        y = F.conv2d(x, w_mix, b_mix, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight, t, bias, tb)
        ctx.impl, ctx.tabs, ctx.B, ctx.mix_dtype = backends.get(name), tabs, B, mix.dtype
        ctx.shape2d, ctx.conv = (layout.rows, layout.cols), conv
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, t, bias, tb = ctx.saved_tensors
        need_x, need_w, need_b, need_mix, need_bmix = ctx.needs_input_grad[:5]
        stride, padding, dilation, groups = ctx.conv
        has_b = bias is not None
        want_gw = need_w or need_mix
        want_gb = has_b and (need_b or need_bmix)
        w_mix = ctx.impl.forward(weight.reshape(ctx.shape2d), t, ctx.tabs).view(weight.shape)
        gi, gw, gb = torch.ops.aten.convolution_backward(
            dy, x, w_mix, [weight.shape[0]] if has_b else None, list(stride), list(padding),
            list(dilation), False, [0, 0], groups, [need_x, want_gw, want_gb],
        )
        del w_mix
        dw = db = dmix = dbmix = None
        if want_gw:
            dw, p = ctx.impl.backward(gw.reshape(ctx.shape2d), weight.reshape(ctx.shape2d), t, ctx.tabs)
            dw = dw.view(weight.shape)
            if need_mix:
                dmix = _mix_grad(ctx.B, p, ctx.mix_dtype)
        if want_gb:
            if tb is not None:
                db, pb = ctx.impl.backward(gb.view(ctx.bshape), bias.view(ctx.bshape), tb, ctx.btabs)
                db = db.view(bias.shape)
                if need_bmix:
                    dbmix = _mix_grad(ctx.Bb, pb, ctx.bmix_dtype)
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
    conv = (_pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), int(groups))
    _check_inputs(weight, mix, layout)
    if bias_layout is not None:
        _check_inputs(bias, bias_mix, bias_layout)
    name = backends.resolve(backend, weight.device)
    if _layer_node_route(name, x, weight, bias, (x, weight, bias, mix, bias_mix)):
        return _ConvFn.apply(x, weight, bias, mix, bias_mix, layout, bias_layout, name, conv)
    w = superpose(weight, mix, layout, backend=backend)
    b = bias
    if bias_layout is not None:
        b = superpose(bias, bias_mix, bias_layout, backend=backend)
    return F.conv2d(x, w, b, *conv)

"""What every op's autograd node shares: the second-order route and the refusal of
``torch.func`` transforms.

Second order. A node's kernels return gradients without a graph. When a graph is
requested (``create_graph=True``, i.e. grad mode is on inside ``backward``), the node
instead differentiates its plain composition (the op's oracle in backends/reference.py,
or a differentiable form of the same op) from the saved inputs, with
``torch.autograd.grad(..., create_graph=True)``: the returned gradients then carry
their graph, and second derivatives equal the composition's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def refuse_functorch(op: str, backend: str, *tensors) -> None:
    """Raise a clear error when a ``torch.func`` transform (vmap, grad, jacrev, ...)
    wraps one of ``tensors``: the kernels read raw data pointers."""
    if _wrapped is None or torch.compiler.is_compiling():
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and _wrapped(t):
            raise RuntimeError(
                f"{op}: torch.func transforms (vmap, grad, jacrev, ...) are not supported by "
                f"the {backend!r} kernels; call it with backend='reference' (plain PyTorch) "
                "inside the transform, or use torch.autograd"
            )


def _vjp(fn: Callable, inputs: Sequence, wanted: Sequence[bool], couts: Sequence,
         create_graph: bool, detach: bool = True) -> list:
    """The partial derivatives of ``fn`` at ``inputs`` contracted with ``couts``, one per
    input (None where not ``wanted``). ``fn`` runs on detached leaf proxies of the
    inputs: the derivative in one input never runs through another (an input that is
    an ancestor of another, as a mix vector is of a layer's input, would otherwise be
    counted twice). ``detach=False``: the inputs are such leaves already (the proxies of
    an enclosing call, whose graph the result must keep)."""
    proxies = [(v.detach() if detach else v) if isinstance(v, torch.Tensor) else v for v in inputs]
    for v, w in zip(proxies, wanted):
        if w and not v.requires_grad:
            v.requires_grad_()
    idx = [i for i, w in enumerate(wanted) if w]
    out: list = [None] * len(inputs)
    with torch.enable_grad():
        ys = fn(*proxies)
    if isinstance(ys, torch.Tensor):
        ys = (ys,)
    pairs = [(y, g) for y, g in zip(ys, couts)
             if g is not None and isinstance(y, torch.Tensor) and y.requires_grad]
    if not idx or not pairs:
        return [None if not w else torch.zeros_like(v) for v, w in zip(inputs, wanted)]
    got = torch.autograd.grad([y for y, _ in pairs], [proxies[i] for i in idx],
                              [g for _, g in pairs], create_graph=create_graph, allow_unused=True)
    for i, g in zip(idx, got):
        out[i] = g if g is not None else torch.zeros_like(inputs[i])
    return out


class _Partials(torch.autograd.Function):
    """``(inputs, couts) -> the partial derivatives of fn contracted with couts`` as a
    node of its own, so that they are differentiable in the inputs and the couts (its
    backward is again a :func:`graph_backward`: any order)."""

    @staticmethod
    def forward(ctx, fn, wanted, n, *args):
        ctx.fn, ctx.wanted, ctx.n = fn, wanted, n
        ctx.save_for_backward(*args)
        got = _vjp(fn, args[:n], wanted, args[n:], create_graph=False)
        return tuple(g for g, w in zip(got, wanted) if w)

    @staticmethod
    def backward(ctx, *grads):
        args = ctx.saved_tensors
        fn, wanted, n = ctx.fn, ctx.wanted, ctx.n

        def partials(*a):  # the forward's outputs as a differentiable function of its args
            got = _vjp(fn, a[:n], wanted, a[n:], create_graph=True, detach=False)
            return tuple(g for g, w in zip(got, wanted) if w)

        return (None, None, None,
                *graph_backward(partials, args, ctx.needs_input_grad[3:], grads))


def graph_backward(fn: Callable, inputs: Sequence, needs: Sequence[bool], grads: Sequence):
    """The gradients of ``fn(*inputs)`` (a tensor or a sequence of tensors) for the
    upstream ``grads``: one entry per input, None where ``needs`` is False or the input
    is not a tensor. Partial derivatives (each input as an independent variable, as a
    node's backward must return them), with their graph when grad mode is on (a node's
    backward under ``create_graph=True``)."""
    wanted = tuple(bool(n) and isinstance(v, torch.Tensor) and v.requires_grad
                   for v, n in zip(inputs, needs))
    if not any(wanted):
        return [None] * len(inputs)
    if not torch.is_grad_enabled():
        return _vjp(fn, inputs, wanted, grads, create_graph=False)
    got = iter(_Partials.apply(fn, wanted, len(inputs), *inputs, *grads))
    return [next(got) if w else None for w in wanted]

"""Second-order DARTS: the unrolled architecture gradient (Liu et al. 2019, eq. 7-8)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..nn.base import set_arch
from .common import detach_arch

__all__ = ["unrolled_arch_grad"]


def unrolled_arch_grad(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    alphas: Sequence[torch.Tensor],
    sample_arch: Callable[[], Mapping[str, torch.Tensor]],
    train_batch,
    val_batch,
    xi: float,
    weight_decay: float = 0.0,
    r: float = 0.01,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Second-order DARTS architecture gradient (Liu et al. 2019, eq. 7-8).

    ``w' = w - xi * (dL_train(w, a)/dw + weight_decay * w)`` (a virtual SGD step), then

        d/da L_val(w', a)  ~=  dL_val(w', a)/da
                               - xi * (dL_train(w+, a)/da - dL_train(w-, a)/da) / (2 eps)

    with ``w+- = w +- eps * dL_val(w', a)/dw'``, ``eps = r / ||dL_val/dw'||``.
    ``sample_arch()`` returns the (deterministic, differentiable) arch for the current
    alphas. The model's weights are restored before returning. Returns
    ``(L_val(w', a), [gradient per alpha])``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    alphas = list(alphas)
    backup = [p.detach().clone() for p in params]
    try:
        set_arch(model, detach_arch(sample_arch()))
        lt = loss_fn(model, train_batch)
        g = torch.autograd.grad(lt, params, allow_unused=True)
        with torch.no_grad():
            for p, gi in zip(params, g):
                if gi is not None:
                    p.sub_(xi * (gi + weight_decay * p))
        set_arch(model, sample_arch())
        lv = loss_fn(model, val_batch)
        grads = torch.autograd.grad(lv, alphas + params, allow_unused=True)
        da = [
            gi if gi is not None else torch.zeros_like(a)
            for gi, a in zip(grads[: len(alphas)], alphas)
        ]
        dw = [
            gi if gi is not None else torch.zeros_like(p)
            for gi, p in zip(grads[len(alphas) :], params)
        ]
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in dw)) if dw else torch.tensor(0.0)
        eps = r / (float(norm) + 1e-12)

        def arch_grad_at(sign: float) -> list[torch.Tensor]:
            with torch.no_grad():
                for p, b, d in zip(params, backup, dw):
                    p.copy_(b).add_(d, alpha=sign * eps)
            set_arch(model, sample_arch())
            loss = loss_fn(model, train_batch)
            gs = torch.autograd.grad(loss, alphas, allow_unused=True)
            return [gi if gi is not None else torch.zeros_like(a) for gi, a in zip(gs, alphas)]

        gp = arch_grad_at(+1.0)
        gn = arch_grad_at(-1.0)
        out = [d - xi * (p_ - n_) / (2.0 * eps) for d, p_, n_ in zip(da, gp, gn)]
        return lv.detach(), out
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
        set_arch(model, None)


"""GDAS (Dong & Yang 2019): hard Gumbel-softmax with a straight-through gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...nn.arch import HardArch
from .base import Option, Sampler, linear_tau


def gumbel(a: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel(0, 1) noise of ``a``'s shape: ``-log(-log U)``, U clamped inside (0, 1)."""
    u = torch.rand(a.shape, generator=generator, device=a.device, dtype=a.dtype)
    eps = torch.finfo(a.dtype).tiny
    return -torch.log(-torch.log(u.clamp(eps, 1.0 - 1e-7)))


class GDASSampler(Sampler):
    """GDAS: hard Gumbel-softmax. Forward: exactly one-hot ``one_hot(argmax(alpha + g))``;
    backward: the gradient of ``softmax((alpha + g) / tau)`` (straight-through), with
    ``tau`` annealed linearly from ``tau_max`` to ``tau_min`` over ``total_steps``."""

    name = "gdas"
    summary = "one_hot(argmax(alpha + Gumbel)), straight-through (GDAS)"
    order = 3
    hard = True
    options = (
        Option("tau_max", float, 10.0, "GDAS initial temperature", kwarg="tau_max",
               flag="--tau-max", check="positive"),
        Option("tau_min", float, 0.1, "GDAS final temperature", kwarg="tau_min",
               flag="--tau-min", check="positive"),
        Option("gdas_grad", str, "superposed", "GDAS architecture gradient: superposed (the "
               "one-hot sample's values on the superposed path: every candidate's entry) or "
               "sliced (the chosen candidate's sliced forward: its entry only)",
               kwarg="gdas_grad", choices=("sliced", "superposed")),
    )
    run_kwargs = ("total_steps",)

    def __init__(
        self, choices, *, tau_max: float = 10.0, tau_min: float = 0.1, total_steps: int = 1,
        gdas_grad: str = "superposed", **kw
    ):
        super().__init__(choices, **kw)
        if gdas_grad not in ("sliced", "superposed"):
            raise ValueError(f"gdas_grad={gdas_grad!r}: choose sliced or superposed")
        self.gdas_grad = gdas_grad
        if not (tau_max > 0 and tau_min > 0):
            raise ValueError(
                f"GDAS temperatures must be positive (tau_max={tau_max}, tau_min={tau_min})"
            )
        self.tau_max, self.tau_min, self.total_steps = (
            float(tau_max),
            float(tau_min),
            int(total_steps),
        )

    def tau(self, step: int) -> float:
        return linear_tau(step, self.total_steps, self.tau_max, self.tau_min)

    def sample(self, generator=None, step=0):
        tau = self.tau(step)
        weights, index = {}, {}
        for n, a in self.alphas.items():
            g = gumbel(a, generator)
            soft = F.softmax((a + g) / tau, dim=0)
            i = int(torch.argmax(a.detach() + g))
            hard = torch.zeros_like(soft)
            hard[i] = 1.0
            # hard + (soft - soft) is exactly ``hard`` in value (x - x == 0 in IEEE
            # arithmetic), while its gradient is the gradient of ``soft``.
            weights[n] = hard + (soft - soft.detach())
            index[n] = i
        return HardArch(weights, index)

    def for_arch_step(self, arch):
        """``gdas_grad=superposed``: the sample as a plain arch. Its values are the same
        one-hot ones (the forward is the chosen architecture's, zero-padded to the max
        size), but on the superposed path ``W_mix = sum_k h_k pad(slice_k(W))`` every
        entry ``h_k`` gets the gradient ``<dL/dW_mix, pad(slice_k(W))>``: how adding a
        little of candidate k would change the loss (TangleNAS's GDAS). The sliced path
        gives the chosen entry only (the gradient of its output's scale), which says
        nothing of the other candidates. Costs the max-size forward in the arch step;
        the weight step stays sliced."""
        if self.gdas_grad == "superposed" and isinstance(arch, HardArch):
            return dict(arch)
        return arch

    def probs(self):
        return {n: F.softmax(a.detach(), dim=0) for n, a in self.alphas.items()}

    def extra_metrics(self, step):
        return {"tau": self.tau(step)}

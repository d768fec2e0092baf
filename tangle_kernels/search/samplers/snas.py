"""SNAS (Xie et al. 2019): a soft Gumbel-softmax relaxation at a fixed temperature.

Every architecture step mixes the candidates with ``softmax((alpha + g) / tau)``,
``g ~ Gumbel(0, 1)``: a stochastic, differentiable relaxation (no straight-through
one-hot as in GDAS), whose samples approach one-hot as ``tau -> 0``.
"""

from __future__ import annotations

import torch.nn.functional as F

from .base import Option, Sampler
from .gdas import gumbel


class SNASSampler(Sampler):
    """SNAS: ``softmax((alpha + g) / tau)`` with ``g ~ Gumbel(0, 1)``; the reported
    probabilities are ``softmax(alpha)``."""

    name = "snas"
    summary = "softmax((alpha + Gumbel) / tau), soft (SNAS)"
    order = 5
    options = (
        Option("snas_tau", float, 1.0, "SNAS Gumbel-softmax temperature", kwarg="tau",
               flag="--snas-tau", check="positive"),
    )

    def __init__(self, choices, *, tau: float = 1.0, **kw):
        super().__init__(choices, **kw)
        if not tau > 0:
            raise ValueError(f"SNAS temperature must be positive (tau={tau})")
        self.tau = float(tau)

    def sample(self, generator=None, step=0):
        return {n: F.softmax((a + gumbel(a, generator)) / self.tau, dim=0)
                for n, a in self.alphas.items()}

    def probs(self):
        return {n: F.softmax(a.detach(), dim=0) for n, a in self.alphas.items()}

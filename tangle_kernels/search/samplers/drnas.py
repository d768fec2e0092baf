"""DrNAS (Chen et al. 2021): reparameterised Dirichlet samples of the mixture."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Option, Sampler


def _dirichlet_rsample(
    concentration: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Reparameterised Dirichlet sample ``g / sum(g)``, ``g_i ~ Gamma(c_i, 1)``.

    ``torch._standard_gamma`` takes an explicit generator and has an implicit
    reparameterisation gradient (d g / d c), so the sample is differentiable in c.
    The generator must live on the concentration's device.
    """
    g = torch._standard_gamma(concentration, generator=generator)
    tiny = torch.finfo(g.dtype).tiny
    g = g.clamp_min(tiny)
    return g / g.sum()


class DrNASSampler(Sampler):
    """DrNAS: ``w ~ Dirichlet(scale * (elu(alpha) + 1))`` with reparameterised samples;
    the reported probabilities are the Dirichlet mean ``c / sum(c)`` (independent of
    ``scale``).

    ``concentration_scale`` (DrNAS: 1) sets the sampling noise only: at ``alpha = 0`` the
    paper's Dirichlet(1, ..., 1) is uniform over the simplex, so each architecture step
    sees a random mixture and the alpha gradient is mostly noise until the
    concentrations have grown; a larger scale draws mixtures near the mean
    (variance ~ 1 / (scale * sum(c)))."""

    name = "drnas"
    summary = "Dirichlet(elu(alpha) + 1), reparameterised (DrNAS)"
    order = 2
    options = (
        Option(
            "drnas_concentration", float, 1.0,
            "DrNAS: Dirichlet concentration = value * (elu(alpha) + 1) (paper: 1); larger = "
            "less sampling noise around the same mean",
            kwarg="concentration_scale", check="positive",
        ),
    )

    def __init__(self, choices, *, concentration_scale: float = 1.0, **kw):
        super().__init__(choices, **kw)
        if not concentration_scale > 0:
            raise ValueError(f"concentration_scale={concentration_scale}: must be > 0")
        self.concentration_scale = float(concentration_scale)

    def concentration(self, a: torch.Tensor) -> torch.Tensor:
        return self.concentration_scale * (F.elu(a) + 1.0)

    def sample(self, generator=None, step=0):
        return {
            n: _dirichlet_rsample(self.concentration(a), generator) for n, a in self.alphas.items()
        }

    def probs(self):
        out = {}
        for n, a in self.alphas.items():
            c = self.concentration(a.detach())
            out[n] = c / c.sum()
        return out

"""DARTS with sparsemax (Martins & Astudillo 2016): sparse weights on the simplex."""

from __future__ import annotations

import torch

from .base import Sampler


def sparsemax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean projection of ``z`` onto the probability simplex.

    ``p_i = max(z_i - tau, 0)`` with ``tau`` chosen so that ``sum p = 1``: sort ``z``
    descending, ``k* = max{k : 1 + k z_(k) > sum_{j<=k} z_(j)}``,
    ``tau = (sum_{j<=k*} z_(j) - 1) / k*``. Written with differentiable torch ops, so
    autograd yields the sparsemax Jacobian ``diag(s) - s s^T / |s|`` (s = support).
    """
    zs, _ = torch.sort(z, dim=dim, descending=True)
    n = z.shape[dim]
    shape = [1] * z.dim()
    shape[dim] = n
    k = torch.arange(1, n + 1, device=z.device, dtype=z.dtype).view(shape)
    cs = zs.cumsum(dim)
    support = (1 + k * zs) > cs
    ksup = support.sum(dim=dim, keepdim=True).clamp_min(1)
    tau = (cs.gather(dim, ksup - 1) - 1) / ksup.to(z.dtype)
    return torch.clamp(z - tau, min=0)


class SparsemaxSampler(Sampler):
    """DARTS with sparsemax: sparse weights that sum to 1 (some candidates get 0, so
    their weights get no gradient: DDP must look for unused parameters)."""

    name = "sparsemax"
    summary = "sparsemax(alpha): sparse simplex weights"
    order = 1
    supports_unrolled = True
    ddp_find_unused = True

    def sample(self, generator=None, step=0):
        return {n: sparsemax(a) for n, a in self.alphas.items()}

    def probs(self):
        return {n: sparsemax(a.detach()) for n, a in self.alphas.items()}

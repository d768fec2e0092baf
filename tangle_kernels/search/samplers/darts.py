"""DARTS (Liu et al. 2019): ``softmax(alpha)`` per choice, exact gradient."""

from __future__ import annotations

import torch.nn.functional as F

from .base import Sampler


class DartsSampler(Sampler):
    """DARTS: ``softmax(alpha)`` per choice."""

    name = "darts"
    summary = "softmax(alpha) (DARTS)"
    order = 0
    supports_unrolled = True

    def sample(self, generator=None, step=0):
        return {n: F.softmax(a, dim=0) for n, a in self.alphas.items()}

    def probs(self):
        return {n: F.softmax(a.detach(), dim=0) for n, a in self.alphas.items()}

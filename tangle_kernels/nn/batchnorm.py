"""EntangledBatchNorm2d: BatchNorm2d over a channel count that is a choice (the
companion of :class:`~tangle_kernels.nn.EntangledConv2d`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import Layout
from ..ops.superpose import superpose
from . import plain
from .arch import HardArch
from .base import EntangledModule
from .spec import Spec, WidthSpec

__all__ = ["EntangledBatchNorm2d"]


class EntangledBatchNorm2d(EntangledModule):
    """BatchNorm2d whose number of channels is a choice.

    BatchNorm normalises every channel on its own, so one BN at the max width computes
    every candidate's channels exactly; the affine ``weight``/``bias`` are superposed::

        y = batch_norm(x, running stats [C_max], superpose(gamma), superpose(beta))

    Channels beyond every candidate get ``gamma_mix = beta_mix = 0`` (the padded-sum
    formulation), so they output 0. Running statistics live at the max width and are
    updated for every channel in the soft path (channels the previous padded layer
    zeroes see zero input). Without ``affine`` there is nothing to superpose: the soft
    path is the max-width BN.

    HardArch: ``pad(batch_norm(x[:, :c], running stats[:c], s gamma[:c], s beta[:c]))``;
    in training it updates only the first ``c`` entries of the running statistics.
    Arguments as ``nn.BatchNorm2d`` (``num_features`` is a width spec).
    """

    def __init__(
        self,
        num_features: Spec,
        choices: Mapping[str, Sequence] | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.spec = WidthSpec(num_features, choices, "num_features")
        self.names = self.spec.names
        self.choices = dict(self.spec.choices)
        self.num_features = C = self.spec.max
        self.eps, self.momentum = eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        fk = dict(device=device, dtype=dtype)
        if affine:
            self.weight = nn.Parameter(torch.ones(C, **fk))
            self.bias = nn.Parameter(torch.zeros(C, **fk))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(C, **fk))
            self.register_buffer("running_var", torch.ones(C, **fk))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.layout = (
            Layout.grid((C,), self.choices, lambda **v: [(0, self.spec.size(v))])
            if self.names
            else None
        )

    @classmethod
    def from_module(
        cls,
        layer: nn.BatchNorm2d,
        choices: Mapping[str, Sequence] | None = None,
        *,
        num_features: Spec | None = None,
    ) -> EntangledBatchNorm2d:
        """The entangled version of ``layer`` sharing its parameters and buffers."""
        if not isinstance(layer, nn.BatchNorm2d):
            raise TypeError(f"layer: expected an nn.BatchNorm2d, got {type(layer).__name__}")
        nf = layer.num_features if num_features is None else num_features
        from .linear import _check_max

        _check_max(WidthSpec(nf, choices, "num_features"), layer.num_features, "num_features")
        new = cls(
            nf,
            choices,
            layer.eps,
            layer.momentum,
            layer.affine,
            layer.track_running_stats,
            device="meta",
        )
        new.weight, new.bias = layer.weight, layer.bias
        new.running_mean, new.running_var = layer.running_mean, layer.running_var
        new.num_batches_tracked = layer.num_batches_tracked
        new.train(layer.training)
        return new

    def _bn(self, x, rm, rv, w, b):
        eaf = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            eaf = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None)
        use_stats = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            rm if use_stats else None,
            rv if use_stats else None,
            w,
            b,
            bn_training,
            eaf,
            self.eps,
        )

    def forward(
        self, x: torch.Tensor, arch: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``x [N, C_max, H, W] -> [N, C_max, H, W]`` (see the class docstring)."""
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D [N, C, H, W] input, got shape {tuple(x.shape)}")
        arch = self._resolve(arch)
        w, b = self.weight, self.bias
        if arch is None or not self.names:
            return self._bn(x, self.running_mean, self.running_var, w, b)
        if isinstance(arch, HardArch):
            c = self.spec.size(self._selection(arch, self.names))
            rm = self.running_mean[:c] if self.running_mean is not None else None
            rv = self.running_var[:c] if self.running_var is not None else None
            s = self._scale(arch, self.names, x.dtype)
            if w is not None:
                w, b = w[:c], b[:c]
                if s is not None:
                    w, b = w * s, b * s
            y = self._bn(x[:, :c], rm, rv, w, b)
            if w is None and s is not None:
                y = y * s
            return F.pad(y, (0, 0, 0, 0, 0, self.num_features - c)) if c < self.num_features else y
        mix = self._mix(arch, self.names)
        if w is not None:
            w = superpose(w, mix, self.layout)
            b = superpose(b, mix, self.layout)
        return self._bn(x, self.running_mean, self.running_var, w, b)

    def extract(self, selection: Mapping[str, Any]) -> nn.BatchNorm2d:
        """``nn.BatchNorm2d(c)`` with the sliced affine parameters and running stats."""
        c = self.spec.size(self._values(selection, self.names))
        dev = (
            self.running_mean.device
            if self.running_mean is not None
            else (self.weight.device if self.weight is not None else None)
        )
        bn = plain.BatchNorm2d(
            c, self.eps, self.momentum, self.affine, self.track_running_stats, device=dev
        )
        with torch.no_grad():
            if self.affine:
                bn.weight.copy_(self.weight[:c])
                bn.bias.copy_(self.bias[:c])
            if self.track_running_stats:
                bn.running_mean.copy_(self.running_mean[:c])
                bn.running_var.copy_(self.running_var[:c])
                bn.num_batches_tracked.copy_(self.num_batches_tracked)
        bn.train(self.training)
        return bn

    def extra_repr(self) -> str:
        return (
            f"num_features={self.spec.spec!r} (max {self.num_features}), eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

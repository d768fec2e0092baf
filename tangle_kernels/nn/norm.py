"""EntangledLayerNorm: LayerNorm over a width that is a choice."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends.reference import mixed_xhat
from ..layout import Layout
from ..ops.mixed_layernorm import entangled_layer_norm
from . import plain
from .arch import HardArch
from .base import EntangledModule
from .spec import Spec, WidthSpec

__all__ = ["EntangledLayerNorm"]


class EntangledLayerNorm(EntangledModule):
    """LayerNorm over the last dimension, whose width ``c`` is a choice; each candidate
    normalises over ITS OWN prefix ``x[..., :c]`` (as the sub-network does).

    Soft arch: the activation-level superposition of the candidates (the oracle)::

        y = sum_k mix_k * pad(layer_norm(x[..., :c_k], w[:c_k], b[:c_k]))
          = w * xhat_mix + superpose(b, mix)
        xhat_mix[j] = sum_k mix_k [j < c_k] (x[j] - mu_k) * rstd_k
                    = x[j] * A[seg(j)] - B[seg(j)]

    with ``A = sum_k mix_k rstd_k [seg in k]``, ``B = sum_k mix_k mu_k rstd_k [seg in k]``
    per segment of the width (the cells of the 1-D layout), computed for all K
    candidates in one pass over ``x`` (backends/reference.py ``mixed_xhat``). The
    weight ``w`` multiplies the already mixed ``xhat_mix``, which is the same as
    superposing it; the bias is superposed with :func:`superpose`. The op
    (:func:`tangle_kernels.ops.mixed_layernorm.entangled_layer_norm`) routes it: one
    autograd node of C++ kernels on CPU (float32/float64, eager), the composition above
    elsewhere (and as its oracle).

    HardArch: ``pad(s * layer_norm(x[..., :c], w[:c], b[:c]))``. No arch: the plain
    max-width LayerNorm. Arguments as ``nn.LayerNorm`` (``normalized_shape`` is a width
    spec of the last dimension only).
    """

    def __init__(
        self,
        normalized_shape: Spec,
        choices: Mapping[str, Sequence] | None = None,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if (
            isinstance(normalized_shape, (tuple, list))
            and len(normalized_shape) == 1
            and isinstance(normalized_shape[0], numbers.Integral)
        ):
            normalized_shape = int(normalized_shape[0])
        self.spec = WidthSpec(normalized_shape, choices, "normalized_shape")
        self.names = self.spec.names
        self.choices = dict(self.spec.choices)
        self.normalized_shape = (self.spec.max,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        D = self.spec.max
        fk = dict(device=device, dtype=dtype)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(D, **fk))
            if bias:
                self.bias = nn.Parameter(torch.zeros(D, **fk))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._build_layout()

    def _build_layout(self) -> None:
        self.layout = None
        if not self.names:
            return
        D = self.spec.max
        self.layout = lay = Layout.grid((D,), self.choices, lambda **v: [(0, self.spec.size(v))])
        cuts = lay.cuts[0]
        self.widths = [hi for ((lo, hi),) in lay.boxes]  # one box per candidate
        self.segments = [(cuts[j], cuts[j + 1]) for j in range(len(cuts) - 1)]
        # Candidate k's prefix ends after segment end_seg[k].
        self.register_buffer(
            "_end_seg", torch.tensor([cuts.index(c) - 1 for c in self.widths]), persistent=False
        )
        self.register_buffer(
            "_widths", torch.tensor(self.widths, dtype=torch.long), persistent=False
        )
        self.c_min = min(self.widths)

    @classmethod
    def from_module(
        cls,
        layer: nn.LayerNorm,
        choices: Mapping[str, Sequence] | None = None,
        *,
        normalized_shape: Spec | None = None,
    ) -> EntangledLayerNorm:
        """The entangled version of ``layer`` sharing its parameters."""
        if not isinstance(layer, nn.LayerNorm):
            raise TypeError(f"layer: expected an nn.LayerNorm, got {type(layer).__name__}")
        if len(layer.normalized_shape) != 1:
            raise ValueError(
                f"layer: normalized_shape={tuple(layer.normalized_shape)}; only a "
                "LayerNorm over the last dimension can be entangled"
            )
        D = layer.normalized_shape[0]
        ns = D if normalized_shape is None else normalized_shape
        from .linear import _check_max

        _check_max(WidthSpec(ns, choices, "normalized_shape"), D, "normalized_shape")
        has_bias = layer.bias is not None
        new = cls(ns, choices, layer.eps, layer.elementwise_affine, bias=has_bias, device="meta")
        new.weight, new.bias = layer.weight, layer.bias
        return new

    # ------------------------------------------------------------------ forward
    def mixed_xhat(self, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """``xhat_mix = sum_k mix_k pad((x[..., :c_k] - mu_k) rstd_k)`` in the dtype of x
        (see the class docstring)."""
        return mixed_xhat(x, mix, self.layout, self.eps)

    def forward(
        self, x: torch.Tensor, arch: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``x [..., D_max] -> [..., D_max]`` (see the class docstring)."""
        D = self.spec.max
        if x.shape[-1] != D:
            raise ValueError(f"x: last dimension {x.shape[-1]} != normalized width {D}")
        arch = self._resolve(arch)
        if arch is None or not self.names:
            return F.layer_norm(x, (D,), self.weight, self.bias, self.eps)
        if isinstance(arch, HardArch):
            c = self.spec.size(self._selection(arch, self.names))
            w = self.weight[:c] if self.weight is not None else None
            b = self.bias[:c] if self.bias is not None else None
            s = self._scale(arch, self.names, x.dtype)
            y = F.layer_norm(x[..., :c], (c,), w, b, self.eps)
            if s is not None:
                y = y * s
            return F.pad(y, (0, D - c)) if c < D else y
        mix = self._mix(arch, self.names)
        return entangled_layer_norm(x, self.weight, self.bias, mix, self.layout, self.eps)

    def extract(self, selection: Mapping[str, Any]) -> plain.LayerNorm:
        """``nn.LayerNorm(c)`` with the sliced affine parameters copied."""
        c = self.spec.size(self._values(selection, self.names))
        p = self.weight
        ln = plain.LayerNorm(
            c,
            self.eps,
            self.elementwise_affine,
            bias=self.bias is not None,
            device=p.device if p is not None else None,
            dtype=p.dtype if p is not None else None,
        )
        with torch.no_grad():
            if self.weight is not None:
                ln.weight.copy_(self.weight[:c])
            if self.bias is not None:
                ln.bias.copy_(self.bias[:c])
        return ln

    def extra_repr(self) -> str:
        return (
            f"normalized_shape={self.spec.spec!r} (max {self.spec.max}), eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}"
        )

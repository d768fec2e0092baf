"""EntangledLinear: a linear layer whose in/out widths are choices."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import Layout
from ..ops.entangled_linear import bias_layout, entangled_linear
from ..ops.superpose import superpose
from . import plain
from .arch import HardArch
from .base import EntangledModule
from .spec import Spec, WidthSpec, ordered_union

__all__ = ["EntangledLinear"]


class EntangledLinear(EntangledModule):
    """``y = x @ W^T + b`` with in/out widths chosen by name (width specs, see
    :mod:`tangle_kernels.nn.spec`).

    Args:
        in_features, out_features: width specs (int, choice name, or tuple of names and
            ints whose product is the width).
        choices: ``{name: values}`` of the choices the specs name.
        bias: whether the layer has a bias.
        out_segments: ``S`` stacked output blocks (``S = 3`` for a q | k | v projection):
            the weight is ``[S * out_max, in_max]`` and a candidate of width ``o`` keeps
            the first ``o`` rows of every block.

    Parameters: ``weight [S*out_max, in_max]``, ``bias [S*out_max]`` (nn.Linear's
    initialisation). ``weight_layout`` is ``Layout.grid`` over the names of both specs,
    ``bias_layout`` over the names of ``out_features`` only.

    Soft arch (the padded-sum oracle it equals)::

        W_mix = sum_k mix_k * pad(W[rows_k, :in_k])     mix = outer product of arch[n],
        b_mix = sum_j mixb_j * pad(b[rows_j])                 n in weight / bias names
        y     = x @ W_mix^T + b_mix                      (x at the max input width)

    computed by :func:`tangle_kernels.ops.entangled_linear.entangled_linear` (one GEMM
    at the max size; the bias goes through it when it depends on the same choices as
    the weight, else it is superposed on its own).

    HardArch (one-hot): ``y = pad(x[..., :in] @ (s_w W[rows, :in])^T + s_b b[rows])``,
    a GEMM of the sub-network's size, where ``s_w`` (``s_b``) is the product of the
    chosen entries of the arch vectors the weight (bias) depends on: value 1, but
    their gradient is exactly the soft path's gradient for the chosen entries, and the
    other entries get none (GDAS). No arch: ``F.linear(x, W, b)``, the plain layer.
    """

    def __init__(
        self,
        in_features: Spec,
        out_features: Spec,
        choices: Mapping[str, Sequence] | None = None,
        bias: bool = True,
        *,
        out_segments: int = 1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_spec = WidthSpec(in_features, choices, "in_features")
        self.out_spec = WidthSpec(out_features, choices, "out_features")
        if int(out_segments) < 1:
            raise ValueError(f"out_segments={out_segments} must be >= 1")
        self.out_segments = S = int(out_segments)
        self.in_features = self.in_spec.max
        self.out_features = S * self.out_spec.max
        self.weight_names = ordered_union(self.in_spec.names, self.out_spec.names)
        self.choices = {**self.in_spec.choices, **self.out_spec.choices}
        self.choices = {n: self.choices[n] for n in self.weight_names}
        self.bias_names = tuple(n for n in self.weight_names if n in self.out_spec.names)
        self.weight = nn.Parameter(
            torch.empty(self.out_features, self.in_features, device=device, dtype=dtype)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        self._build_layouts()

    def _build_layouts(self) -> None:
        S, om = self.out_segments, self.out_spec.max

        def rows(v):
            o = self.out_spec.size(v)
            return [(s * om, s * om + o) for s in range(S)]

        def wbox(**v):
            i = self.in_spec.size(v)
            return [[r, (0, i)] for r in rows(v)] if S > 1 else [rows(v)[0], (0, i)]

        def bbox(**v):
            return [[r] for r in rows(v)] if S > 1 else [rows(v)[0]]

        self.weight_layout = (
            _intern(
                Layout.grid(
                    self.weight.shape, {n: self.choices[n] for n in self.weight_names}, wbox
                )
            )
            if self.weight_names
            else None
        )
        self.bias_layout = (
            Layout.grid((self.out_features,), {n: self.choices[n] for n in self.bias_names}, bbox)
            if self.bias_names and self.bias is not None
            else None
        )
        # entangled_linear superposes the bias with the weight's mix projected on dim 0:
        # the same thing exactly when the bias depends on the same choices.
        self._fused_bias = self.bias is not None and self.bias_names == self.weight_names
        if self._fused_bias and self.weight_layout is not None:
            bias_layout(self.weight_layout)  # build (and cache) it now (also fine while compiling)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation (fan-in of the max input width)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_module(
        cls,
        layer: nn.Linear,
        choices: Mapping[str, Sequence] | None = None,
        *,
        in_features: Spec | None = None,
        out_features: Spec | None = None,
        out_segments: int = 1,
    ) -> EntangledLinear:
        """The entangled version of ``layer``, sharing its parameters (the same
        ``nn.Parameter`` objects: ties and optimizer state are kept). Unspecified widths
        stay fixed at the layer's; every spec's max must equal the layer's size."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer: expected an nn.Linear, got {type(layer).__name__}")
        if out_segments < 1 or layer.out_features % out_segments:
            raise ValueError(
                f"out_segments={out_segments} must divide out_features={layer.out_features}"
            )
        ins = layer.in_features if in_features is None else in_features
        outs = layer.out_features // out_segments if out_features is None else out_features
        _check_max(WidthSpec(ins, choices, "in_features"), layer.in_features, "in_features")
        _check_max(
            WidthSpec(outs, choices, "out_features"),
            layer.out_features // out_segments,
            "out_features" + (f" / out_segments={out_segments}" if out_segments > 1 else ""),
        )
        new = cls(
            ins,
            outs,
            choices,
            bias=layer.bias is not None,
            out_segments=out_segments,
            device="meta",
        )
        new.weight = layer.weight
        new.bias = layer.bias
        return new

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, arch: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``x [..., in_max] -> [..., S*out_max]`` (see the class docstring)."""
        arch = self._resolve(arch)
        if arch is None or not self.weight_names:
            return F.linear(x, self.weight, self.bias)
        if isinstance(arch, HardArch):
            return self.forward_hard(x, arch)
        mix = self._mix(arch, self.weight_names)
        if self._fused_bias or self.bias is None:
            return entangled_linear(x, self.weight, self.bias, mix, self.weight_layout)
        y = entangled_linear(x, self.weight, None, mix, self.weight_layout)
        if self.bias_layout is None:
            return y + self.bias
        return y + superpose(self.bias, self._mix(arch, self.bias_names), self.bias_layout)

    def sliced(self, values: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sub-network's ``(weight [S*o, i], bias [S*o])`` views for ``values``."""
        i, o = self.in_spec.size(values), self.out_spec.size(values)
        S, om = self.out_segments, self.out_spec.max
        if S == 1:
            w = self.weight[:o, :i]
            b = self.bias[:o] if self.bias is not None else None
        else:
            w = self.weight.view(S, om, self.in_features)[:, :o, :i].reshape(S * o, i)
            b = self.bias.view(S, om)[:, :o].reshape(S * o) if self.bias is not None else None
        return w, b

    def forward_hard(
        self,
        x: torch.Tensor,
        arch: HardArch,
        *,
        sliced_input: bool = False,
        pad_output: bool = True,
    ) -> torch.Tensor:
        """The one-hot fast path. ``sliced_input``: ``x`` already has the candidate's
        input width; ``pad_output=False`` returns ``[..., S*o]`` unpadded."""
        vals = self._selection(arch, self.weight_names)
        w, b = self.sliced(vals)
        i, o = w.shape[1], w.shape[0] // self.out_segments
        s_w = self._scale(arch, self.weight_names, w.dtype)
        if s_w is not None:
            w = w * s_w
        if b is not None:
            s_b = self._scale(arch, self.bias_names, b.dtype) if self.bias_names else None
            if s_b is not None:
                b = b * s_b
        y = F.linear(x if sliced_input else x[..., :i], w, b)
        om = self.out_spec.max
        if not pad_output or o == om:
            return y
        if self.out_segments == 1:
            return F.pad(y, (0, om - o))
        lead = y.shape[:-1]
        y = F.pad(y.reshape(*lead, self.out_segments, o), (0, om - o))
        return y.reshape(*lead, self.out_features)

    # ------------------------------------------------------------------ extract
    def extract(self, selection: Mapping[str, Any]) -> plain.Linear:
        """``nn.Linear(in, S*out)`` with the sliced weights copied."""
        vals = self._values(selection, self.weight_names)
        w, b = self.sliced(vals)
        lin = plain.Linear(
            w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        return lin

    def extra_repr(self) -> str:
        seg = f", out_segments={self.out_segments}" if self.out_segments > 1 else ""
        return (
            f"in_features={self.in_spec.spec!r} (max {self.in_features}), "
            f"out_features={self.out_spec.spec!r} (max {self.out_spec.max}){seg}, "
            f"bias={self.bias is not None}"
        )


_LAYOUTS: dict = {}


def _intern(layout: Layout) -> Layout:
    """One Layout object per distinct layout: equal layers share one object, so its
    device tables and projections (the bias layout) are built and cached once."""
    return _LAYOUTS.setdefault(layout, layout)


def _check_max(spec: WidthSpec, size: int, what: str) -> None:
    """An existing layer's size must be the max candidate of the spec."""
    if spec.max > size:
        raise ValueError(
            f"{what}={spec.spec!r}: width {spec.max} is above the max {size} of the existing layer"
        )
    if spec.max < size:
        raise ValueError(
            f"{what}={spec.spec!r}: the largest candidate {spec.max} is smaller than the existing "
            f"layer's {size}; the max-size candidate must be the existing layer"
        )

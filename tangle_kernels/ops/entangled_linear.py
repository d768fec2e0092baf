"""entangled_linear: ``y = x @ W_mix^T + b_mix`` with ``W_mix = superpose(W, mix, layout)``.

The bias is superposed with the projection of the weight's layout on its output
dimension (dim 0). On CPU this is superpose + ``F.linear`` (the mask costs one
weight-sized pass, the GEMM dominates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import Layout
from .superpose import superpose

_BIAS_LAYOUTS: dict = {}


def bias_layout(layout: Layout) -> Layout:
    """The layout of the bias that goes with a ``(out, in)`` weight layout (cached)."""
    lay = _BIAS_LAYOUTS.get(layout)
    if lay is None:
        lay = layout.project([0])
        _BIAS_LAYOUTS[layout] = lay
    return lay


def entangled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mix: torch.Tensor,
    layout: Layout,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.linear(x, superpose(W, mix, layout), superpose(b, mix, bias_layout(layout)))``.

    Args:
        x: ``[..., in]`` input at the max input width.
        weight: ``[out, in]`` max-size weight; ``layout.shape == weight.shape``.
        bias: ``[out]`` or None.
        mix: ``[K]`` candidate weights.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [out, in] tensor, got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x: last dimension {x.shape[-1]} != weight's input features {weight.shape[1]}"
        )
    w_mix = superpose(weight, mix, layout, backend=backend)
    b_mix = None
    if bias is not None:
        b_mix = superpose(bias, mix, bias_layout(layout), backend=backend)
    return F.linear(x, w_mix, b_mix)

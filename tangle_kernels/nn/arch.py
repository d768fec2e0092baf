"""Architecture weights passed to entangled modules.

An *arch* is a mapping ``choice name -> 1-D tensor`` of weights over that choice's
values (the output of a sampler: softmax, sparsemax, Dirichlet, Gumbel, one-hot).
A layer whose candidates depend on several choices (embed dim x MLP ratio) uses
the flattened outer product of their weight vectors, in the order of its
``Layout.grid`` choices, as its candidate ``mix``.

:class:`HardArch` marks an arch whose every vector is one-hot (GDAS hard samples,
SPOS, a derived architecture) and carries the chosen indices, so modules can take
the sliced fast path without a device synchronisation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["HardArch", "candidate_mix", "hard_index", "one_hot_arch", "hard_as_soft"]


class HardArch(dict):
    """An arch whose vectors are all one-hot; ``index[name]`` is the chosen position.

    The vectors may still carry a straight-through gradient (GDAS): the chosen entry
    equals 1.0 in value, and modules scale their sliced output by it so its gradient
    reaches the architecture parameters.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], index: Mapping[str, int]):
        super().__init__(weights)
        missing = set(weights) - set(index)
        if missing:
            raise ValueError(f"HardArch: no index for choices {sorted(missing)}")
        self.index = dict(index)


def one_hot_arch(
    choices: Mapping[str, Sequence], selection: Mapping[str, object], device=None
) -> HardArch:
    """A :class:`HardArch` selecting ``selection[name]`` (a value of ``choices[name]``)."""
    weights, index = {}, {}
    for name, values in choices.items():
        values = list(values)
        if name not in selection:
            raise ValueError(f"selection: no value for choice {name!r}")
        v = selection[name]
        if v not in values:
            raise ValueError(f"selection[{name!r}]={v!r} is not one of {values}")
        i = values.index(v)
        w = torch.zeros(len(values), device=device)
        w[i] = 1.0
        weights[name], index[name] = w, i
    return HardArch(weights, index)


def candidate_mix(arch: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """The flattened outer product of ``arch[n]`` for ``n`` in ``names`` (last fastest)."""
    mix = None
    for n in names:
        if n not in arch:
            raise KeyError(f"arch: no weights for choice {n!r} (has {sorted(arch)})")
        v = arch[n]
        mix = v if mix is None else (mix[:, None] * v[None, :]).reshape(-1)
    if mix is None:
        raise ValueError("names: empty")
    return mix


def hard_index(arch: Mapping[str, torch.Tensor], names: Sequence[str]) -> int | None:
    """The flat candidate index when ``arch`` is a :class:`HardArch`, else None."""
    if not isinstance(arch, HardArch):
        return None
    idx = 0
    for n in names:
        idx = idx * arch[n].shape[0] + arch.index[n]
    return idx


def hard_as_soft(arch: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A :class:`HardArch` as a plain (soft) arch that computes the same thing on the
    soft path: each vector times its one-hot mask, so its values are the one-hot
    values and only the chosen entry carries a gradient (exactly the gradient the
    sliced path gives it: the soft path's gradient of the chosen candidate). Any other
    arch is returned unchanged.

    The soft path runs at the max size whatever the selection, so under
    ``torch.compile`` every selection shares one graph (the sliced path specialises
    on the selection: one graph per sampled architecture). Differences from the
    sliced path: it costs the max-size forward, and an ``EntangledBatchNorm2d`` in
    training updates the running statistics of every channel (as with a soft arch)."""
    if not isinstance(arch, HardArch):
        return arch
    out = {}
    for n, v in arch.items():
        mask = torch.zeros_like(v, requires_grad=False)
        mask[arch.index[n]] = 1.0
        out[n] = v * mask
    return out

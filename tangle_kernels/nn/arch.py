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

import numbers
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "HardArch",
    "candidate_mix",
    "check_arch",
    "end_index",
    "hard_index",
    "is_sized",
    "one_hot_arch",
    "hard_as_soft",
]


def check_arch(arch, where: str = "arch") -> None:
    """A TypeError / ValueError naming the choice unless ``arch`` is None or a mapping
    ``name (str) -> 1-D floating tensor`` (a :class:`HardArch`'s indices are checked
    when it is built)."""
    if arch is None:
        return
    if not isinstance(arch, Mapping):
        raise TypeError(f"{where}: expected a mapping name -> tensor or None, got "
                        f"{type(arch).__name__}")
    for n, v in arch.items():
        if not isinstance(n, str):
            raise TypeError(f"{where}: choice names are strings, got {n!r}")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{where}[{n!r}]: expected a 1-D tensor of weights over the "
                            f"choice's values, got {type(v).__name__} (torch.tensor(...) it)")
        if v.dim() != 1 or v.numel() == 0:
            raise ValueError(f"{where}[{n!r}]: expected a non-empty 1-D tensor, got shape "
                             f"{tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{where}[{n!r}]: expected floating-point weights, got {v.dtype}")


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
        check_arch(weights, "HardArch")
        for n, v in weights.items():
            i = index[n]
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                if isinstance(i, torch.Tensor) and i.numel() == 1 and not i.is_floating_point():
                    i = int(i)
                else:
                    raise TypeError(f"HardArch: index of choice {n!r} must be an int, got "
                                    f"{type(i).__name__} {i!r}")
            k = v.shape[0]
            if not 0 <= i < k:
                raise ValueError(f"HardArch: index {i} of choice {n!r} is outside 0..{k - 1} "
                                 f"(the choice has {k} values)")
        self.index = {n: int(index[n]) for n in weights} | {
            n: i for n, i in index.items() if n not in weights
        }


def is_sized(values: Sequence) -> bool:
    """Whether a choice's values are sizes (all real numbers; a bool is a switch, not a
    size): the ones that have a largest and a smallest architecture."""
    return bool(values) and all(isinstance(x, numbers.Real) and not isinstance(x, bool)
                                for x in values)


def end_index(values: Sequence, end: str) -> int | None:
    """The index of a sized choice's largest (``end="max"``) or smallest (``"min"``)
    value; None for a choice that is not sized (:func:`is_sized`)."""
    if end not in ("max", "min"):
        raise ValueError(f"end={end!r}: 'max' or 'min'")
    values = list(values)
    if not is_sized(values):
        return None
    return values.index((max if end == "max" else min)(values))


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


def hard_as_soft(arch: Mapping[str, torch.Tensor], model=None) -> Mapping[str, torch.Tensor]:
    """A :class:`HardArch` as a plain (soft) arch that computes the same thing on the
    soft path: each vector times its one-hot mask, so its values are the one-hot
    values and only the chosen entry carries a gradient (exactly the gradient the
    sliced path gives it: the soft path's gradient of the chosen candidate). With
    ``model``, the entries its modules' sliced paths also pass a gradient to
    (``straight_through_entries``: a DepthMixer's shallower depths) keep theirs too.
    Any other arch is returned unchanged.

    The soft path runs at the max size whatever the selection, so under
    ``torch.compile`` every selection shares one graph (the sliced path specialises
    on the selection: one graph per sampled architecture). Differences from the
    sliced path: it costs the max-size forward, and an ``EntangledBatchNorm2d`` in
    training updates the running statistics of every channel (as with a soft arch)."""
    if not isinstance(arch, HardArch):
        return arch
    keep: dict[str, set[int]] = {}
    if model is not None:  # modules whose sliced path passes more entries' gradients
        for m in model.modules():
            f = getattr(m, "straight_through_entries", None)
            if f is not None:
                for n, idx in f(arch).items():
                    keep.setdefault(n, set()).update(idx)
    out = {}
    for n, v in arch.items():
        mask = torch.zeros_like(v, requires_grad=False)
        mask[arch.index[n]] = 1.0
        for i in keep.get(n, ()):
            mask[i] = 1.0  # value 0 on the one-hot: the same values, that entry's gradient
        out[n] = v * mask
    return out

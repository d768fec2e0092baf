"""The protocol every entangled module follows, and :func:`set_arch`.

- ``module.choices``: ``{name: values}`` of the choices the module depends on.
- ``module(x, arch=None)``: ``arch`` (mapping choice name -> 1-D weight tensor) if
  given, else the arch stored by :func:`set_arch`, else the max-size candidate (the
  module then computes exactly what the plain max-size layer computes).
  A plain dict is a *soft* arch: the weights are superposed (one forward pass). A
  :class:`~tangle_kernels.nn.arch.HardArch` takes the one-hot fast path: the sliced
  sub-network runs on the sliced input; every sliced parameter is multiplied by the
  chosen entries of the arch vectors it depends on (their value is 1.0), so a GDAS
  straight-through gradient reaches only the chosen candidate.
- Inputs and outputs are at the max width; the hard path zero-pads its output.
- ``module.extract(selection)``: a plain torch module of the chosen sub-network, the
  sliced weights copied (``selection``: name -> value, or a HardArch).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .arch import HardArch, candidate_mix

__all__ = ["EntangledModule", "set_arch", "get_arch", "accepts_arch"]


class EntangledModule(nn.Module):
    """Base class of the entangled modules (see the module docstring)."""

    choices: dict[str, tuple]

    def __init__(self) -> None:
        super().__init__()
        self.choices = {}
        self._arch: Mapping[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ arch
    def _resolve(self, arch: Mapping[str, torch.Tensor] | None):
        return arch if arch is not None else self._arch

    def _vectors(self, arch: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
        for n in names:
            if n not in arch:
                raise KeyError(
                    f"{type(self).__name__}: arch has no weights for choice {n!r} "
                    f"(it has {sorted(arch)})"
                )
            v = arch[n]
            if v.dim() != 1 or v.shape[0] != len(self.choices[n]):
                raise ValueError(
                    f"{type(self).__name__}: arch[{n!r}] must be a vector of length "
                    f"{len(self.choices[n])} (values {list(self.choices[n])}), got shape "
                    f"{tuple(v.shape)}"
                )

    def _mix(self, arch: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
        """The flattened outer product of ``arch[n]``, ``n in names`` (Layout.grid order)."""
        self._vectors(arch, names)
        return candidate_mix(arch, names)

    def _selection(self, arch: HardArch, names: Sequence[str]) -> dict[str, Any]:
        """The chosen value of each choice in ``names`` under a HardArch."""
        self._vectors(arch, names)
        return {n: self.choices[n][int(arch.index[n])] for n in names}

    @staticmethod
    def _scale(arch: HardArch, names: Sequence[str], dtype: torch.dtype) -> torch.Tensor | None:
        """Product of the chosen entries of ``arch[n]`` (value 1.0); None when no vector
        needs a gradient (then the product is 1 and multiplying would only cost time)."""
        vecs = [arch[n] for n in names]
        if not any(v.requires_grad for v in vecs):
            return None
        s = None
        for n, v in zip(names, vecs):
            e = v[int(arch.index[n])]
            s = e if s is None else s * e
        return s.to(dtype)

    def _values(self, selection: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
        """Chosen values from a selection (name -> value) or a HardArch, validated."""
        if isinstance(selection, HardArch):
            return self._selection(selection, names)
        out = {}
        for n in names:
            if n not in selection:
                raise ValueError(
                    f"{type(self).__name__}.extract: selection has no value for choice {n!r}"
                )
            v = selection[n]
            if v not in self.choices[n]:
                raise ValueError(
                    f"{type(self).__name__}.extract: selection[{n!r}]={v!r} is not one of "
                    f"{list(self.choices[n])}"
                )
            out[n] = v
        return out

    def max_selection(self) -> dict[str, Any]:
        """The selection of the max-size candidate (the largest value of every choice)."""
        return {n: max(v) for n, v in self.choices.items()}

    def extract(self, selection: Mapping[str, Any]) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def __deepcopy__(self, memo):
        # Arch tensors set by set_arch may be non-leaf tensors (which cannot be
        # deep-copied); a copy of a module never carries the arch of the original.
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        import copy

        for k, v in self.__dict__.items():
            if k == "_arch":
                new.__dict__[k] = None
            else:
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new


def set_arch(model: nn.Module, arch: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """Store ``arch`` in every entangled submodule of ``model`` (``None`` clears it:
    modules then run their max-size candidate). An ``arch`` passed to ``forward``
    takes precedence. Returns ``model``."""
    from .arch import check_arch

    check_arch(arch)
    for m in model.modules():
        if isinstance(m, EntangledModule):
            m._arch = arch
    return model


def get_arch(model: nn.Module) -> Mapping[str, torch.Tensor] | None:
    """The arch stored by :func:`set_arch` (of the first entangled submodule)."""
    for m in model.modules():
        if isinstance(m, EntangledModule):
            return m._arch
    return None


def accepts_arch(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes an ``arch`` argument (or ``**kwargs``)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
    return "arch" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

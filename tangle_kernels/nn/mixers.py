"""Choices that mix ACTIVATIONS: depth (DepthMixer) and the operation of an edge
(OpMixer)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import plain
from .arch import HardArch
from .base import EntangledModule, accepts_arch
from .spec import check_choices

__all__ = ["DepthMixer", "OpMixer"]


def _call(module: nn.Module, x, arch):
    return module(x, arch=arch) if arch is not None and accepts_arch(module) else module(x)


class DepthMixer(EntangledModule):
    """A stack of blocks whose depth is a choice: ``y = sum_i a_i * h_{d_i}`` where
    ``h_0 = x``, ``h_j = block_j(h_{j-1})`` and ``d_i`` are the depth values.

    Args:
        blocks: the blocks, in order (an ``nn.ModuleList`` or a sequence of modules).
            A block whose ``forward`` takes ``arch`` receives the arch given to this
            module's forward (blocks built from entangled modules also read the arch
            stored by :func:`set_arch`).
        depth: the name of the depth choice.
        choices: ``{depth: values}``; every value is an int in ``[0, len(blocks)]``.

    Soft arch: runs the first ``max(values)`` blocks once and mixes the outputs after
    each candidate depth.
    HardArch: runs only the first ``d`` blocks. With a straight-through gradient (GDAS)
    the output is ``sum_i w_i h_{d_i}`` over the depths ``d_i <= d`` (in value ``h_d``:
    the one-hot ``w``), so every depth the pass computes gets its gradient, not only the
    chosen one (whose gradient a final LayerNorm erases). No arch: all blocks up to
    the max depth. ``extract`` returns a :class:`~tangle_kernels.nn.plain.Depth` of the
    first ``d`` blocks, each extracted with the same selection.
    """

    def __init__(
        self, blocks: Sequence[nn.Module], depth: str, choices: Mapping[str, Sequence] | None = None
    ):
        super().__init__()
        if not isinstance(depth, str):
            raise TypeError(f"depth={depth!r}: expected the name of a choice (str)")
        self.blocks = blocks if isinstance(blocks, nn.ModuleList) else nn.ModuleList(blocks)
        if len(self.blocks) == 0:
            raise ValueError("blocks: empty list of blocks")
        vals = check_choices(choices, [depth], "depth", depth)[depth]
        for v in vals:
            if (
                isinstance(v, bool)
                or not isinstance(v, numbers.Integral)
                or not 0 <= v <= len(self.blocks)
            ):
                raise ValueError(
                    f"depth={depth!r}: depth {v!r} is not an int in "
                    f"[0, {len(self.blocks)}] (the number of blocks)"
                )
        self.depth = depth
        self.names = (depth,)
        self.choices = {depth: tuple(int(v) for v in vals)}
        self.max_depth = max(self.choices[depth])

    def forward(
        self, x: torch.Tensor, arch: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``x -> h_d`` mixed over the depth candidates (see the class docstring)."""
        given = arch
        arch = self._resolve(arch)
        if arch is None:
            for blk in self.blocks[: self.max_depth]:
                x = _call(blk, x, given)
            return x
        vals = self.choices[self.depth]
        if isinstance(arch, HardArch):
            d = self._selection(arch, self.names)[self.depth]
            w = arch[self.depth]
            if not w.requires_grad:  # SPOS, a derived architecture: the plain sub-network
                for blk in self.blocks[:d]:
                    x = _call(blk, x, given)
                return x
            # Straight-through (GDAS): y = sum_i w_i h_{d_i} over the depths d_i <= d, the
            # hidden states this pass computes anyway. In value y == h_d (the one-hot w has
            # exact zeros and one exact 1); the shallower depths still get their gradient
            # <dL/dy, h_{d_i}>, which a final LayerNorm does not erase (it erases the chosen
            # depth's: LayerNorm is invariant to the scale of h_d).
            y, h = None, x
            for j in range(d + 1):
                if j > 0:
                    h = _call(self.blocks[j - 1], h, given)
                for i, v in enumerate(vals):
                    if v == j:
                        t = h * w[i].to(h.dtype)
                        y = t if y is None else y + t
            return y
        self._vectors(arch, self.names)
        w = arch[self.depth]
        y = None
        h = x
        for j in range(self.max_depth + 1):
            if j > 0:
                h = _call(self.blocks[j - 1], h, given)
            for i, v in enumerate(vals):
                if v == j:
                    t = h * w[i].to(h.dtype)
                    y = t if y is None else y + t
        return y

    def straight_through_entries(self, arch: HardArch) -> dict[str, list[int]]:
        """The entries of the depth vector that get a gradient on the sliced path under
        ``arch`` (a HardArch with a straight-through gradient): every depth up to the
        chosen one (see :meth:`forward`). :func:`~tangle_kernels.nn.arch.hard_as_soft`
        keeps them, so the soft path at one-hot values gives the same gradients."""
        vals = self.choices[self.depth]
        d = vals[int(arch.index[self.depth])]
        return {self.depth: [i for i, v in enumerate(vals) if v <= d]}

    def extract(self, selection: Mapping[str, Any]) -> plain.Depth:
        """``Depth`` (an ``nn.Sequential``) of the first ``d`` blocks, each extracted."""
        from .convert import extract

        d = self._values(selection, self.names)[self.depth]
        return plain.Depth(*[extract(b, selection) for b in self.blocks[:d]])

    def extra_repr(self) -> str:
        return f"depth={self.depth!r} values={list(self.choices[self.depth])}"


class OpMixer(EntangledModule):
    """The weighted sum of candidate operations under one choice:
    ``y = sum_i a_i * op_i(x)`` (DARTS mixed edge).

    Args:
        ops: a mapping ``value -> module`` (the choice's values are its keys) or a
            sequence of modules (values ``0 .. n-1``).
        choice: the name of the choice.
        choices: optional ``{choice: values}``; if given, one value per op, in the order
            of ``ops``.

    Ops whose ``forward`` takes ``arch`` receive the arch. Soft arch: every op runs
    (ops with a zero weight too: checking for zeros would synchronise with the device).
    HardArch: only the chosen op runs, its output scaled by the chosen arch entry
    (value 1; the GDAS straight-through gradient). No arch: an op choice has no
    max-size candidate, so the module raises unless it has a single op. ``extract``
    returns the chosen op (extracted with the same selection).
    """

    def __init__(
        self,
        ops: Mapping[Any, nn.Module] | Sequence[nn.Module],
        choice: str,
        choices: Mapping[str, Sequence] | None = None,
    ):
        super().__init__()
        if not isinstance(choice, str):
            raise TypeError(f"choice={choice!r}: expected the name of a choice (str)")
        if isinstance(ops, Mapping):
            values, mods = tuple(ops.keys()), list(ops.values())
        else:
            mods = list(ops)
            values = tuple(range(len(mods)))
        if not mods:
            raise ValueError("ops: empty list of operations")
        for i, m in enumerate(mods):
            if not isinstance(m, nn.Module):
                raise TypeError(
                    f"ops[{values[i]!r}]: expected an nn.Module, got {type(m).__name__}"
                )
        if choices is not None and choice in choices:
            vals = check_choices(choices, [choice], "choice", choice)[choice]
            if len(vals) != len(mods):
                raise ValueError(f"choices[{choice!r}]: {len(vals)} values for {len(mods)} ops")
            values = vals
        if len(set(values)) != len(values):
            raise ValueError(f"choices[{choice!r}]: duplicate values in {list(values)}")
        self.ops = nn.ModuleList(mods)
        self.choice = choice
        self.names = (choice,)
        self.choices = {choice: tuple(values)}

    def forward(
        self, x: torch.Tensor, arch: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``sum_i arch[choice][i] * op_i(x)`` (see the class docstring)."""
        given = arch
        arch = self._resolve(arch)
        if arch is None:
            if len(self.ops) == 1:
                return _call(self.ops[0], x, given)
            raise ValueError(
                f"OpMixer({self.choice!r}): no arch given and none set with set_arch; an op "
                "choice has no max-size candidate"
            )
        if isinstance(arch, HardArch):
            self._vectors(arch, self.names)
            i = int(arch.index[self.choice])
            y = _call(self.ops[i], x, given)
            s = self._scale(arch, self.names, y.dtype)
            return y if s is None else y * s
        self._vectors(arch, self.names)
        w = arch[self.choice]
        y = None
        for i, op in enumerate(self.ops):
            t = _call(op, x, given)
            t = t * w[i].to(t.dtype)
            y = t if y is None else y + t
        return y

    def extract(self, selection: Mapping[str, Any]) -> nn.Module:
        """The chosen op, extracted with the same selection."""
        from .convert import extract

        v = self._values(selection, self.names)[self.choice]
        return extract(self.ops[list(self.choices[self.choice]).index(v)], selection)

    def max_selection(self) -> dict[str, Any]:
        raise ValueError(f"OpMixer({self.choice!r}): an op choice has no max-size candidate")

    def extra_repr(self) -> str:
        return f"choice={self.choice!r} values={list(self.choices[self.choice])}"

"""The named constructors of :class:`~tangle_kernels.layout.Layout` (prefix widths,
centred kernels, products, named grids, conv weights, q|k|v segments) and the range
helpers they share; all build the same ``Layout(shape, boxes, owners)``."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .layout import Layout

Range = tuple[int, int]


def _as_int(v, what: str) -> int:
    """``v`` as a Python int: ints, numpy integers, integer tensors of one element and
    floats of an integral value (``4.0``); anything else (``2.7``, a bool, a string)
    raises a TypeError instead of being floored."""
    if isinstance(v, (bool, np.bool_)) or isinstance(v, (str, bytes)):
        raise TypeError(f"{what}: expected an integer, got {type(v).__name__} {v!r}")
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{what}: expected an integer, got a tensor {v!r}")
        v = v.item()
    if isinstance(v, (float, np.floating)):
        if not float(v).is_integer():
            raise TypeError(f"{what}: expected an integer, got {v!r} (not floored silently)")
        return int(v)
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{what}: expected an integer, got {type(v).__name__} {v!r}") from None


def prefix_range(size: int, width: int, *, what: str = "width") -> Range:
    """The range ``[0, width)`` of a dimension of ``size``; checks ``0 < width <= size``."""
    width = _as_int(width, what)
    if not 0 < width <= size:
        raise ValueError(f"{what}={width} must be in [1, {size}] (the max size of that dimension)")
    return (0, width)


def centered_range(size: int, k: int, *, what: str = "kernel size") -> Range:
    """The centred window of length ``k`` inside ``size`` (a kxk kernel inside a 7x7 one).

    ``k`` must not exceed ``size`` and must have its parity, so the window is centred.
    """
    k = _as_int(k, what)
    if not 0 < k <= size:
        raise ValueError(f"{what}={k} must be in [1, {size}] (the max size of that dimension)")
    if (size - k) % 2:
        raise ValueError(
            f"{what}={k} cannot be centred inside {size}: sizes must have the same parity"
        )
    lo = (size - k) // 2
    return (lo, lo + k)


class NamedLayouts:
    """Mixin of :class:`~tangle_kernels.layout.Layout`: its named constructors."""

    @classmethod
    def product(cls, shape: Sequence[int], ranges: Sequence[Sequence[Range] | None]) -> Layout:
        """Cartesian product of per-dimension range choices (``None`` = the full dimension).

        Candidates are enumerated in ``itertools.product`` order (last dim fastest).
        """
        shape = tuple(_as_int(s, "shape") for s in shape)
        if len(ranges) != len(shape):
            raise ValueError(f"ranges: {len(ranges)} entries for a weight of rank {len(shape)}")
        per_dim = []
        for d, r in enumerate(ranges):
            if r is None:
                per_dim.append([(0, shape[d])])
            else:
                if len(r) == 0:
                    raise ValueError(f"ranges[{d}]: empty list of choices")
                per_dim.append([tuple(x) for x in r])
        boxes = list(itertools.product(*per_dim))
        return cls(shape, boxes, labels=boxes)

    @classmethod
    def prefix(cls, shape: Sequence[int], widths: Sequence[Sequence[int] | None]) -> Layout:
        """Prefix slices: per dimension a list of widths (first ``w`` entries) or ``None``.

        ``Layout.prefix((384, 384), [[128, 256, 384], [192, 384]])`` has K = 6.
        """
        shape = tuple(_as_int(s, "shape") for s in shape)
        if len(widths) != len(shape):
            raise ValueError(f"widths: {len(widths)} entries for a weight of rank {len(shape)}")
        ranges = [
            None if w is None else [prefix_range(shape[d], x, what=f"widths[{d}]") for x in w]
            for d, w in enumerate(widths)
        ]
        return cls.product(shape, ranges)

    @classmethod
    def grid(
        cls,
        shape: Sequence[int],
        choices: Mapping[str, Sequence[Any]],
        box_fn: Callable[..., Sequence],
    ) -> Layout:
        """Candidates from named choices: one per element of the cartesian product of
        ``choices`` (insertion order, last choice fastest). ``box_fn(**values)`` returns
        the candidate's box, or a list of disjoint boxes (a union).

        Example (GPT MLP up-projection, out = embed * ratio)::

            Layout.grid((3072, 768), {"embed": [192, 384, 768], "ratio": [2, 3, 4]},
                        lambda embed, ratio: [(0, embed * ratio), (0, embed)])
        """
        shape = tuple(_as_int(s, "shape") for s in shape)
        if not choices:
            raise ValueError("choices: need at least one named choice")
        names = list(choices)
        values = [list(choices[n]) for n in names]
        for n, v in zip(names, values):
            if len(v) == 0:
                raise ValueError(f"choices[{n!r}]: empty list of values")
        boxes, owners, labels = [], [], []
        for k, combo in enumerate(itertools.product(*values)):
            kw = dict(zip(names, combo))
            out = box_fn(**kw)
            out = list(out)
            if out and isinstance(out[0][0], (int, np.integer)):
                out = [out]  # a single box
            for b in out:
                boxes.append(b)
                owners.append(k)
            labels.append(kw)
        lay = cls(shape, boxes, owners, labels=labels)
        lay.choice_names = tuple(names)
        lay.choice_values = tuple(tuple(v) for v in values)
        return lay

    @classmethod
    def centered(
        cls, shape: Sequence[int], sizes: Sequence[int], dims: Sequence[int] = (-2, -1)
    ) -> Layout:
        """Centred windows of one size choice applied to all ``dims`` (3x3/5x5 inside 7x7)."""
        shape = tuple(_as_int(s, "shape") for s in shape)
        dims = [d % len(shape) for d in dims]

        def box(k):
            return [
                centered_range(shape[d], k, what="kernel size") if d in dims else (0, shape[d])
                for d in range(len(shape))
            ]

        return cls.grid(shape, {"kernel": list(sizes)}, lambda kernel: box(kernel))

    @classmethod
    def conv(
        cls,
        shape: Sequence[int],
        out_channels: Sequence[int] | None = None,
        in_channels: Sequence[int] | None = None,
        kernel_sizes: Sequence[int] | None = None,
    ) -> Layout:
        """Conv weight ``(O, I, kh, kw)``: out-channel x in-channel prefixes x centred kernels.

        Each argument ``None`` means that choice is fixed at the max. K is the product of
        the given choice counts (3 x 3 x 3 = 27 for a typical entangled conv).
        """
        shape = tuple(_as_int(s, "shape") for s in shape)
        if len(shape) != 4:
            raise ValueError(f"shape: a conv weight has rank 4 (O, I, kh, kw), got {shape}")
        n_out, n_in, kh, kw = shape
        ch = {
            "out": list(out_channels) if out_channels is not None else [n_out],
            "in": list(in_channels) if in_channels is not None else [n_in],
            "kernel": list(kernel_sizes) if kernel_sizes is not None else [max(kh, kw)],
        }
        if kernel_sizes is None and kh != kw:
            ch["kernel"] = [kh]

        def box(out, in_, kernel):
            return [
                prefix_range(n_out, out, what="out_channels"),
                prefix_range(n_in, in_, what="in_channels"),
                centered_range(kh, kernel) if kernel_sizes is not None else (0, kh),
                centered_range(kw, kernel) if kernel_sizes is not None else (0, kw),
            ]

        lay = cls.grid(shape, {"out": ch["out"], "in": ch["in"], "kernel": ch["kernel"]},
                       lambda out, **kw: box(out, kw["in"], kw["kernel"]))
        return lay

    @classmethod
    def segmented(
        cls,
        shape: Sequence[int],
        dim: int,
        num_segments: int,
        widths: Sequence[int],
        tie: Sequence[int] = (),
    ) -> Layout:
        """Stacked blocks (q | k | v) along ``dim``, each prefix-sliced by the same width.

        ``shape[dim]`` must be ``num_segments * seg``; candidate w keeps rows
        ``[s*seg, s*seg + w)`` of every segment s. Dimensions in ``tie`` are prefix-sliced
        with the same width (the input dim of a q|k|v projection).
        """
        shape = tuple(_as_int(s, "shape") for s in shape)
        dim = dim % len(shape)
        if num_segments <= 0 or shape[dim] % num_segments:
            raise ValueError(
                f"num_segments={num_segments} must divide shape[{dim}]={shape[dim]}"
            )
        seg = shape[dim] // num_segments
        tie = [t % len(shape) for t in tie]

        def boxes(width):
            prefix_range(seg, width, what="width")
            out = []
            for s in range(num_segments):
                b = []
                for d in range(len(shape)):
                    if d == dim:
                        b.append((s * seg, s * seg + width))
                    elif d in tie:
                        b.append(prefix_range(shape[d], width, what=f"width (tied dim {d})"))
                    else:
                        b.append((0, shape[d]))
                out.append(b)
            return out

        return cls.grid(shape, {"width": list(widths)}, lambda width: boxes(width))

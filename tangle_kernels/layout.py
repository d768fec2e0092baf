"""Layouts: the K candidate slices of one max-size weight, as boxes, and the cell
tables the kernels use (the math: docs/design.md; the kernels: csrc/README.md).

A candidate k is a box (one ``(lo, hi)`` range per dimension of the weight) or,
for segmented weights such as a stacked q|k|v projection, a union of disjoint
boxes. The superposition mask is ``M(mix)[i] = sum_k mix_k * [i in candidate k]``.

Cutting every dimension at each distinct ``lo``/``hi`` splits the tensor into a
small grid of cells on which M is constant. The kernels see the weight as an
``R x C`` matrix (the leading ``split`` dimensions are rows, the rest columns);
every row has a row group and every column a column group, and the cell of an
element is ``rowgrp[r] * ncg + colgrp[c]``. ``B[cell, k] = 1`` when the cell lies
inside candidate k, so the per-cell mask values are ``T = B @ mix``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._layout_named import NamedLayouts, _as_int, centered_range, prefix_range

Range = tuple[int, int]
Box = tuple[Range, ...]

__all__ = ["Layout", "prefix_range", "centered_range"]


# ------------------------------------------------------------ outside the trace
# A Layout is plain Python + numpy: dynamo cannot trace its construction (numpy
# arrays become tensors, ``tolist`` a data-dependent guard), and a lazily built
# derived object (a bias layout, device tables) would be a side effect of the trace.
# So while dynamo traces, every such build runs for real, once, outside the trace:
# ``_untraced(fn, *args)`` calls ``fn(*args)`` through ``assume_constant_result``
# (dynamo calls it at trace time with the real arguments) and hands the result back
# as an attribute of the module-level ``_BUILT`` holder, which dynamo then reads as an
# ordinary guarded global (ID_MATCH on the object; a returned Layout is used like one
# built before the trace). Its results are keyed by object identity, so the holder
# grows only with the distinct objects built during traces.


class _Built:
    """Holder of the objects built outside dynamo's trace (see ``_untraced``)."""


_BUILT = _Built()
_UNTRACED_DEPTH = [0]  # > 0 while an untraced build runs (inside a trace, for real)


def _tracing() -> bool:
    """True while dynamo traces this call (and not inside one of its untraced builds)."""
    return torch.compiler.is_compiling() and not _UNTRACED_DEPTH[0]


@torch.compiler.assume_constant_result
def _build_untraced(fn, *args) -> str:
    _UNTRACED_DEPTH[0] += 1
    try:
        obj = fn(*args)
    finally:
        _UNTRACED_DEPTH[0] -= 1
    key = f"_{id(obj)}"
    setattr(_BUILT, key, obj)
    return key


def _untraced(fn, *args):
    """``fn(*args)``; while dynamo traces, run for real outside the trace (above)."""
    if not _tracing():
        return fn(*args)
    return getattr(_BUILT, _build_untraced(fn, *args))


def _construct(cls, args, kwargs):
    obj = object.__new__(cls)
    obj.__init__(*args, **kwargs)
    return obj


def _pow2_align(values, cap: int = 128) -> int:
    """The largest power of two <= ``cap`` that divides every value (``cap`` for none)."""
    a = cap
    for v in np.asarray(values, dtype=np.int64).tolist():
        while a > 1 and v % a:
            a //= 2
    return a


class Layout(NamedLayouts):
    """K candidate slices of a weight of rank 1 to 4.

    ``Layout(shape, boxes)`` takes ``boxes``: one box per candidate, each a sequence of
    one ``(lo, hi)`` pair per dimension of ``shape`` (``0 <= lo < hi <= shape[d]``).
    With ``owners`` (one candidate index per box) a candidate may own several
    disjoint boxes (segmented weights); by default box j is candidate j.

    ``labels`` optionally names each candidate (e.g. a dict of choice values). Layouts
    built by :meth:`grid` also record ``choice_names`` and ``choice_values``: the
    candidates are then enumerated in ``itertools.product`` order of the choices, so
    the candidate mix is the flattened outer product of per-choice weights.

    Layouts are immutable and cheap to share; the kernel tables are built once and
    cached per device.

    Safe inside ``torch.compile`` (``fullgraph=True``): a Layout constructed, projected
    or asked for its device tables while dynamo traces is built for real outside the
    trace (the graph sees the finished object and its tables as constants/inputs).
    """

    _built = False  # set once __init__ has run (a Layout built outside a trace)

    def __new__(cls, *args, **kwargs):
        if args and _tracing():
            # Dynamo traces the construction: build it outside the trace; Python then
            # calls __init__ on the finished object, which returns at once.
            kw = tuple(sorted(kwargs.items()))
            return _untraced(_construct_kw, cls, args, kw)
        return super().__new__(cls)

    def __init__(
        self,
        shape: Sequence[int],
        boxes: Sequence[Sequence[Sequence[int]]],
        owners: Sequence[int] | None = None,
        *,
        labels: Sequence[Any] | None = None,
    ):
        if self._built:
            return
        shape = tuple(_as_int(s, "shape") for s in shape)
        if not 1 <= len(shape) <= 4:
            raise ValueError(f"shape: rank must be 1 to 4, got {len(shape)} ({shape})")
        if any(s <= 0 for s in shape):
            raise ValueError(f"shape: every dimension must be positive, got {shape}")
        if boxes is None or len(boxes) == 0:
            raise ValueError("boxes: empty candidate list (need at least one candidate)")
        norm: list[Box] = []
        for j, box in enumerate(boxes):
            if len(box) != len(shape):
                raise ValueError(
                    f"boxes[{j}]: has {len(box)} ranges but the weight has rank {len(shape)}"
                )
            rs = []
            for d, rng in enumerate(box):
                if len(rng) != 2:
                    raise ValueError(f"boxes[{j}][{d}]: expected a (lo, hi) pair, got {rng!r}")
                lo = _as_int(rng[0], f"boxes[{j}][{d}] lo")
                hi = _as_int(rng[1], f"boxes[{j}][{d}] hi")
                if lo >= hi:
                    raise ValueError(f"boxes[{j}][{d}]: lo={lo} >= hi={hi} (empty range)")
                if lo < 0 or hi > shape[d]:
                    raise ValueError(
                        f"boxes[{j}][{d}]: range [{lo}, {hi}) lies outside dimension {d} "
                        f"of size {shape[d]}"
                    )
                rs.append((lo, hi))
            norm.append(tuple(rs))
        if owners is None:
            owners = list(range(len(norm)))
        else:
            owners = [_as_int(o, "owners") for o in owners]
            if len(owners) != len(norm):
                raise ValueError(f"owners: length {len(owners)} != number of boxes {len(norm)}")
            if min(owners) < 0:
                raise ValueError("owners: candidate indices must be non-negative")
            missing = sorted(set(range(max(owners) + 1)) - set(owners))
            if missing:
                raise ValueError(f"owners: candidates {missing} own no box")
            _check_disjoint(norm, owners)
        self.shape: tuple[int, ...] = shape
        self.boxes: tuple[Box, ...] = tuple(norm)
        self.owners: tuple[int, ...] = tuple(owners)
        self.K: int = max(owners) + 1
        if labels is not None and len(labels) != self.K:
            raise ValueError(f"labels: length {len(labels)} != number of candidates {self.K}")
        self.labels = list(labels) if labels is not None else list(range(self.K))
        self.choice_names: tuple[str, ...] = ()
        self.choice_values: tuple[tuple[Any, ...], ...] = ()
        self._build_tables()
        self._device_cache: dict[tuple[str, int | None], dict[str, torch.Tensor]] = {}
        self._projections: dict[tuple[int, ...], Layout] = {}
        self._built = True

    # ------------------------------------------------------------------ tables
    def _build_tables(self) -> None:
        ndim = len(self.shape)
        cuts = []
        for d in range(ndim):
            c = {0, self.shape[d]}
            for box in self.boxes:
                c.update(box[d])
            cuts.append(np.array(sorted(c), dtype=np.int64))
        nseg = [len(c) - 1 for c in cuts]
        seg = [
            (np.searchsorted(cuts[d], np.arange(self.shape[d]), side="right") - 1).astype(np.int64)
            for d in range(ndim)
        ]
        # Split: rows = dims[:s], cols = dims[s:], minimising the table sizes.
        if ndim == 1:
            split = 0
        else:
            split = min(
                range(1, ndim),
                key=lambda s: (math.prod(self.shape[:s]) + math.prod(self.shape[s:]), -s),
            )

        def group_table(dims: range) -> tuple[np.ndarray, int]:
            if len(dims) == 0:
                return np.zeros(1, dtype=np.int64), 1
            g = np.zeros(1, dtype=np.int64)
            n = 1
            for d in dims:
                g = (g[:, None] * nseg[d] + seg[d][None, :]).reshape(-1)
                n *= nseg[d]
            return g, n

        rowgrp, nrg = group_table(range(0, split))
        colgrp, ncg = group_table(range(split, ndim))
        # Incidence B[cell, k]: the cell (one segment per dim) lies inside candidate k.
        grids = np.meshgrid(*[np.arange(n) for n in nseg], indexing="ij")
        cell_lo = [cuts[d][grids[d]].reshape(-1) for d in range(ndim)]
        cell_hi = [cuts[d][grids[d] + 1].reshape(-1) for d in range(ndim)]
        ncells = nrg * ncg
        B = np.zeros((ncells, self.K), dtype=np.float64)
        for box, k in zip(self.boxes, self.owners):
            inside = np.ones(ncells, dtype=bool)
            for d in range(ndim):
                lo, hi = box[d]
                inside &= (cell_lo[d] >= lo) & (cell_hi[d] <= hi)
            B[inside, k] = 1.0
        # Maximal runs of constant column group (the CPU kernel's inner loops).
        change = np.flatnonzero(np.diff(colgrp)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(colgrp)]])
        runs = np.stack([starts, ends, colgrp[starts]], axis=1)
        # ... and of constant row group (the reduction runs of the fused linear's dx GEMM).
        change = np.flatnonzero(np.diff(rowgrp)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(rowgrp)]])
        rowruns = np.stack([starts, ends, rowgrp[starts]], axis=1)
        # (columns, rows): every run boundary is a multiple of 16 (fused GEMM vector hints)
        self.run_alignment = (bool((runs[:, :2] % 16 == 0).all()), bool((rowruns[:, :2] % 16 == 0).all()))
        # (columns, rows): the largest power of two (<= 128) dividing every run START:
        # a fused GEMM whose K tile divides it never has a tile straddling two runs, so
        # its main loop can run over all K tiles in one pipeline (triton_linear FLAT).
        self.run_start_align = (_pow2_align(runs[:, 0]), _pow2_align(rowruns[:, 0]))

        self.split = split
        self.cuts = tuple(tuple(int(x) for x in c) for c in cuts)
        self.nrg, self.ncg = int(nrg), int(ncg)
        self.num_cells = int(ncells)
        self.rows = int(math.prod(self.shape[:split]))
        self.cols = int(math.prod(self.shape[split:]))
        self._cpu_tables = {
            "rowgrp": torch.from_numpy(rowgrp.astype(np.int32)),
            "colgrp": torch.from_numpy(colgrp.astype(np.int32)),
            "runs": torch.from_numpy(np.ascontiguousarray(runs.astype(np.int32))),
            "rowruns": torch.from_numpy(np.ascontiguousarray(rowruns.astype(np.int32))),
            "B64": torch.from_numpy(B),
            "B32": torch.from_numpy(B.astype(np.float32)),
        }
        # int64 copies for index_select (the torch backend), built here so that no
        # caller adds them to a cached table dict (a side effect under torch.compile).
        self._cpu_tables["rowgrp_l"] = self._cpu_tables["rowgrp"].long()
        self._cpu_tables["colgrp_l"] = self._cpu_tables["colgrp"].long()
        if ndim == 1 and len(self.boxes) == self.K:
            # 1-D layouts of one prefix per candidate (LayerNorm widths): the segment each
            # candidate's box ends after, and its end, for the per-candidate statistics.
            his = [0] * self.K
            for ((lo, hi),), k in zip(self.boxes, self.owners):
                his[k] = hi
            ends = [int(np.searchsorted(cuts[0], hi)) - 1 for hi in his]
            self._cpu_tables["end_seg"] = torch.tensor(ends, dtype=torch.int64)
            self._cpu_tables["box_hi64"] = torch.tensor(his, dtype=torch.float64)
            self._cpu_tables["box_hi32"] = torch.tensor(his, dtype=torch.float32)
        self._cpu_tables["Bmask"] = torch.from_numpy(B > 0)  # B as bool (masked sums)
        # Cells no candidate covers (rows of B all zero): the ops write 0 there, as the
        # padded sum does; "covered_el" is the [R, C] bool map of the covered elements.
        self.uncovered = tuple(int(c) for c in np.flatnonzero(B.sum(1) == 0))
        if self.uncovered:
            covered = B.sum(1) > 0
            el = covered.reshape(nrg, ncg)[rowgrp[:, None], colgrp[None, :]]
            self._cpu_tables["covered_el"] = torch.from_numpy(np.ascontiguousarray(el))
        # The candidate sizes (number of covered elements), handy for stats and checks.
        self.candidate_numel = tuple(
            int(sum(math.prod(hi - lo for lo, hi in box) for box, o in zip(self.boxes, self.owners) if o == k))
            for k in range(self.K)
        )

    def tables(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The kernel tables on ``device`` (cached): rowgrp [R], colgrp [C], runs [n, 3]
        (maximal column runs of one column group: start, end, group) and rowruns (the
        same over rows), int32, their int64 copies ``rowgrp_l``/``colgrp_l``, and the
        incidence B [cells, K] as float32 (``B32``) and float64 (``B64``).

        Under torch.compile the tables of a device other than the CPU are built (and
        cached) outside the trace; on a GPU they are marked static inputs, so a CUDA
        graph (``mode="reduce-overhead"``) reads them in place instead of copying them."""
        device = torch.device(device)
        if device.type == "cpu":
            return self._cpu_tables
        if _tracing():
            return _untraced(Layout._device_tables, self, device)
        return self._device_tables(device)

    def _device_tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        key = (device.type, device.index)
        t = self._device_cache.get(key)
        if t is None:
            t = {k: v.to(device) for k, v in self._cpu_tables.items()}
            _mark_static(t)
            self._device_cache[key] = t
        return t

    # ------------------------------------------------------------------ math
    def cell_values(self, mix: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``T = B @ mix`` as an ``[nrg, ncg]`` tensor of ``dtype`` (differentiable in mix).

        Written as a broadcast multiply + sum (not a matmul) so that autocast never
        lowers its precision.
        """
        tabs = self.tables(mix.device)
        B = tabs["B64"] if dtype == torch.float64 else tabs["B32"]
        return (B * mix.to(dtype)).sum(dim=1).reshape(self.nrg, self.ncg)

    def masked_cell_values(self, mix: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``T[c] = sum of mix_k over the candidates covering c`` (``[nrg, ncg]``,
        differentiable): equal to :meth:`cell_values` for finite mix, but a non-finite
        ``mix_k`` reaches only candidate k's cells, and the gradient of cell c only the
        candidates covering it (no ``0 * inf``)."""
        tabs = self.tables(mix.device)
        return torch.where(tabs["Bmask"], mix.to(dtype), 0).sum(dim=1).reshape(self.nrg, self.ncg)

    def mask(self, mix: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense mask ``M(mix)`` of the weight's shape (for oracles and inspection)."""
        dtype = dtype or (mix.dtype if mix.is_floating_point() else torch.float32)
        T = self.cell_values(mix, dtype)
        tabs = self.tables(mix.device)
        M = T.index_select(0, tabs["rowgrp"].long()).index_select(1, tabs["colgrp"].long())
        return M.reshape(self.shape)

    def slices(self, k: int) -> list[tuple[slice, ...]]:
        """Index tuples of the boxes of candidate ``k`` (one per box it owns)."""
        return [tuple(slice(lo, hi) for lo, hi in b) for b, o in zip(self.boxes, self.owners) if o == k]

    def project(self, dims: Sequence[int]) -> Layout:
        """The layout of the same K candidates restricted to ``dims`` (e.g. the bias of
        a linear layer is the projection of its weight layout on dim 0). Boxes of one
        candidate that coincide after projection are merged. Cached per ``dims``."""
        dims = tuple(int(d) % len(self.shape) for d in dims)
        if _tracing():
            return _untraced(Layout._project, self, dims)
        return self._project(dims)

    def _project(self, dims: tuple[int, ...]) -> Layout:
        lay = self._projections.get(dims)
        if lay is None:
            lay = self._projections[dims] = self._build_projection(dims)
        return lay

    def _build_projection(self, dims: tuple[int, ...]) -> Layout:
        boxes, owners, seen = [], [], set()
        for b, o in zip(self.boxes, self.owners):
            pb = tuple(b[d] for d in dims)
            if (pb, o) in seen:
                continue
            seen.add((pb, o))
            boxes.append(pb)
            owners.append(o)
        lay = Layout(tuple(self.shape[d] for d in dims), boxes, owners, labels=self.labels)
        lay.choice_names, lay.choice_values = self.choice_names, self.choice_values
        return lay

    # ------------------------------------------------------------------ misc
    def __repr__(self) -> str:
        extra = f", choices={dict(zip(self.choice_names, self.choice_values))}" if self.choice_names else ""
        return (
            f"Layout(shape={self.shape}, K={self.K}, cells={self.num_cells}, "
            f"rows x cols={self.rows}x{self.cols}{extra})"
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Layout)
            and self.shape == other.shape
            and self.boxes == other.boxes
            and self.owners == other.owners
        )

    def __hash__(self) -> int:
        return hash((self.shape, self.boxes, self.owners))

    def check_weight(self, weight: torch.Tensor, name: str = "weight") -> None:
        if tuple(weight.shape) != self.shape:
            raise ValueError(
                f"{name}: shape {tuple(weight.shape)} does not match the layout's shape {self.shape} "
                "(was the layout built for another weight?)"
            )


def _construct_kw(cls, args, kw):
    return _construct(cls, args, dict(kw))


def _mark_static(tables: dict[str, torch.Tensor]) -> None:
    """Mark device tables as static inputs of compiled graphs (CUDA graphs do not copy
    them on each replay); they never change once built."""
    try:
        from torch._dynamo import mark_static_address
    except Exception:  # pragma: no cover
        return
    for v in tables.values():
        if v.device.type != "cpu":
            mark_static_address(v)


def _check_disjoint(boxes: Sequence[Box], owners: Sequence[int]) -> None:
    by_owner: dict[int, list[Box]] = {}
    for b, o in zip(boxes, owners):
        for other in by_owner.get(o, []):
            if all(lo1 < hi2 and lo2 < hi1 for (lo1, hi1), (lo2, hi2) in zip(b, other)):
                raise ValueError(f"boxes: candidate {o} owns overlapping boxes {other} and {b}")
        by_owner.setdefault(o, []).append(b)

"""Cell search spaces with weight-entangled edges: the toy entangled cell (Fashion-MNIST),
the NAS-Bench-201 cell, and the operations and edges of the DARTS cell (its space:
:mod:`tangle_kernels.spaces.darts`).

Every edge of a cell is one choice over its candidate operations. Operations of one
family that differ only in kernel size share ONE weight (weight entanglement): on a toy
or DARTS edge ``sep_conv_3x3`` and ``sep_conv_5x5`` are the same separable conv whose
depthwise kernels are :class:`~tangle_kernels.nn.EntangledConv2d` with a kernel choice
(the 3x3 is the centred crop of the 5x5), likewise ``dil_conv_3x3/5x5``; on a
NAS-Bench-201 edge ``nor_conv_1x1`` is the centre of ``nor_conv_3x3``. The remaining
operations (pooling, skip, none) are mixed by output as in DARTS. For an edge vector
``a`` over the operations (:class:`MixedEdge`)::

    y = sum_{op not in a family} a_op * op(x)
      + sum_{family F} F(x; W_F superposed with weights (a_op)_{op in F})

(one conv per family, whatever the number of kernel sizes). A one-hot arch runs only
the chosen operation (a family member: the family's conv with the sliced kernel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as tnn
from ..nn.arch import HardArch
from ._vision import VisionSpace
from .base import SpaceError

__all__ = [
    "MixedEdge",
    "EntangledCellSpace",
    "NB201Space",
    "TOY_OPS",
    "NB201_OPS",
    "DARTS_OPS",
]

TOY_OPS = ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
NB201_OPS = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
DARTS_OPS = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
             "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]

#: op name -> (family, kernel size) for the weight-entangled families
FAMILIES: dict[str, tuple[str, int]] = {
    "sep_conv_3x3": ("sep_conv", 3), "sep_conv_5x5": ("sep_conv", 5),
    "dil_conv_3x3": ("dil_conv", 3), "dil_conv_5x5": ("dil_conv", 5),
    "nor_conv_1x1": ("nor_conv", 1), "nor_conv_3x3": ("nor_conv", 3),
}


# ------------------------------------------------------------------ operations
def _call(m: nn.Module, x, arch):
    return m(x, arch) if arch is not None and tnn.accepts_arch(m) else m(x)


class SepConv(nn.Module):
    """DARTS separable conv, twice ``relu, depthwise k x k, pointwise 1x1, BN``; the two
    depthwise convs are entangled over the kernel choice ``"k"``."""

    def __init__(self, c: int, stride: int, kernels: Sequence[int], affine: bool = False):
        super().__init__()
        ch = {"k": tuple(kernels)}
        self.dw1 = tnn.EntangledConv2d(c, c, "k", ch, stride=stride, groups=c, bias=False)
        self.pw1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c, affine=affine)
        self.dw2 = tnn.EntangledConv2d(c, c, "k", ch, groups=c, bias=False)
        self.pw2 = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c, affine=affine)

    def forward(self, x, arch=None):
        x = self.bn1(self.pw1(_call(self.dw1, F.relu(x), arch)))
        return self.bn2(self.pw2(_call(self.dw2, F.relu(x), arch)))


class DilConv(nn.Module):
    """DARTS dilated conv: ``relu, depthwise k x k (dilation 2), pointwise 1x1, BN``."""

    def __init__(self, c: int, stride: int, kernels: Sequence[int], affine: bool = False):
        super().__init__()
        self.dw = tnn.EntangledConv2d(c, c, "k", {"k": tuple(kernels)}, stride=stride,
                                      dilation=2, groups=c, bias=False)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c, affine=affine)

    def forward(self, x, arch=None):
        return self.bn(self.pw(_call(self.dw, F.relu(x), arch)))


class ReLUConvBN(nn.Module):
    """``relu, conv k x k, BN`` (NAS-Bench-201 ``nor_conv``); the conv is entangled over
    the kernel choice ``"k"`` when ``kernels`` has several sizes."""

    def __init__(self, c_in: int, c_out: int, stride: int, kernels: Sequence[int],
                 affine: bool = False):
        super().__init__()
        self.conv = tnn.EntangledConv2d(c_in, c_out, "k", {"k": tuple(kernels)}, stride=stride,
                                        bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x, arch=None):
        return self.bn(_call(self.conv, F.relu(x), arch))


class Zero(nn.Module):
    """The ``none`` operation: zeros of the output shape."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return (x if self.stride == 1 else x[:, :, ::self.stride, ::self.stride]).mul(0.0)


class FactorizedReduce(nn.Module):
    """DARTS stride-2 identity: two 1x1 stride-2 convs on offset grids, concatenated, BN."""

    def __init__(self, c_in: int, c_out: int, affine: bool = False):
        super().__init__()
        if c_out % 2:
            raise SpaceError(f"FactorizedReduce: c_out={c_out} must be even")
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x):
        x = F.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


def plain_relu_conv_bn(c_in: int, c_out: int, k: int = 1, stride: int = 1,
                       affine: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(c_out, affine=affine))


def make_single_op(name: str, c: int, stride: int, *, darts_pool_bn: bool) -> nn.Module:
    """The non-entangled operations."""
    if name == "none":
        return Zero(stride)
    if name == "skip_connect":
        return nn.Identity() if stride == 1 else FactorizedReduce(c, c)
    if name in ("avg_pool_3x3", "max_pool_3x3"):
        pool = (nn.AvgPool2d(3, stride, 1, count_include_pad=False) if name == "avg_pool_3x3"
                else nn.MaxPool2d(3, stride, 1))
        return nn.Sequential(pool, nn.BatchNorm2d(c, affine=False)) if darts_pool_bn else pool
    raise SpaceError(f"unknown operation {name!r}")


def make_family(family: str, c: int, stride: int, kernels: Sequence[int]) -> nn.Module:
    if family == "sep_conv":
        return SepConv(c, stride, kernels)
    if family == "dil_conv":
        return DilConv(c, stride, kernels)
    if family == "nor_conv":
        return ReLUConvBN(c, c, stride, kernels)
    raise SpaceError(f"unknown operation family {family!r}")


class MixedEdge(tnn.EntangledModule):
    """One cell edge: the choice ``choice`` over the operation names ``ops`` (see the
    module docstring). Operations of one family share one module whose kernel choice
    ``"k"`` receives the sub-vector of the edge's weights over the family's members.

    Soft arch: ``sum_single a_op op(x) + sum_F F(x, {"k": a[F]})``. HardArch: the chosen
    operation only (a single op scaled by its arch entry; a family member through the
    family's one-hot kernel path, which scales the sliced weights by the entry).
    ``extract``: the chosen operation as a plain module.
    """

    def __init__(self, choice: str, ops: Sequence[str], c: int, stride: int, *,
                 darts_pool_bn: bool = False):
        super().__init__()
        self.choice = choice
        self.names = (choice,)
        self.ops = tuple(ops)
        self.choices = {choice: self.ops}
        self.singles = nn.ModuleDict()
        fam_members: dict[str, list[tuple[int, int]]] = {}
        for i, op in enumerate(self.ops):
            if op in FAMILIES:
                fam, k = FAMILIES[op]
                fam_members.setdefault(fam, []).append((i, k))
            else:
                self.singles[op] = make_single_op(op, c, stride, darts_pool_bn=darts_pool_bn)
        self.families = nn.ModuleDict({
            fam: make_family(fam, c, stride, [k for _, k in mem]) for fam, mem in fam_members.items()
        })
        #: family -> (positions in ops, kernel sizes)
        self.members = {fam: ([i for i, _ in mem], [k for _, k in mem])
                        for fam, mem in fam_members.items()}

    def forward(self, x: torch.Tensor, arch: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        arch = self._resolve(arch)
        if arch is None:
            raise ValueError(f"MixedEdge({self.choice!r}): no arch given and none set with "
                             "set_arch; an operation choice has no max-size candidate")
        self._vectors(arch, self.names)
        vec = arch[self.choice]
        if isinstance(arch, HardArch):
            i = int(arch.index[self.choice])
            op = self.ops[i]
            if op in FAMILIES:
                fam = FAMILIES[op][0]
                pos, _ = self.members[fam]
                sub = HardArch({"k": vec[pos]}, {"k": pos.index(i)})
                return self.families[fam](x, sub)
            y = self.singles[op](x)
            return y * vec[i].to(y.dtype) if vec.requires_grad else y
        y = None
        for i, op in enumerate(self.ops):
            if op in self.singles:
                t = self.singles[op](x) * vec[i].to(x.dtype)
                y = t if y is None else y + t
        for fam, (pos, _) in self.members.items():
            t = self.families[fam](x, {"k": vec[pos]})
            y = t if y is None else y + t
        return y

    def extract(self, selection: Mapping[str, Any]) -> nn.Module:
        op = self._values(selection, self.names)[self.choice]
        if op in FAMILIES:
            fam, k = FAMILIES[op]
            return tnn.extract(self.families[fam], {"k": k})
        return tnn.extract(self.singles[op], {})

    def extra_repr(self) -> str:
        return f"choice={self.choice!r}, ops={list(self.ops)}"


# ------------------------------------------------------------ cost formulas
def op_cost(op: str, c: int, r_out: int, stride: int) -> tuple[int, int]:
    """``(params, MACs)`` of one edge operation on ``c`` channels with output resolution
    ``r_out`` (BatchNorm without affine parameters, as in the search cells)."""
    if op in ("none", "avg_pool_3x3", "max_pool_3x3"):
        return 0, 0
    if op == "skip_connect":
        return (0, 0) if stride == 1 else (c * c, r_out * r_out * c * c)
    fam, k = FAMILIES[op]
    unit = c * k * k + c * c if fam != "nor_conv" else c * c * k * k
    n = 2 if fam == "sep_conv" else 1
    return n * unit, n * r_out * r_out * unit


def _check_ops(space: VisionSpace, allowed: Sequence[str]) -> None:
    for n, vals in space.choices.items():
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise SpaceError(f"choice {n}: unknown operations {bad} (allowed: {list(allowed)})")


# ================================================================ toy entangled cell
class ToyCell(nn.Module):
    """Seeds' toy cell: ``s0 = preprocess(x)`` (relu, 1x1 conv, BN), ``n1 = e0(s0)``,
    ``n2 = e1(s0) + e2(n1)``, output ``cat(n1, n2)``; reduction cells use stride 2 on the
    edges from ``s0``."""

    def __init__(self, prefix: str, choices: Mapping[str, Sequence[str]], c_prev: int, c: int,
                 reduction: bool):
        super().__init__()
        self.preprocess = plain_relu_conv_bn(c_prev, c)
        s = 2 if reduction else 1
        self.edges = nn.ModuleList([MixedEdge(f"{prefix}_{i}", choices[f"{prefix}_{i}"], c, st)
                                    for i, st in ((0, s), (1, s), (2, 1))])

    def forward(self, x):
        s0 = self.preprocess(x)
        n1 = self.edges[0](s0)
        n2 = self.edges[1](s0) + self.edges[2](n1)
        return torch.cat([n1, n2], dim=1)


class ToyCellNet(nn.Module):
    """reduce cell (in -> 2C), normal cell (2C -> 2C), reduce cell (2C -> 4C), maxpool 2,
    flatten, linear -> 4C, relu, linear -> classes (dropout after each cell and before
    the classifier)."""

    def __init__(self, cells: Sequence[nn.Module], proj: nn.Module, classifier: nn.Module,
                 dropout: float):
        super().__init__()
        self.cells = nn.ModuleList(cells)
        self.proj, self.classifier = proj, classifier
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        for cell in self.cells:
            x = self.dropout(cell(x))
        x = F.max_pool2d(x, 2).flatten(1)
        return self.classifier(self.dropout(F.relu(self.proj(x))))


class EntangledCellSpace(VisionSpace):
    """The toy entangled cell space (Fashion-MNIST): 3 normal + 3 reduce edges, each one
    of sep_conv_3x3/5x5, dil_conv_3x3/5x5 (4^6 = 4096 architectures)."""

    name = "entangled-cell"
    description = "toy weight-entangled cell (Fashion-MNIST): 6 edges x 4 ops, 4096 archs"
    dataset = "fashion-mnist"
    default_choices = {f"{c}_{i}": list(TOY_OPS) for c in ("normal", "reduce") for i in range(3)}
    default_hparams = {"channels": 32, "image_size": 28, "in_channels": 1, "num_classes": 10,
                       "dropout": 0.2, "val": "half", "n_train": 512, "n_val": 256,
                       "data_seed": 0}
    presets = {"tiny": {"hparams": {"channels": 4, "image_size": 8, "num_classes": 4,
                                    "dropout": 0.0, "n_train": 64, "n_val": 32}}}

    def check(self) -> None:
        _check_ops(self, TOY_OPS)
        if self.hparams["image_size"] < 8:
            raise SpaceError(f"hparam image_size={self.hparams['image_size']} must be >= 8")

    def _final_res(self) -> int:
        r = self.hparams["image_size"]
        r = (r + 1) // 2
        r = (r + 1) // 2
        return r // 2

    def build_supernet(self, data=None) -> nn.Module:
        if data is not None:
            self.check_data(data)
        hp = self.hparams
        C = hp["channels"]
        cells = [ToyCell("reduce", self.choices, hp["in_channels"], C, True),
                 ToyCell("normal", self.choices, 2 * C, C, False),
                 ToyCell("reduce", self.choices, 2 * C, 2 * C, True)]
        r = self._final_res()
        return ToyCellNet(cells, nn.Linear(4 * C * r * r, 4 * C), nn.Linear(4 * C, hp["num_classes"]),
                          hp["dropout"])

    def genotype_key(self, selection: Mapping[str, Any]) -> str:
        """``"Genotype(normal=[('op', 0), ('op', 0), ('op', 1)], normal_concat=range(1, 3),
        reduce=[...], reduce_concat=range(1, 3))"``: the key of the seeds' benchmark."""
        s = self.check_selection(selection)

        def gene(prefix):
            return "[" + ", ".join(f"({s[f'{prefix}_{i}']!r}, {j})"
                                   for i, j in zip(range(3), (0, 0, 1))) + "]"

        return (f"Genotype(normal={gene('normal')}, normal_concat=range(1, 3), "
                f"reduce={gene('reduce')}, reduce_concat=range(1, 3))")

    def _costs(self, selection):
        s = self.check_selection(selection)
        hp = self.hparams
        C, r = hp["channels"], hp["image_size"]
        params = macs = 0
        for prefix, c_prev, c, red in (("reduce", hp["in_channels"], C, True),
                                       ("normal", 2 * C, C, False),
                                       ("reduce", 2 * C, 2 * C, True)):
            params += c_prev * c + 2 * c  # preprocess conv + BN affine
            macs += r * r * c_prev * c
            r_out = (r + 1) // 2 if red else r
            for i, stride in ((0, 2 if red else 1), (1, 2 if red else 1), (2, 1)):
                p, m = op_cost(s[f"{prefix}_{i}"], c, r_out, stride)
                params, macs = params + p, macs + m
            r = r_out
        rf = r // 2
        d_in, d_h = 4 * C * rf * rf, 4 * C
        params += d_in * d_h + d_h + d_h * hp["num_classes"] + hp["num_classes"]
        macs += d_in * d_h + d_h * hp["num_classes"]
        return params, macs

    def arch_params(self, selection) -> int:
        return self._costs(selection)[0]

    def arch_macs(self, selection) -> int:
        return self._costs(selection)[1]


# ====================================================================== NAS-Bench-201
NB201_EDGES = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]


class NB201Cell(nn.Module):
    """NAS-Bench-201 cell: 4 nodes, node ``i = sum_{j<i} edge_{i,j}(node j)``, output
    node 3."""

    def __init__(self, choices: Mapping[str, Sequence[str]], c: int):
        super().__init__()
        self.edges = nn.ModuleDict({f"edge{i}_{j}": MixedEdge(f"edge{i}_{j}", choices[f"edge{i}_{j}"], c, 1)
                                    for i, j in NB201_EDGES})

    def forward(self, x):
        nodes = [x]
        for i in (1, 2, 3):
            nodes.append(sum(self.edges[f"edge{i}_{j}"](nodes[j]) for j in range(i)))
        return nodes[3]


class ResNetBasicBlock(nn.Module):
    """NAS-Bench-201 reduction block: ``relu-conv3x3(s2)-BN, relu-conv3x3-BN`` plus an
    ``avgpool 2, conv 1x1`` shortcut."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv_a = plain_relu_conv_bn(c_in, c_out, 3, 2)
        self.conv_b = plain_relu_conv_bn(c_out, c_out, 3, 1)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x):
        return self.conv_b(self.conv_a(x)) + self.downsample(x)


class MacroNet(nn.Module):
    """``stem -> cells -> lastact -> global pool -> classifier``; DARTS cells take two
    inputs (``two_inputs``)."""

    def __init__(self, stem, cells, lastact, classifier, two_inputs: bool = False):
        super().__init__()
        self.stem, self.cells = stem, nn.ModuleList(cells)
        self.lastact, self.classifier = lastact, classifier
        self.two_inputs = two_inputs

    def forward(self, x):
        x = self.stem(x)
        if self.two_inputs:
            s0 = s1 = x
            for cell in self.cells:
                s0, s1 = s1, cell(s0, s1)
            x = s1
        else:
            for cell in self.cells:
                x = cell(x)
        x = self.lastact(x)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class NB201Space(VisionSpace):
    """The NAS-Bench-201 cell (CIFAR-10): 6 edges x 5 operations (15625 architectures);
    ``nor_conv_1x1`` and ``nor_conv_3x3`` share one entangled 3x3 weight."""

    name = "nb201"
    description = "NAS-Bench-201 cell (CIFAR-10): 6 edges x 5 ops, 15625 archs"
    dataset = "cifar10"
    default_choices = {f"edge{i}_{j}": list(NB201_OPS) for i, j in NB201_EDGES}
    default_hparams = {"channels": 16, "cells_per_stage": 5, "image_size": 32, "in_channels": 3,
                       "num_classes": 10, "val": "half", "n_train": 512, "n_val": 256,
                       "data_seed": 0}
    presets = {"tiny": {"hparams": {"channels": 4, "cells_per_stage": 1, "image_size": 8,
                                    "num_classes": 4, "n_train": 64, "n_val": 32}}}

    def check(self) -> None:
        _check_ops(self, NB201_OPS)
        if self.hparams["cells_per_stage"] < 1 or self.hparams["channels"] < 1:
            raise SpaceError("hparams channels and cells_per_stage must be >= 1")

    def _stages(self):
        C, N = self.hparams["channels"], self.hparams["cells_per_stage"]
        return [(C, False)] * N + [(2 * C, True)] + [(2 * C, False)] * N + [(4 * C, True)] + [(4 * C, False)] * N

    def build_supernet(self, data=None) -> nn.Module:
        if data is not None:
            self.check_data(data)
        hp = self.hparams
        C = hp["channels"]
        stem = nn.Sequential(nn.Conv2d(hp["in_channels"], C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        cells, c_prev = [], C
        for c, red in self._stages():
            cells.append(ResNetBasicBlock(c_prev, c) if red else NB201Cell(self.choices, c))
            c_prev = c
        lastact = nn.Sequential(nn.BatchNorm2d(c_prev), nn.ReLU())
        return MacroNet(stem, cells, lastact, nn.Linear(c_prev, hp["num_classes"]))

    def genotype_key(self, selection: Mapping[str, Any]) -> str:
        """The NAS-Bench-201 architecture string ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``."""
        s = self.check_selection(selection)
        return "+".join("|" + "|".join(f"{s[f'edge{i}_{j}']}~{j}" for j in range(i)) + "|"
                        for i in (1, 2, 3))

    def describe(self, selection):
        return self.genotype_key(selection)

    def _costs(self, selection):
        s = self.check_selection(selection)
        hp = self.hparams
        C, r = hp["channels"], hp["image_size"]
        params = hp["in_channels"] * C * 9 + 2 * C
        macs = r * r * hp["in_channels"] * C * 9
        c_prev = C
        for c, red in self._stages():
            if red:
                r_out = (r + 1) // 2
                params += c_prev * c * 9 + 2 * c + c * c * 9 + 2 * c + c_prev * c
                macs += r_out * r_out * (c_prev * c * 9 + c * c * 9) + (r // 2) ** 2 * c_prev * c
                r = r_out
            else:
                for i, j in NB201_EDGES:
                    p, m = op_cost(s[f"edge{i}_{j}"], c, r, 1)
                    params, macs = params + p, macs + m
            c_prev = c
        params += 2 * c_prev + c_prev * hp["num_classes"] + hp["num_classes"]
        macs += c_prev * hp["num_classes"]
        return params, macs

    def arch_params(self, selection) -> int:
        return self._costs(selection)[0]

    def arch_macs(self, selection) -> int:
        return self._costs(selection)[1]


def __getattr__(name):  # the DARTS space moved to spaces/darts.py; old imports still work
    if name in ("DartsCell", "DartsCellSpace"):
        from . import darts

        return getattr(darts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

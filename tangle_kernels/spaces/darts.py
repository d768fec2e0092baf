"""The DARTS cell space (Liu et al. 2019, CIFAR-10): normal and reduction cells whose
edges mix the DARTS operations, built from the operations and the weight-entangled
:class:`~tangle_kernels.spaces.cells.MixedEdge` of :mod:`tangle_kernels.spaces.cells`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._vision import VisionSpace
from .base import SpaceError
from .cells import DARTS_OPS, FactorizedReduce, MacroNet, MixedEdge, op_cost, plain_relu_conv_bn, _check_ops

__all__ = ["DartsCell", "DartsCellSpace"]


class DartsCell(nn.Module):
    """DARTS search cell: inputs ``s0, s1`` preprocessed to C channels, ``steps``
    intermediate nodes each summing edges from every earlier node, output the
    concatenation of the intermediate nodes."""

    def __init__(self, prefix: str, choices, steps: int, c_pp: int, c_p: int, c: int,
                 reduction: bool, reduction_prev: bool):
        super().__init__()
        self.pre0 = FactorizedReduce(c_pp, c) if reduction_prev else plain_relu_conv_bn(c_pp, c, affine=False)
        self.pre1 = plain_relu_conv_bn(c_p, c, affine=False)
        self.steps = steps
        edges, e = [], 0
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                name = f"{prefix}_{e}"
                edges.append(MixedEdge(name, choices[name], c, stride, darts_pool_bn=True))
                e += 1
        self.edges = nn.ModuleList(edges)

    def forward(self, s0, s1):
        states = [self.pre0(s0), self.pre1(s1)]
        off = 0
        for _ in range(self.steps):
            s = sum(self.edges[off + j](h) for j, h in enumerate(states))
            off += len(states)
            states.append(s)
        return torch.cat(states[2:], dim=1)


class DartsCellSpace(VisionSpace):
    """The DARTS cell space (CIFAR-10): normal and reduction cells of ``steps`` nodes
    (14 edges each for 4 nodes) x 8 operations; sep/dil convs of 3x3 and 5x5 share
    weights. Derivation is the argmax per edge (every edge keeps its operation; ``none``
    edges contribute nothing), not DARTS' top-2-inputs pruning."""

    name = "darts"
    description = "DARTS cell (CIFAR-10): 2 x 14 edges x 8 ops"
    dataset = "cifar10"
    default_choices = {f"{c}_{e}": list(DARTS_OPS) for c in ("normal", "reduce") for e in range(14)}
    default_hparams = {"channels": 16, "layers": 8, "steps": 4, "image_size": 32,
                       "in_channels": 3, "num_classes": 10, "val": "half", "n_train": 512,
                       "n_val": 256, "data_seed": 0}
    presets = {"tiny": {"hparams": {"channels": 4, "layers": 3, "steps": 2, "image_size": 8,
                                    "num_classes": 4, "n_train": 64, "n_val": 32}}}

    def __init__(self, choices=None, hparams=None, preset=None):
        steps = dict(self.default_hparams)
        if preset is not None and preset in self.presets:
            steps.update(self.presets[preset].get("hparams", {}))
        steps.update(hparams or {})
        n = sum(2 + i for i in range(int(steps["steps"])))
        self.default_choices = {f"{c}_{e}": list(DARTS_OPS) for c in ("normal", "reduce")
                                for e in range(n)}
        super().__init__(choices=choices, hparams=hparams, preset=preset)

    def check(self) -> None:
        _check_ops(self, DARTS_OPS)
        hp = self.hparams
        if hp["layers"] < 1 or hp["steps"] < 1 or hp["channels"] < 1:
            raise SpaceError("hparams layers, steps and channels must be >= 1")
        if hp["channels"] % 2:
            raise SpaceError(f"hparam channels={hp['channels']} must be even (FactorizedReduce)")

    def _plan(self):
        hp = self.hparams
        L, C, m = hp["layers"], hp["channels"], hp["steps"]
        c_pp, c_p, c = 3 * C, 3 * C, C
        red_prev = False
        plan = []
        for i in range(L):
            red = i in (L // 3, 2 * L // 3)
            if red:
                c *= 2
            plan.append((c_pp, c_p, c, red, red_prev))
            red_prev = red
            c_pp, c_p = c_p, m * c
        return plan, c_p

    def build_supernet(self, data=None) -> nn.Module:
        if data is not None:
            self.check_data(data)
        hp = self.hparams
        C = hp["channels"]
        stem = nn.Sequential(nn.Conv2d(hp["in_channels"], 3 * C, 3, padding=1, bias=False),
                             nn.BatchNorm2d(3 * C))
        plan, c_last = self._plan()
        cells = [DartsCell("reduce" if red else "normal", self.choices, hp["steps"], c_pp, c_p, c,
                           red, red_prev) for c_pp, c_p, c, red, red_prev in plan]
        return MacroNet(stem, cells, nn.Identity(), nn.Linear(c_last, hp["num_classes"]),
                        two_inputs=True)

    def genotype(self, selection: Mapping[str, Any]) -> str:
        """DARTS ``Genotype(...)`` string of the edges whose operation is not ``none``."""
        s = self.check_selection(selection)
        m = self.hparams["steps"]

        def gene(prefix):
            out, e = [], 0
            for i in range(m):
                for j in range(2 + i):
                    if s[f"{prefix}_{e}"] != "none":
                        out.append((s[f"{prefix}_{e}"], j))
                    e += 1
            return out

        cc = f"range(2, {2 + m})"
        return (f"Genotype(normal={gene('normal')}, normal_concat={cc}, "
                f"reduce={gene('reduce')}, reduce_concat={cc})")

    def _costs(self, selection):
        s = self.check_selection(selection)
        hp = self.hparams
        C, r, m = hp["channels"], hp["image_size"], hp["steps"]
        params = hp["in_channels"] * 3 * C * 9 + 2 * 3 * C
        macs = r * r * hp["in_channels"] * 3 * C * 9
        plan, c_last = self._plan()
        r_p = r
        for c_pp, c_p, c, red, _ in plan:
            # preprocessing: FactorizedReduce or 1x1 conv (BN without affine)
            params += c_pp * c + c_p * c
            macs += r_p * r_p * c_pp * c + r_p * r_p * c_p * c  # both at s1's resolution
            r_out = (r_p + 1) // 2 if red else r_p
            e = 0
            prefix = "reduce" if red else "normal"
            for i in range(m):
                for j in range(2 + i):
                    stride = 2 if red and j < 2 else 1
                    p, mm = op_cost(s[f"{prefix}_{e}"], c, r_out, stride)
                    params, macs = params + p, macs + mm
                    e += 1
            r_p = r_out
        params += c_last * hp["num_classes"] + hp["num_classes"]
        macs += c_last * hp["num_classes"]
        return params, macs

    def arch_params(self, selection) -> int:
        return self._costs(selection)[0]

    def arch_macs(self, selection) -> int:
        return self._costs(selection)[1]

"""The toy conv-macro space of TangleNAS (CIFAR-10): five convolutions, the widths of the
first four and their kernel sizes searched (3^8 = 6561 architectures).

Network (as the seeds' ``ConvNetMacroSpace``)::

    conv1 3->c1 (k1) relu   conv2 c1->c2 (k2) relu   maxpool2
    conv3 c2->c3 (k3) relu  dropout2d  maxpool2
    conv4 c3->c4 (k4) relu  conv5 c4->256 (7x7, padding 2)  dropout2d
    flatten  fc 256*6*6 -> 256 -> 128 -> 64 -> 10  (relu between)

Choices: ``c1`` 8/16/32, ``c2`` 16/32/64, ``c3`` 32/64/128, ``c4`` 64/128/256 (output
channels, prefix slices of one weight), ``k1``..``k4`` 3/5/7 (centred crops of one 7x7
kernel, "same" padding). Every conv is ONE :class:`~tangle_kernels.nn.EntangledConv2d`
whose candidate mix is the outer product of its in-width, out-width and kernel vectors
(27 candidates for conv2..conv4), superposed in one pass.

The tabular benchmark of the seeds is keyed by ``str([[c1, c2, c3, c4], [k1, k2, k3,
k4]])`` (:meth:`ConvMacroSpace.genotype_key`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as tnn
from ._vision import VisionSpace
from .base import SpaceError

__all__ = ["ConvMacroSpace", "ConvMacroNet"]


class ConvMacroNet(nn.Module):
    """The conv-macro network; the same forward runs the supernet (entangled convs) and
    an extracted sub-network (plain convs)."""

    def __init__(self, convs: list[nn.Module], fcs: list[nn.Module], dropout: float):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.fcs = nn.ModuleList(fcs)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.convs
        x = F.relu(c1(x))
        x = F.max_pool2d(F.relu(c2(x)), 2)
        x = F.max_pool2d(self.dropout(F.relu(c3(x))), 2)
        x = F.relu(c4(x))
        x = self.dropout(c5(x)).flatten(1)
        for i, fc in enumerate(self.fcs):
            x = fc(x)
            if i < len(self.fcs) - 1:
                x = F.relu(x)
        return x


class ConvMacroSpace(VisionSpace):
    name = "conv-macro"
    description = "toy conv macro space (CIFAR-10): 4 stage widths x 4 kernel sizes, 6561 archs"
    dataset = "cifar10"
    default_choices = {
        "c1": [8, 16, 32], "c2": [16, 32, 64], "c3": [32, 64, 128], "c4": [64, 128, 256],
        "k1": [3, 5, 7], "k2": [3, 5, 7], "k3": [3, 5, 7], "k4": [3, 5, 7],
    }
    default_hparams = {
        "image_size": 32, "in_channels": 3, "num_classes": 10,
        "conv5_out": 256, "conv5_kernel": 7, "conv5_padding": 2,
        "fc1": 256, "fc2": 128, "fc3": 64, "dropout": 0.5,
        "val": "half", "n_train": 512, "n_val": 256, "data_seed": 0,
    }
    presets = {
        # a tiny version for tests and quick CPU runs (2^8 = 256 archs, 8x8 images)
        "tiny": {
            "choices": {"c1": [2, 4], "c2": [4, 6], "c3": [4, 8], "c4": [6, 8],
                        "k1": [1, 3], "k2": [1, 3], "k3": [1, 3], "k4": [1, 3]},
            "hparams": {"image_size": 8, "conv5_out": 8, "conv5_kernel": 3, "conv5_padding": 1,
                        "fc1": 16, "fc2": 12, "fc3": 8, "num_classes": 4, "dropout": 0.0,
                        "n_train": 64, "n_val": 32},
        },
    }

    def check(self) -> None:
        for n in ("c1", "c2", "c3", "c4"):
            if any(v < 1 for v in self.choices[n]):
                raise SpaceError(f"choice {n}: widths must be positive, got {self.choices[n]}")
        for n in ("k1", "k2", "k3", "k4"):
            bad = [v for v in self.choices[n] if v < 1 or v % 2 == 0]
            if bad:
                raise SpaceError(f"choice {n}: kernel sizes must be odd and positive, got {bad}")
        hp = self.hparams
        if hp["image_size"] < 4:
            raise SpaceError(f"hparam image_size={hp['image_size']}: must be >= 4 (two 2x2 pools)")
        if self._spatial5() < 1:
            raise SpaceError(
                f"hparams conv5_kernel={hp['conv5_kernel']}, conv5_padding={hp['conv5_padding']}: "
                f"conv5 output is empty for image_size={hp['image_size']}")
        if not 0.0 <= hp["dropout"] < 1.0:
            raise SpaceError(f"hparam dropout={hp['dropout']} must be in [0, 1)")

    def _spatial5(self) -> int:
        hp = self.hparams
        s = hp["image_size"] // 2 // 2
        return s + 2 * hp["conv5_padding"] - hp["conv5_kernel"] + 1

    # ------------------------------------------------------------------ model
    def build_supernet(self, data=None) -> nn.Module:
        if data is not None:
            self.check_data(data)
        hp, ch = self.hparams, self.choices
        convs = [tnn.EntangledConv2d(hp["in_channels"], "c1", "k1", ch)]
        for i in (2, 3, 4):
            convs.append(tnn.EntangledConv2d(f"c{i - 1}", f"c{i}", f"k{i}", ch))
        convs.append(tnn.EntangledConv2d("c4", hp["conv5_out"], hp["conv5_kernel"], ch,
                                         padding=hp["conv5_padding"]))
        s5 = self._spatial5()
        dims = [hp["conv5_out"] * s5 * s5, hp["fc1"], hp["fc2"], hp["fc3"], hp["num_classes"]]
        fcs = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]
        return ConvMacroNet(convs, fcs, hp["dropout"])

    # ------------------------------------------------------------- benchmark
    def genotype_key(self, selection: Mapping[str, Any]) -> str:
        """``'[[c1, c2, c3, c4], [k1, k2, k3, k4]]'``: the key of the seeds' benchmark."""
        s = self.check_selection(selection)
        return str([[int(s[f"c{i}"]) for i in range(1, 5)], [int(s[f"k{i}"]) for i in range(1, 5)]])

    def describe(self, selection: Mapping[str, Any]) -> str:
        return self.genotype_key(selection)

    # ---------------------------------------------------------------- costs
    def _layers(self, selection: Mapping[str, Any]):
        s = self.check_selection(selection)
        hp = self.hparams
        H = hp["image_size"]
        res = [H, H, H // 2, H // 4]
        convs = []
        cin = hp["in_channels"]
        for i in range(1, 5):
            convs.append((cin, s[f"c{i}"], s[f"k{i}"], res[i - 1]))  # same padding
            cin = s[f"c{i}"]
        s5 = self._spatial5()
        convs.append((cin, hp["conv5_out"], hp["conv5_kernel"], s5))
        dims = [hp["conv5_out"] * s5 * s5, hp["fc1"], hp["fc2"], hp["fc3"], hp["num_classes"]]
        return convs, list(zip(dims[:-1], dims[1:]))

    def arch_params(self, selection: Mapping[str, Any]) -> int:
        """Parameters of the sub-network: convs ``o (i k^2 + 1)``, linears ``o (i + 1)``."""
        convs, fcs = self._layers(selection)
        return (sum(o * (i * k * k + 1) for i, o, k, _ in convs)
                + sum(o * (i + 1) for i, o in fcs))

    def arch_macs(self, selection: Mapping[str, Any]) -> int:
        """MACs per image: convs ``r^2 o i k^2`` at output resolution ``r``, linears ``i o``."""
        convs, fcs = self._layers(selection)
        return sum(r * r * o * i * k * k for i, o, k, r in convs) + sum(i * o for i, o in fcs)

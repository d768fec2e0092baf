"""entangle() on torchvision models (random weights, 32x32 images): resnet18 block
widths and kernels (and the forgotten consumer found at entangle time),
mobilenet_v3_small's expansion width through depthwise groups and squeeze-excite.

Runs in the requirements/models.txt environment (torchvision does not import beside
the CPU torch of requirements/cpu.txt)."""

from __future__ import annotations

import pytest
import torch
from nn_util import check_entangled_model

import tangle_kernels.nn as tnn

torchvision = pytest.importorskip(
    "torchvision", reason="torchvision runs in the requirements/models.txt environment"
)

RES_DIMS = {
    "layer1.*.conv1.out_channels": "mid",
    "layer1.*.bn1.num_features": "mid",
    "layer1.*.conv2.in_channels": "mid",
    "layer[12].*.conv[12].kernel_size": "k",
}


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5)


def test_resnet18_exact():
    check_entangled_model(
        _resnet18(),
        {"mid": (32, 64), "k": (1, 3)},
        RES_DIMS,
        torch.randn(2, 3, 32, 32),
        [{"mid": 32, "k": 1}, {"mid": 32, "k": 3}],
        fd_entries=1,
    )


def test_resnet18_forgotten_consumer_is_an_error_at_entangle():
    dims = {k: v for k, v in RES_DIMS.items() if "conv2.in_channels" not in k}
    with pytest.raises(
        ValueError, match=r"layer1.0.conv2 \(Conv2d\).*'layer1.0.bn1' \(BatchNorm2d"
    ):
        tnn.entangle(
            _resnet18(),
            {"mid": (32, 64), "k": (1, 3)},
            dims,
            example_inputs=torch.randn(1, 3, 32, 32),
        )


def test_mobilenet_v3_small_expansion_exact():
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v3_small(num_classes=5)
    b = "features.4.block"
    dims = {
        f"{b}.0.0.out_channels": "exp",
        f"{b}.0.1.num_features": "exp",
        f"{b}.1.0.in_channels": "exp",
        f"{b}.1.0.out_channels": "exp",
        f"{b}.1.0.groups": "exp",
        f"{b}.1.0.kernel_size": "k",
        f"{b}.1.1.num_features": "exp",
        f"{b}.2.fc1.in_channels": "exp",
        f"{b}.2.fc2.out_channels": "exp",
        f"{b}.3.0.in_channels": "exp",
    }
    check_entangled_model(
        m,
        {"exp": (48, 96), "k": (3, 5)},
        dims,
        torch.randn(2, 3, 32, 32),
        [{"exp": 48, "k": 3}, {"exp": 96, "k": 3}],
        fd_entries=1,
    )

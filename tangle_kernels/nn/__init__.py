"""Drop-in weight-entangled modules.

Entangle a stock model, search over it, extract the chosen sub-network::

    import torch
    from torch import nn
    import tangle_kernels.nn as tnn

    model = nn.Sequential(                        # any existing model
        nn.Conv2d(3, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    choices = {"c": [16, 24, 32], "k": [3, 5], "hidden": [32, 64]}
    supernet = tnn.entangle(model, choices, {
        # "<module path>.<argument>": choice (fnmatch patterns; the last match wins)
        "0.out_channels": "c", "1.num_features": "c", "3.in_channels": "c",
        "[03].kernel_size": "k",
        "7.out_features": "hidden", "9.in_features": "hidden",
    })                                            # weights kept, a deep copy by default

    alpha = {n: torch.zeros(len(v), requires_grad=True) for n, v in choices.items()}
    tnn.set_arch(supernet, {n: a.softmax(0) for n, a in alpha.items()})
    loss = supernet(torch.randn(8, 3, 16, 16)).logsumexp(-1).mean()
    loss.backward()                               # one pass; grads for weights and alpha

    best = {"c": 24, "k": 3, "hidden": 64}
    child = tnn.extract(supernet, best)           # plain nn.Sequential, sliced weights
    x = torch.randn(2, 3, 16, 16)
    tnn.set_arch(supernet, tnn.one_hot_arch(choices, best))   # the one-hot fast path
    torch.testing.assert_close(child.eval()(x), supernet.eval()(x))

Protocol (see :mod:`tangle_kernels.nn.base`): every module has ``choices``
(``{name: values}``) and ``forward(x, arch=None)``; ``arch`` maps a choice name to a
1-D weight tensor over its values. A plain dict superposes the candidates' weights
(one forward pass at the max size), a :class:`HardArch` (e.g. from
:func:`one_hot_arch` or a GDAS/SPOS sampler) runs the sliced sub-network, ``None``
uses the arch stored by :func:`set_arch`, else the max-size candidate. Width
arguments are specs (:mod:`tangle_kernels.nn.spec`): an int, a choice name, or a
tuple of names and ints whose product is the width.

Modules: :class:`EntangledLinear`, :class:`EntangledConv2d`,
:class:`EntangledBatchNorm2d`, :class:`EntangledLayerNorm`,
:class:`EntangledEmbedding`, :class:`EntangledAttention`, :class:`DepthMixer`,
:class:`OpMixer`; conversion: :func:`entangle`, :func:`extract`, the converter registry
(:func:`register_converter`, :func:`layer_norm_converter`; see
:mod:`tangle_kernels.nn.convert`) and docs/recipes.md (a stock CNN, a timm ViT, a
Hugging Face GPT-2, nanoGPT).
"""

from __future__ import annotations

from .arch import HardArch, candidate_mix, end_index, hard_index, is_sized, one_hot_arch
from .attention import EntangledAttention
from .base import EntangledModule, accepts_arch, get_arch, set_arch
from .conv import EntangledBatchNorm2d, EntangledConv2d
from .convert import (
    ENTANGLE_ARGS,
    Converter,
    Guard,
    check_flow,
    entangle,
    extract,
    layer_norm_converter,
    register_converter,
    register_guard,
)
from .embedding import EntangledEmbedding
from .linear import EntangledLinear
from .mixers import DepthMixer, OpMixer
from .norm import EntangledLayerNorm
from .spec import WidthSpec

__all__ = [
    "EntangledModule",
    "EntangledLinear",
    "EntangledConv2d",
    "EntangledBatchNorm2d",
    "EntangledLayerNorm",
    "EntangledEmbedding",
    "EntangledAttention",
    "DepthMixer",
    "OpMixer",
    "HardArch",
    "one_hot_arch",
    "candidate_mix",
    "hard_index",
    "is_sized",
    "end_index",
    "set_arch",
    "get_arch",
    "accepts_arch",
    "entangle",
    "extract",
    "ENTANGLE_ARGS",
    "Converter",
    "Guard",
    "register_converter",
    "register_guard",
    "layer_norm_converter",
    "check_flow",
    "WidthSpec",
]

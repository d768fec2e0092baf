"""Converters of single layers: the stock torch layers, timm's ``BatchNormAct2d``,
``Conv2dSame`` and ``LayerNorm2d``, transformers' ``Conv1D`` and nanoGPT's
``LayerNorm`` (weight and optional bias). Library classes are keyed by their
qualified names; nothing here imports timm or transformers."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import HardArch
from ..base import EntangledModule
from ..conv import EntangledBatchNorm2d, EntangledConv2d
from ..embedding import EntangledEmbedding
from ..linear import EntangledLinear
from ..norm import EntangledLayerNorm
from .registry import Converter, Origin, copy_state, refuse_tied, register_converter, retype

__all__ = [
    "EntangledBatchNormAct2d",
    "EntangledConv2dSame",
    "EntangledLayerNorm2d",
    "layer_norm_converter",
]


def _origin(new: nn.Module) -> Origin:
    return new.__dict__["_tk_origin"]


def _stock_extract(ent: EntangledModule, selection: Mapping, origin: Origin) -> nn.Module:
    out = retype(ent.extract(selection), origin)
    out.train(ent.training)
    return out


# ---------------------------------------------------------------- stock torch layers
def _linear(m, specs, choices, options):
    specs = dict(specs)
    seg = specs.pop("out_segments", 1)
    if isinstance(seg, bool) or not isinstance(seg, int):
        raise ValueError(f"out_segments={seg!r} must be an int")
    return EntangledLinear.from_module(m, choices, out_segments=seg, **specs)


def _conv2d(m, specs, choices, options):
    kt = bool(options.get("kernel_transform")) and isinstance(specs.get("kernel_size"), str)
    return EntangledConv2d.from_module(m, choices, kernel_transform=kt, **specs)


def _bn(m, specs, choices, options):
    return EntangledBatchNorm2d.from_module(m, choices, **specs)


def _ln(m, specs, choices, options):
    return EntangledLayerNorm.from_module(m, choices, **specs)


def _emb(m, specs, choices, options):
    return EntangledEmbedding.from_module(m, choices, **specs)


LINEAR = register_converter(
    nn.Linear,
    Converter(
        ("in_features", "out_features", "out_segments"), _linear, _stock_extract, "nn.Linear"
    ),
)
CONV2D = register_converter(
    nn.Conv2d,
    Converter(
        ("in_channels", "out_channels", "kernel_size", "groups"),
        _conv2d,
        _stock_extract,
        "nn.Conv2d",
    ),
)
BN2D = register_converter(
    nn.BatchNorm2d, Converter(("num_features",), _bn, _stock_extract, "nn.BatchNorm2d")
)
LN = register_converter(
    nn.LayerNorm, Converter(("normalized_shape",), _ln, _stock_extract, "nn.LayerNorm")
)
EMB = register_converter(
    nn.Embedding, Converter(("embedding_dim",), _emb, _stock_extract, "nn.Embedding")
)


# ---------------------------------------------------------------- timm BatchNormAct2d
class EntangledBatchNormAct2d(EntangledBatchNorm2d):
    """timm's ``BatchNormAct2d``: the entangled batch norm, then the layer's own
    ``drop`` and ``act`` submodules (kept: same names, same modules)."""

    def forward(self, x: torch.Tensor, arch=None) -> torch.Tensor:
        return self.act(self.drop(super().forward(x, arch)))

    def extract(self, selection: Mapping[str, Any]) -> nn.Module:
        bn = EntangledBatchNorm2d.extract(self, selection)
        if "_tk_origin" not in self.__dict__:
            return nn.Sequential(bn, copy_state(self.drop), copy_state(self.act))
        out = retype(bn, _origin(self))
        out._modules = {"drop": copy_state(self.drop), "act": copy_state(self.act)}
        out.train(self.training)
        return out


def _bn_act(m, specs, choices, options):
    new = EntangledBatchNormAct2d.from_module(m, choices, **specs)
    new.drop, new.act = m.drop, m.act
    return new


register_converter(
    "timm.layers.norm_act.BatchNormAct2d",
    Converter(("num_features",), _bn_act, lambda e, s, o: e.extract(s), "timm BatchNormAct2d"),
)


# ---------------------------------------------------------------- timm LayerNorm2d
class EntangledLayerNorm2d(EntangledLayerNorm):
    """timm's ``LayerNorm2d``: the entangled LayerNorm over the channels of an
    ``[N, C, H, W]`` input (permuted to channels-last and back)."""

    def forward(self, x: torch.Tensor, arch=None) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1), arch).permute(0, 3, 1, 2)

    def extract(self, selection: Mapping[str, Any]) -> nn.Module:
        ln = EntangledLayerNorm.extract(self, selection)
        if "_tk_origin" not in self.__dict__:
            raise TypeError("EntangledLayerNorm2d.extract: made by entangle() only")
        out = retype(ln, _origin(self))
        out.train(self.training)
        return out


def _ln2d(m, specs, choices, options):
    if getattr(m, "_fast_norm", False):
        raise ValueError(
            "timm LayerNorm2d with fast norm enabled; disable fast norm before entangle"
        )
    return EntangledLayerNorm2d.from_module(m, choices, **specs)


register_converter(
    "timm.layers.norm.LayerNorm2d",
    Converter(("normalized_shape",), _ln2d, lambda e, s, o: e.extract(s), "timm LayerNorm2d"),
)


# ---------------------------------------------------------------- timm Conv2dSame
def _pad_same(x: torch.Tensor, k: tuple, stride: tuple, dilation: tuple) -> torch.Tensor:
    """timm's ``pad_same``: TensorFlow 'same' padding of ``x [N, C, H, W]`` for kernel ``k``."""
    pads = []
    for i in (1, 0):  # F.pad order: last dim first
        size = x.shape[-2 + i]
        s, d = stride[i], dilation[i]
        p = max((math.ceil(size / s) - 1) * s + (k[i] - 1) * d + 1 - size, 0)
        pads += [p // 2, p - p // 2]
    return F.pad(x, pads) if any(pads) else x


class EntangledConv2dSame(EntangledConv2d):
    """timm's ``Conv2dSame`` (TensorFlow 'same' padding, computed from the input size,
    then an unpadded conv).

    The input is padded for the kernel that runs: the max kernel (no arch, soft arch)
    or the chosen one (HardArch). With a kernel-size choice (odd sizes >= 3) the TF
    padding of the max kernel exceeds a smaller kernel's by ``d (k_max - k) / 2`` on
    each side, so the centred crop of the superposed max kernel sees exactly the
    smaller kernel's TF padding: the soft path is exact for every candidate.
    """

    def _kernel_of(self, arch) -> tuple:
        if isinstance(arch, HardArch) and self.kernel_names:
            k = self._selection(arch, self.kernel_names)[self.kernel_names[0]]
            return (k, k)
        return tuple(self.kernel_size)

    def forward(self, x: torch.Tensor, arch=None) -> torch.Tensor:
        arch = self._resolve(arch)
        x = _pad_same(x, self._kernel_of(arch), self.stride, self.dilation)
        return super().forward(x, arch)

    def sliced(self, values):
        w, b, kw = super().sliced(values)
        kw["padding"] = (0, 0)
        return w, b, kw

    def extract(self, selection: Mapping[str, Any]) -> nn.Module:
        conv = EntangledConv2d.extract(self, selection)
        out = retype(conv, _origin(self), keep=("padding", "_reversed_padding_repeated_twice"))
        out.train(self.training)
        return out


def _conv_same(m, specs, choices, options):
    ks = specs.get("kernel_size")
    view = copy.copy(m)  # shares the parameters; only the padding differs
    view.__dict__ = dict(m.__dict__)
    if isinstance(ks, str):
        vals = choices.get(ks, ()) if isinstance(choices, Mapping) else ()
        if any(int(v) < 3 or int(v) % 2 == 0 for v in vals):
            raise ValueError(
                f"kernel_size={ks!r} {list(vals)}: Conv2dSame with a kernel-size choice needs odd "
                "sizes >= 3 (a 1x1 candidate's TF padding does not follow the others')"
            )
        view.padding = "same"
    kt = bool(options.get("kernel_transform")) and isinstance(ks, str)
    new = EntangledConv2dSame.from_module(view, choices, kernel_transform=kt, **specs)
    new.padding = (0, 0)  # the TF padding is applied to the input (forward)
    return new


register_converter(
    "timm.layers.conv2d_same.Conv2dSame",
    Converter(
        ("in_channels", "out_channels", "kernel_size", "groups"),
        _conv_same,
        lambda e, s, o: e.extract(s),
        "timm Conv2dSame",
    ),
)


# ---------------------------------------------------------------- transformers Conv1D
class EntangledConv1D(EntangledLinear):
    """transformers' ``Conv1D`` (``y = x @ W + b`` with ``W [in, out]``) as an
    :class:`EntangledLinear`. Its weight is the transpose of the layer's, a NEW
    parameter (create the optimizer after entangle); extract writes a ``Conv1D``
    back with the ``[in, out]`` layout."""

    def extract(self, selection: Mapping[str, Any]) -> nn.Module:
        lin = EntangledLinear.extract(self, selection)
        if "_tk_origin" not in self.__dict__:
            return lin
        o = _origin(self)
        out = o.cls.__new__(o.cls)
        nn.Module.__init__(out)
        out.__dict__.update(copy_state(o.state))
        out.nf, out.nx = lin.out_features, lin.in_features
        out.weight = nn.Parameter(
            lin.weight.detach().t().contiguous(), requires_grad=lin.weight.requires_grad
        )
        out.bias = lin.bias
        out.train(self.training)
        return out


def _conv1d(m, specs, choices, options):
    specs = dict(specs)
    seg = specs.pop("out_segments", 1)
    if isinstance(seg, bool) or not isinstance(seg, int):
        raise ValueError(f"out_segments={seg!r} must be an int")
    refuse_tied(options, m.weight)
    nx, nf = m.weight.shape
    view = nn.Linear(nx, nf, bias=m.bias is not None, device="meta")
    view.weight = nn.Parameter(
        m.weight.detach().t().contiguous(), requires_grad=m.weight.requires_grad
    )
    view.bias = m.bias
    return EntangledConv1D.from_module(view, choices, out_segments=seg, **specs)


CONV1D = register_converter(
    "transformers.pytorch_utils.Conv1D",
    Converter(
        ("in_features", "out_features", "out_segments"),
        _conv1d,
        lambda e, s, o: e.extract(s),
        "transformers Conv1D",
    ),
)


# ---------------------------------------------------------------- LayerNorm with optional bias
def layer_norm_converter(
    eps: float = 1e-5, *, weight: str = "weight", bias: str = "bias"
) -> Converter:
    """A converter for a custom LayerNorm class over the last dimension that holds a
    1-D ``weight`` and an optional ``bias`` (``None`` allowed) and computes
    ``F.layer_norm(x, weight.shape, weight, bias, eps)``, e.g. nanoGPT's. Register it
    in one line: ``register_converter(MyLayerNorm, layer_norm_converter(1e-5))``.
    Extract returns the class itself with the sliced parameters."""

    def ent(m, specs, choices, options):
        w, b = getattr(m, weight), getattr(m, bias, None)
        if w is None or w.dim() != 1:
            raise ValueError(f"{type(m).__name__}: expected a 1-D {weight!r} parameter")
        view = nn.LayerNorm(w.shape[0], eps=eps, bias=b is not None, device="meta")
        view.weight, view.bias = w, b
        new = EntangledLayerNorm.from_module(view, choices, **specs)
        new.__dict__["_tk_names"] = (weight, bias)
        return new

    def ext(e, selection, origin):
        ln = e.extract(selection)
        out = origin.cls.__new__(origin.cls)
        nn.Module.__init__(out)
        out.__dict__.update(copy_state(origin.state))
        wn, bn = e.__dict__.get("_tk_names", (weight, bias))
        out._parameters[wn] = ln.weight
        if bn in origin.state or ln.bias is None and bn not in e._parameters:
            out.__dict__[bn] = None  # a plain attribute set to None (nanoGPT's bias=False)
        else:
            out._parameters[bn] = ln.bias
        out.train(e.training)
        return out

    return Converter(("normalized_shape",), ent, ext, "LayerNorm (weight, optional bias)")


_NANOGPT_LN = "F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)"


def _is_nanogpt_layernorm(m: nn.Module) -> bool:
    """Karpathy's nanoGPT ``LayerNorm``: a direct nn.Module subclass named LayerNorm
    with exactly ``weight`` [n] and ``bias`` ([n] or None), no buffers or children, whose
    forward is ``F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)``."""
    t = type(m)
    if t.__name__ != "LayerNorm" or t.__bases__ != (nn.Module,):
        return False
    names = set(m._parameters)
    if (
        m._buffers
        or m._modules
        or not (
            names == {"weight", "bias"}
            or (names == {"weight"} and m.__dict__.get("bias", 0) is None)
        )
    ):
        return False
    w, b = m._parameters["weight"], m._parameters.get("bias")
    if w is None or w.dim() != 1 or (b is not None and tuple(b.shape) != tuple(w.shape)):
        return False
    try:
        src = inspect.getsource(t.forward)
    except (OSError, TypeError):
        return False
    body = [
        ln.strip() for ln in src.splitlines()[1:] if ln.strip() and not ln.strip().startswith("#")
    ]
    return body == [f"return {_NANOGPT_LN}"]


_nano_ln = layer_norm_converter(1e-5)
register_converter(
    None,
    Converter(
        _nano_ln.args,
        _nano_ln.entangle,
        _nano_ln.extract,
        "nanoGPT LayerNorm",
        match=_is_nanogpt_layernorm,
    ),
)


# ---------------------------------------------------------------- timm LayerNorm
def _timm_ln(m, specs, choices, options):
    if getattr(m, "_fast_norm", False):
        raise ValueError(
            "timm LayerNorm with fast norm enabled (timm.layers.set_fast_norm) computes with "
            "apex / a low-precision kernel; disable fast norm before entangle"
        )
    return EntangledLayerNorm.from_module(m, choices, **specs)


register_converter(
    "timm.layers.norm.LayerNorm",
    Converter(("normalized_shape",), _timm_ln, _stock_extract, "timm LayerNorm"),
)

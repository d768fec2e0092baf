"""EntangledConv2d (EntangledBatchNorm2d lives in nn/batchnorm.py, re-exported here)."""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import Layout, centered_range
from ..ops.entangled_conv import entangled_conv2d
from ..ops.superpose import superpose
from . import plain
from .arch import HardArch, candidate_mix
from .base import EntangledModule
from .spec import Spec, WidthSpec, check_choices, ordered_union

__all__ = ["EntangledConv2d", "EntangledBatchNorm2d"]


def _pair(v: Any, arg: str) -> tuple[int, int]:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = (int(v), int(v))
    if not (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in v)
    ):
        raise TypeError(f"{arg}={v!r}: expected an int or a pair of ints")
    return int(v[0]), int(v[1])


class EntangledConv2d(EntangledModule):
    """2-D convolution whose in/out channels, kernel size and groups are choices.

    Args:
        in_channels, out_channels: width specs (see :mod:`tangle_kernels.nn.spec`).
        kernel_size: an int or a pair (fixed), or a choice name whose values are odd
            kernel sizes; a candidate of size ``k`` is the centred ``k x k`` crop of the
            max kernel (3x3 and 5x5 inside 7x7).
        choices: ``{name: values}`` for the names used by the specs.
        stride, dilation: ints or pairs.
        padding: ``"same"`` (default; ``dilation * (k - 1) / 2`` on each side, also with
            ``stride > 1``; needs odd kernels), or, for a fixed kernel only, an int, a pair
            or ``"valid"``. With a kernel choice every candidate uses its own "same"
            padding, which is why the centred crops line up: the max-size conv with the
            zero-padded small kernel equals the small conv.
        groups: an int or a width spec. With ``groups > 1`` and channel choices, groups
            must follow the channels so that every group keeps its width:
            ``in_channels / groups`` and ``out_channels / groups`` must be the same for
            every candidate (depthwise: ``in_channels = out_channels = groups = "c"``).
            Then the max-size conv (``groups`` at its max) computes every candidate's
            channels exactly.
        bias: whether the layer has a bias (superposed over the out-channel choices).
        kernel_transform: Once-for-All kernel transformation (Cai et al. 2020): a
            smaller kernel is not the plain crop but ``vec(crop(W_next)) @ M^T`` with a
            learned ``k^2 x k^2`` matrix ``M`` per step between consecutive kernel sizes
            (7 -> 5 -> 3), initialised to the identity. Parameters
            ``kernel_transform["7to5"]``, ...

    Parameters: ``weight [O_max, I_max/G, k_max, k_max]`` (``I_max/G``: ``I_max`` when
    groups is 1, else the fixed group width), ``bias [O_max]``; nn.Conv2d's init.

    Soft arch (padded-sum oracle)::

        W_mix = sum_k mix_k * pad(W_k)       W_k = W[:o_k, :i_k/g_k, crop(kk)]
        y     = conv2d(x, W_mix, b_mix, stride, "same" for k_max, dilation, G_max)

    via :func:`superpose` (one pass over the weight, whatever K). With
    ``kernel_transform`` the candidates are not boxes of W (a transformed kernel is a
    new tensor), so ``W_mix = sum_j superpose(pad(W^(j)), mix[:, j], channel layout)``
    over the kernel sizes j, with plain torch ops: one weight-sized padded temporary
    and one superpose per kernel size, plus the ``k^2 x k^2`` GEMMs of the transforms
    (for 3 kernel sizes about 3x the memory traffic of the box path).

    HardArch: ``pad(conv2d(x[:, :i], s_w W_k, s_b b[:o], padding=same(k), groups=g))``,
    the sub-network's conv, zero-padded to ``O_max`` channels (``s``: the chosen arch
    entries, value 1, see :mod:`tangle_kernels.nn.base`). No arch: the plain max conv.
    """

    def __init__(
        self,
        in_channels: Spec,
        out_channels: Spec,
        kernel_size: int | str | tuple[int, int],
        choices: Mapping[str, Sequence] | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = "same",
        dilation: int | tuple[int, int] = 1,
        groups: Spec = 1,
        bias: bool = True,
        *,
        kernel_transform: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_spec = WidthSpec(in_channels, choices, "in_channels")
        self.out_spec = WidthSpec(out_channels, choices, "out_channels")
        self.groups_spec = WidthSpec(groups, choices, "groups")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError(f"stride={stride!r} and dilation={dilation!r} must be >= 1")
        # -- kernel size
        if isinstance(kernel_size, str):
            kc = check_choices(choices, [kernel_size], "kernel_size", kernel_size)[kernel_size]
            for k in kc:
                if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
                    raise ValueError(
                        f"kernel_size={kernel_size!r}: kernel size {k!r} is not a positive int"
                    )
                if k % 2 == 0:
                    raise ValueError(
                        f"kernel_size={kernel_size!r}: kernel size {k} is even; kernel-size "
                        "choices must be odd so that each is a centred crop with 'same' padding"
                    )
            self.kernel_names: tuple[str, ...] = (kernel_size,)
            self.kernel_values = tuple(int(k) for k in kc)
            km = max(self.kernel_values)
            self.kernel_size = (km, km)
        else:
            self.kernel_names = ()
            self.kernel_size = _pair(kernel_size, "kernel_size")
            if min(self.kernel_size) < 1:
                raise ValueError(f"kernel_size={kernel_size!r} must be positive")
            self.kernel_values = ()
        self.kernel_spec = kernel_size
        for n in self.kernel_names:
            if n in self.in_spec.names or n in self.out_spec.names or n in self.groups_spec.names:
                raise ValueError(
                    f"kernel_size={n!r}: the kernel-size choice cannot also size "
                    "the channels or the groups"
                )
        # -- padding
        if isinstance(padding, str):
            if padding == "same":
                if any(k % 2 == 0 for k in self.kernel_size):
                    raise ValueError(
                        f"padding='same' needs odd kernel sizes, got kernel_size={self.kernel_size}"
                    )
                self.padding_mode_same = True
                self.padding = tuple(
                    d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size)
                )
            elif padding == "valid":
                if self.kernel_names:
                    raise ValueError(
                        "padding='valid': with a kernel-size choice only 'same' "
                        "keeps the centred crops aligned"
                    )
                self.padding_mode_same = False
                self.padding = (0, 0)
            else:
                raise ValueError(f"padding={padding!r}: expected 'same', 'valid', an int or a pair")
        else:
            p = _pair(padding, "padding")
            same = tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))
            if self.kernel_names and p != same:
                raise ValueError(
                    f"padding={padding!r}: with a kernel-size choice the padding must be 'same' "
                    f"({same} for the max kernel) so that the centred crops line up"
                )
            self.padding_mode_same = bool(self.kernel_names)
            self.padding = p
        # -- names, choices, groups validation
        self.weight_names = ordered_union(
            self.in_spec.names, self.out_spec.names, self.groups_spec.names, self.kernel_names
        )
        allc = {**self.in_spec.choices, **self.out_spec.choices, **self.groups_spec.choices}
        if self.kernel_names:
            allc[self.kernel_names[0]] = self.kernel_values
        self.choices = {n: allc[n] for n in self.weight_names}
        self.channel_names = tuple(n for n in self.weight_names if n not in self.kernel_names)
        self.bias_names = tuple(n for n in self.weight_names if n in self.out_spec.names)
        gw_in, gw_out = set(), set()
        for combo in itertools.product(*(self.choices[n] for n in self.channel_names)):
            v = dict(zip(self.channel_names, combo))
            i, o, g = self.in_spec.size(v), self.out_spec.size(v), self.groups_spec.size(v)
            if i % g or o % g:
                raise ValueError(
                    f"groups={groups!r}: {g} groups do not divide in_channels={i} and "
                    f"out_channels={o} (candidate {v})"
                )
            gw_in.add(i // g)
            gw_out.add(o // g)
        if self.groups_spec.max > 1 and (len(gw_in) > 1 or len(gw_out) > 1):
            raise ValueError(
                f"groups={groups!r}: with groups > 1 the group width must be the same for every "
                f"candidate (in_channels/groups in {sorted(gw_in)}, out_channels/groups in "
                f"{sorted(gw_out)}); let groups follow the channel choice, e.g. depthwise "
                "in_channels = out_channels = groups = 'c'"
            )
        self.in_channels = self.in_spec.max
        self.out_channels = self.out_spec.max
        self.groups = self.groups_spec.max
        self.weight = nn.Parameter(
            torch.empty(
                self.out_channels, max(gw_in), *self.kernel_size, device=device, dtype=dtype
            )
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        # -- OFA kernel transforms
        self.kernel_transform = None
        if kernel_transform:
            if not self.kernel_names:
                raise ValueError(
                    "kernel_transform=True needs a kernel-size choice (kernel_size "
                    "must name a choice)"
                )
            ks = sorted(self.kernel_values, reverse=True)
            self.kernel_transform = nn.ParameterDict(
                {
                    f"{a}to{b}": nn.Parameter(torch.eye(b * b, device=device, dtype=dtype))
                    for a, b in zip(ks[:-1], ks[1:])
                }
            )
        self.reset_parameters()
        self._build_layouts()

    # ------------------------------------------------------------------ setup
    def _box(self, v: Mapping[str, Any], kernel: bool = True) -> list:
        i, o, g = self.in_spec.size(v), self.out_spec.size(v), self.groups_spec.size(v)
        kh, kw = self.kernel_size
        if kernel and self.kernel_names:
            k = v[self.kernel_names[0]]
            rh, rw = (
                centered_range(kh, k, what="kernel_size"),
                centered_range(kw, k, what="kernel_size"),
            )
        else:
            rh, rw = (0, kh), (0, kw)
        return [(0, o), (0, i // g), rh, rw]

    def _build_layouts(self) -> None:
        shape = tuple(self.weight.shape)
        ch = {n: self.choices[n] for n in self.weight_names}
        self.weight_layout = (
            Layout.grid(shape, ch, lambda **v: self._box(v)) if self.weight_names else None
        )
        self.channel_layout = None
        if self.kernel_transform is not None and self.channel_names:
            self.channel_layout = Layout.grid(
                shape,
                {n: self.choices[n] for n in self.channel_names},
                lambda **v: self._box(v, kernel=False),
            )
        self.bias_layout = (
            Layout.grid(
                (self.out_channels,),
                {n: self.choices[n] for n in self.bias_names},
                lambda **v: [(0, self.out_spec.size(v))],
            )
            if self.bias is not None and self.bias_names
            else None
        )

    def reset_parameters(self) -> None:
        """nn.Conv2d's initialisation (fan-in of the max kernel)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_module(
        cls,
        layer: nn.Conv2d,
        choices: Mapping[str, Sequence] | None = None,
        *,
        in_channels: Spec | None = None,
        out_channels: Spec | None = None,
        kernel_size: int | str | None = None,
        groups: Spec | None = None,
        kernel_transform: bool = False,
    ) -> EntangledConv2d:
        """The entangled version of ``layer`` sharing its parameters. Unspecified
        arguments stay fixed at the layer's; every spec's max must equal the layer's."""
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"layer: expected an nn.Conv2d, got {type(layer).__name__}")
        if layer.padding_mode != "zeros":
            raise ValueError(
                f"layer: padding_mode={layer.padding_mode!r} is not supported (only 'zeros')"
            )
        ins = layer.in_channels if in_channels is None else in_channels
        outs = layer.out_channels if out_channels is None else out_channels
        grp = layer.groups if groups is None else groups
        from .linear import _check_max

        _check_max(WidthSpec(ins, choices, "in_channels"), layer.in_channels, "in_channels")
        _check_max(WidthSpec(outs, choices, "out_channels"), layer.out_channels, "out_channels")
        _check_max(WidthSpec(grp, choices, "groups"), layer.groups, "groups")
        ks: Any = layer.kernel_size if kernel_size is None else kernel_size
        padding: Any = layer.padding
        if isinstance(ks, str):
            vals = check_choices(choices, [ks], "kernel_size", ks)[ks]
            kh, kw = layer.kernel_size
            if kh != kw:
                raise ValueError(
                    f"kernel_size={ks!r}: the layer's kernel {layer.kernel_size} is not square"
                )
            bad = [k for k in vals if isinstance(k, numbers.Integral) and k > kh]
            if bad:
                raise ValueError(
                    f"kernel_size={ks!r}: kernel size {max(bad)} is larger than the "
                    f"existing layer's {kh}x{kw} kernel"
                )
            if max(vals) != kh:
                raise ValueError(
                    f"kernel_size={ks!r}: the largest kernel size {max(vals)} must be "
                    f"the existing layer's {kh}"
                )
            if isinstance(padding, str) and padding != "same":
                raise ValueError(
                    f"layer: padding={padding!r}; a kernel-size choice needs 'same' padding"
                )
            padding = "same" if isinstance(padding, str) else padding
        elif isinstance(ks, numbers.Integral) and (ks, ks) != tuple(layer.kernel_size):
            raise ValueError(f"kernel_size={ks!r} differs from the layer's {layer.kernel_size}")
        else:
            ks = tuple(layer.kernel_size)
        new = cls(
            ins,
            outs,
            ks,
            choices,
            stride=layer.stride,
            padding=padding,
            dilation=layer.dilation,
            groups=grp,
            bias=layer.bias is not None,
            kernel_transform=kernel_transform,
            device="meta",
        )
        if tuple(new.weight.shape) != tuple(layer.weight.shape):
            raise ValueError(
                f"layer: weight shape {tuple(layer.weight.shape)} does not match "
                f"the entangled layer's {tuple(new.weight.shape)}"
            )
        new.weight = layer.weight
        new.bias = layer.bias
        if new.kernel_transform is not None:
            for key, p in new.kernel_transform.items():
                new.kernel_transform[key] = nn.Parameter(
                    torch.eye(p.shape[0], device=layer.weight.device, dtype=layer.weight.dtype)
                )
        return new

    # ------------------------------------------------------------------ kernels
    def kernel_weights(self) -> dict[int, torch.Tensor]:
        """With ``kernel_transform``: ``{k: W^(k)}``, the full-channel ``k x k`` kernel of
        every kernel size (OFA: crop the next larger one, apply its matrix)."""
        ks = sorted(self.kernel_values, reverse=True)
        out = {ks[0]: self.weight}
        cur = self.weight
        n_out, n_in = self.weight.shape[:2]
        for a, b in zip(ks[:-1], ks[1:]):
            lo = (a - b) // 2
            crop = cur[:, :, lo : lo + b, lo : lo + b].reshape(n_out * n_in, b * b)
            cur = F.linear(crop, self.kernel_transform[f"{a}to{b}"]).reshape(n_out, n_in, b, b)
            out[b] = cur
        return out

    def _kernel(self, k: int | None) -> torch.Tensor:
        """The full-channel kernel of size ``k`` (crop or OFA transform)."""
        if k is None or k == self.kernel_size[0] and k == self.kernel_size[1]:
            return self.weight
        if self.kernel_transform is not None:
            return self.kernel_weights()[k]
        lo = (self.kernel_size[0] - k) // 2
        return self.weight[:, :, lo : lo + k, lo : lo + k]

    def sliced(self, values: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """The sub-network's ``(weight, bias, conv kwargs)`` for ``values``."""
        i, o, g = (
            self.in_spec.size(values),
            self.out_spec.size(values),
            self.groups_spec.size(values),
        )
        k = values[self.kernel_names[0]] if self.kernel_names else None
        w = self._kernel(k)[:o, : i // g]
        b = self.bias[:o] if self.bias is not None else None
        if k is not None:
            pad = tuple(d * (k - 1) // 2 for d in self.dilation)
        else:
            pad = self.padding
        return w, b, dict(stride=self.stride, padding=pad, dilation=self.dilation, groups=g)

    # ------------------------------------------------------------------ forward
    def _conv(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(
        self, x: torch.Tensor, arch: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``x [N, I_max, H, W] -> [N, O_max, H', W']`` (see the class docstring)."""
        arch = self._resolve(arch)
        if arch is None or not self.weight_names:
            return self._conv(x, self.weight, self.bias)
        if isinstance(arch, HardArch):
            return self.forward_hard(x, arch)
        if self.kernel_transform is None:
            has_bl = self.bias is not None and self.bias_layout is not None
            return entangled_conv2d(
                x, self.weight, self.bias, self._mix(arch, self.weight_names), self.weight_layout,
                bias_mix=self._mix(arch, self.bias_names) if has_bl else None,
                bias_layout=self.bias_layout if has_bl else None,
                stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
            )
        else:
            self._vectors(arch, self.weight_names)
            nk = len(self.kernel_values)
            mix = candidate_mix(arch, self.channel_names + self.kernel_names).reshape(-1, nk)
            kws = self.kernel_weights()
            kmax = self.kernel_size[0]
            w = None
            for j, k in enumerate(self.kernel_values):
                p = (kmax - k) // 2
                wk = F.pad(kws[k], (p, p, p, p)) if p else kws[k]
                if self.channel_layout is not None:
                    term = superpose(wk, mix[:, j].contiguous(), self.channel_layout)
                else:
                    term = wk * mix[0, j].to(wk.dtype)
                w = term if w is None else w + term
        b = self.bias
        if b is not None and self.bias_layout is not None:
            b = superpose(b, self._mix(arch, self.bias_names), self.bias_layout)
        return self._conv(x, w, b)

    def forward_hard(self, x: torch.Tensor, arch: HardArch) -> torch.Tensor:
        """The one-hot fast path: the sub-network's conv, zero-padded to ``O_max``."""
        vals = self._selection(arch, self.weight_names)
        w, b, kw = self.sliced(vals)
        i = self.in_spec.size(vals)
        s_w = self._scale(arch, self.weight_names, w.dtype)
        if s_w is not None:
            w = w * s_w
        if b is not None and self.bias_names:
            s_b = self._scale(arch, self.bias_names, b.dtype)
            if s_b is not None:
                b = b * s_b
        y = F.conv2d(x[:, :i], w, b, **kw)
        o = w.shape[0]
        return F.pad(y, (0, 0, 0, 0, 0, self.out_channels - o)) if o < self.out_channels else y

    def extract(self, selection: Mapping[str, Any]) -> plain.Conv2d:
        """``nn.Conv2d`` of the chosen sub-network with the (cropped or transformed)
        weights copied."""
        vals = self._values(selection, self.weight_names)
        w, b, kw = self.sliced(vals)
        conv = plain.Conv2d(
            self.in_spec.size(vals),
            w.shape[0],
            tuple(w.shape[2:]),
            bias=b is not None,
            device=w.device,
            dtype=w.dtype,
            **kw,
        )
        with torch.no_grad():
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
        return conv

    def extra_repr(self) -> str:
        s = (
            f"in_channels={self.in_spec.spec!r} (max {self.in_channels}), "
            f"out_channels={self.out_spec.spec!r} (max {self.out_channels}), "
            f"kernel_size={self.kernel_spec!r} (max {self.kernel_size}), stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}"
        )
        if self.groups_spec.spec != 1:
            s += f", groups={self.groups_spec.spec!r} (max {self.groups})"
        if self.bias is None:
            s += ", bias=False"
        if self.kernel_transform is not None:
            s += ", kernel_transform=True"
        return s


from .batchnorm import EntangledBatchNorm2d  # noqa: E402,F401  (its former home; re-exported)

"""MobileNetV3 / Once-for-All space (Cai et al. 2020): per block kernel size 3/5/7 (with
OFA kernel-transform matrices 7->5->3) and expand ratio 3/4/6, per stage depth 2/3/4.

Network (OFA MobileNetV3, widths divided by hparam ``width_div`` for small versions)::

    stem   conv 3x3 s2 -> 16, BN, hswish; MBConv(16 -> 16, expand 1, 3x3) with residual
    stages widths 24/40/80/112/160, strides 2/2/2/1/2, act relu/relu/hswish x3,
           squeeze-excite off/on/off/on/on; up to 4 MBConv blocks each (DepthMixer)
    head   conv 1x1 -> 960, BN, hswish, global pool, linear -> 1280 (no bias), hswish,
           linear -> classes

MBConv block (entangled): ``EntangledConv2d(c, (c, "e"), 1)`` expand + BN + act,
depthwise ``EntangledConv2d((c, "e"), (c, "e"), "k", groups=(c, "e"),
kernel_transform=True)`` + BN + act, squeeze-excite with hidden width ``(("e", c //
4))``, ``EntangledConv2d((c, "e"), c_out, 1)`` project + BN; residual when the stride
is 1 and ``c == c_out``. Choices: ``s{i}_b{j}_k``, ``s{i}_b{j}_e`` (stage i, block j)
and ``s{i}_depth``; their values come from hparams ``kernel_sizes``, ``expand_ratios``,
``depths`` (comma-separated).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import nn

from .. import nn as tnn
from ._vision import VisionSpace
from .base import SpaceError

__all__ = ["MobileNetV3Space", "MBConv", "MobileNetV3"]

WIDTHS = [24, 40, 80, 112, 160]
STRIDES = [2, 2, 2, 1, 2]
ACTS = ["relu", "relu", "hswish", "hswish", "hswish"]
SE = [False, True, False, True, True]


def _act(name: str) -> nn.Module:
    return nn.ReLU() if name == "relu" else nn.Hardswish()


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SpaceError(f"hparam {what}={text!r}: expected comma-separated integers") from None
    if not vals:
        raise SpaceError(f"hparam {what}={text!r}: empty")
    return vals


def _call(m, x, arch):
    return m(x, arch) if arch is not None else m(x)


class SqueezeExcite(nn.Module):
    def __init__(self, reduce: nn.Module, expand: nn.Module):
        super().__init__()
        self.reduce, self.expand = reduce, expand

    def forward(self, x, arch=None):
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(_call(self.expand, F.relu(_call(self.reduce, s, arch)), arch))
        return x * s


class MBConv(nn.Module):
    """Inverted bottleneck (supernet or extracted): expand, depthwise, [SE], project."""

    def __init__(self, expand, bn0, dw, bn1, se, project, bn2, act: str, residual: bool):
        super().__init__()
        self.expand, self.bn0, self.dw, self.bn1 = expand, bn0, dw, bn1
        self.se, self.project, self.bn2 = se, project, bn2
        self.act = _act(act)
        self.residual = residual

    def forward(self, x, arch=None):
        h = x
        if self.expand is not None:
            h = self.act(_call(self.bn0, _call(self.expand, h, arch), arch))
        h = self.act(_call(self.bn1, _call(self.dw, h, arch), arch))
        if self.se is not None:
            h = self.se(h, arch)
        h = _call(self.bn2, _call(self.project, h, arch), arch)
        return x + h if self.residual else h


class MobileNetV3(nn.Module):
    def __init__(self, stem, first, stages, head_conv, head_bn, feature, classifier):
        super().__init__()
        self.stem, self.first, self.stages = stem, first, nn.ModuleList(stages)
        self.head_conv, self.head_bn = head_conv, head_bn
        self.feature, self.classifier = feature, classifier

    def forward(self, x):
        x = self.first(self.stem(x))
        for st in self.stages:
            x = st(x)
        x = F.hardswish(self.head_bn(self.head_conv(x)))
        x = F.hardswish(self.feature(F.adaptive_avg_pool2d(x, 1).flatten(1)))
        return self.classifier(x)


class MobileNetV3Space(VisionSpace):
    name = "mobilenetv3"
    description = "MobileNetV3 / OFA: kernel 3/5/7 (transform matrices) x expand 3/4/6 x depth 2/3/4"
    dataset = "imagenet"
    default_hparams = {"image_size": 224, "in_channels": 3, "num_classes": 1000, "stages": 5,
                       "width_div": 1, "kernel_sizes": "3,5,7", "expand_ratios": "3,4,6",
                       "depths": "2,3,4", "val": "half", "n_train": 512, "n_val": 256,
                       "data_seed": 0}
    presets = {
        "tiny": {"hparams": {"image_size": 16, "num_classes": 4, "stages": 2, "width_div": 8,
                             "kernel_sizes": "3,5", "expand_ratios": "3,4", "depths": "1,2",
                             "n_train": 64, "n_val": 32}},
        "cifar": {"hparams": {"image_size": 32, "num_classes": 10}},
    }

    @classmethod
    def _default_choices_for(cls, hp: Mapping[str, Any]) -> dict[str, list]:
        ks = _ints(hp["kernel_sizes"], "kernel_sizes")
        es = _ints(hp["expand_ratios"], "expand_ratios")
        ds = _ints(hp["depths"], "depths")
        out: dict[str, list] = {}
        for i in range(1, int(hp["stages"]) + 1):
            for j in range(1, max(ds) + 1):
                out[f"s{i}_b{j}_k"] = list(ks)
                out[f"s{i}_b{j}_e"] = list(es)
            out[f"s{i}_depth"] = list(ds)
        return out

    def __init__(self, choices=None, hparams=None, preset=None):
        hp = dict(self.default_hparams)
        if preset is not None and preset in self.presets:
            hp.update(self.presets[preset].get("hparams", {}))
        hp.update(hparams or {})
        if not 1 <= int(hp["stages"]) <= 5:
            raise SpaceError(f"hparam stages={hp['stages']} must be in 1..5")
        self.default_choices = self._default_choices_for(hp)
        super().__init__(choices=choices, hparams=hparams, preset=preset)

    def check(self) -> None:
        hp = self.hparams
        if hp["width_div"] < 1:
            raise SpaceError(f"hparam width_div={hp['width_div']} must be >= 1")
        for n, vals in self.choices.items():
            if n.endswith("_k") and any(k < 1 or k % 2 == 0 for k in vals):
                raise SpaceError(f"choice {n}: kernel sizes must be odd, got {vals}")
            if n.endswith("_e") and any(e < 1 for e in vals):
                raise SpaceError(f"choice {n}: expand ratios must be >= 1, got {vals}")
            if n.endswith("_depth") and any(not 1 <= d <= self.max_depth() for d in vals):
                raise SpaceError(f"choice {n}: depths must be in 1..{self.max_depth()}, got {vals}")

    def max_depth(self) -> int:
        return max(_ints(self.hparams["depths"], "depths"))

    def widths(self):
        div = self.hparams["width_div"]
        w = lambda c: max(1, c // div)  # noqa: E731
        return w(16), [w(c) for c in WIDTHS[: self.hparams["stages"]]], w(960), w(1280)

    # ------------------------------------------------------------------ model
    def _block(self, i, j, c_in, c_out, stride, act, se):
        ch = self.choices
        e, k = f"s{i}_b{j}_e", f"s{i}_b{j}_k"
        mid = (c_in, e)
        sub = {e: ch[e], k: ch[k]}
        se_mod = None
        if se:
            hid = (e, max(1, c_in // 4))
            se_mod = SqueezeExcite(tnn.EntangledConv2d(mid, hid, 1, sub),
                                   tnn.EntangledConv2d(hid, mid, 1, sub))
        dw = tnn.EntangledConv2d(mid, mid, k, sub, stride=stride, groups=mid, bias=False,
                                 kernel_transform=len(ch[k]) > 1)
        return MBConv(tnn.EntangledConv2d(c_in, mid, 1, sub, bias=False), tnn.EntangledBatchNorm2d(mid, sub),
                      dw, tnn.EntangledBatchNorm2d(mid, sub), se_mod,
                      tnn.EntangledConv2d(mid, c_out, 1, sub, bias=False), nn.BatchNorm2d(c_out),
                      act, residual=stride == 1 and c_in == c_out)

    def build_supernet(self, data=None) -> nn.Module:
        if data is not None:
            self.check_data(data)
        hp = self.hparams
        s, widths, c_final, c_feat = self.widths()
        stem = nn.Sequential(nn.Conv2d(hp["in_channels"], s, 3, 2, 1, bias=False),
                             nn.BatchNorm2d(s), nn.Hardswish())
        first = MBConv(None, None, nn.Conv2d(s, s, 3, 1, 1, groups=s, bias=False), nn.BatchNorm2d(s),
                       None, nn.Conv2d(s, s, 1, bias=False), nn.BatchNorm2d(s), "relu", residual=True)
        stages, c = [], s
        for i, w in enumerate(widths, start=1):
            blocks = [self._block(i, j, c if j == 1 else w, w, STRIDES[i - 1] if j == 1 else 1,
                                  ACTS[i - 1], SE[i - 1]) for j in range(1, self.max_depth() + 1)]
            stages.append(tnn.DepthMixer(blocks, f"s{i}_depth", self.choices))
            c = w
        return MobileNetV3(stem, first, stages, nn.Conv2d(c, c_final, 1, bias=False),
                           nn.BatchNorm2d(c_final), nn.Linear(c_final, c_feat, bias=False),
                           nn.Linear(c_feat, hp["num_classes"]))

    # ---------------------------------------------------------------- costs
    def _costs(self, selection: Mapping[str, Any]) -> tuple[int, int]:
        sel = self.check_selection(selection)
        hp = self.hparams
        s, widths, c_final, c_feat = self.widths()
        r = (hp["image_size"] + 1) // 2
        params = hp["in_channels"] * s * 9 + 2 * s
        macs = r * r * hp["in_channels"] * s * 9
        params += s * 9 + 2 * s + s * s + 2 * s  # first block
        macs += r * r * (s * 9 + s * s)
        c = s
        for i, w in enumerate(widths, start=1):
            for j in range(1, sel[f"s{i}_depth"] + 1):
                c_in = c if j == 1 else w
                stride = STRIDES[i - 1] if j == 1 else 1
                e, k = sel[f"s{i}_b{j}_e"], sel[f"s{i}_b{j}_k"]
                m = c_in * e
                r_out = (r - 1) // stride + 1
                params += c_in * m + 2 * m + m * k * k + 2 * m + m * w + 2 * w
                macs += r * r * c_in * m + r_out * r_out * (m * k * k + m * w)
                if SE[i - 1]:
                    h = e * max(1, c_in // 4)
                    params += m * h + h + h * m + m
                    macs += 2 * m * h
                r = r_out
            c = w
        params += c * c_final + 2 * c_final + c_final * c_feat + c_feat * hp["num_classes"] + hp["num_classes"]
        macs += r * r * c * c_final + c_final * c_feat + c_feat * hp["num_classes"]
        return params, macs

    def arch_params(self, selection) -> int:
        return self._costs(selection)[0]

    def arch_macs(self, selection) -> int:
        return self._costs(selection)[1]

"""AutoFormer ViT space (Chen et al. 2021): embedding width, MLP ratio, number of heads
(fixed head width, a head-count candidate is a prefix of the heads) and depth.

Default values are those of the AutoFormer-Tiny supernet: embed 192/216/240, MLP ratio
3.5/4.0, heads 3/4 (head width 64), depth 12/13/14, on 224x224 images with 16x16
patches. The MLP ratio and the head count are per layer, as in AutoFormer and
TangleNAS (hparam ``per_layer=true``, the default: choices ``mlp_ratio_0 ..
mlp_ratio_{L-1}`` and ``heads_0 ..``, one architecture vector per block; see
:mod:`tangle_kernels.spaces.base`, "Per-layer choices"), or shared by every block
(``per_layer=false``: one ``mlp_ratio`` and one ``heads``). The embedding width and the
depth are global.

Modules (all :mod:`tangle_kernels.nn`): patch embedding ``EntangledConv2d(3, "embed",
patch, stride=patch)``; the class token and the position embeddings are the rows of one
``EntangledEmbedding(1 + N + 1, "embed")`` (row 0: class token; rows 1..N+1: positions
of the class token and the N patches); each block is ``x + attn(ln1(x))``, ``x +
fc2(gelu(fc1(ln2(x))))`` with ``EntangledLayerNorm("embed")``,
``EntangledAttention("embed", "heads_i", head_dim=64)`` and
``EntangledLinear("embed", ("embed", "mlp_ratio_i"))`` (``heads`` / ``mlp_ratio`` when
shared); the depth is a ``DepthMixer`` over
the blocks; a final ``EntangledLayerNorm`` and ``EntangledLinear("embed", classes)`` on
the class token.
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

__all__ = ["AutoFormerSpace", "ViT", "ViTBlock"]


def _call(m, x, arch):
    return m(x, arch) if arch is not None else m(x)


class ViTBlock(nn.Module):
    """Pre-norm transformer block (supernet or extracted)."""

    def __init__(self, ln1, attn, ln2, fc1, fc2):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.fc1, self.fc2 = ln1, attn, ln2, fc1, fc2

    def forward(self, x, arch=None):
        x = x + _call(self.attn, _call(self.ln1, x, arch), arch)
        h = F.gelu(_call(self.fc1, _call(self.ln2, x, arch), arch))
        return x + _call(self.fc2, h, arch)


class ViT(nn.Module):
    def __init__(self, patch, tokens, blocks, norm, head):
        super().__init__()
        self.patch, self.tokens, self.blocks, self.norm, self.head = patch, tokens, blocks, norm, head

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # [B, N, E]
        B, N, _ = x.shape
        idx = torch.arange(N + 2, device=x.device)
        t = self.tokens(idx)  # [N + 2, E]: class token, then N + 1 positions
        x = torch.cat([t[0].expand(B, 1, -1), x], dim=1) + t[1:]
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class AutoFormerSpace(VisionSpace):
    name = "autoformer"
    description = "AutoFormer-Tiny ViT: embed dim x MLP ratio x heads (width 64) per layer x depth"
    dataset = "imagenet"
    default_choices = {"embed": [192, 216, 240], "mlp_ratio": [3.5, 4.0], "heads": [3, 4],
                       "depth": [12, 13, 14]}
    default_hparams = {"image_size": 224, "patch_size": 16, "head_dim": 64, "in_channels": 3,
                       "num_classes": 1000, "val": "half", "n_train": 512, "n_val": 256,
                       "data_seed": 0, "per_layer": True}
    layer_choices = ("mlp_ratio", "heads")
    depth_choice = "depth"
    presets = {
        "tiny": {"choices": {"embed": [8, 12], "mlp_ratio": [3.5, 4.0], "heads": [1, 2],
                             "depth": [1, 2]},
                 "hparams": {"image_size": 8, "patch_size": 4, "head_dim": 4, "num_classes": 4,
                             "n_train": 64, "n_val": 32}},
        "cifar": {"hparams": {"image_size": 32, "patch_size": 4, "num_classes": 10}},
    }

    def check(self) -> None:
        hp, ch = self.hparams, self.choices
        if hp["image_size"] % hp["patch_size"]:
            raise SpaceError(f"hparam patch_size={hp['patch_size']} does not divide image_size="
                             f"{hp['image_size']}")
        for e in ch["embed"]:
            for r in self.layer_values("mlp_ratio"):
                if e < 1 or r <= 0 or abs(e * r - round(e * r)) > 1e-9:
                    raise SpaceError(f"choices embed={e}, mlp_ratio={r}: the MLP width e * r = "
                                     f"{e * r} is not a positive integer")
        if any(h < 1 for h in self.layer_values("heads")) or any(d < 1 for d in ch["depth"]):
            raise SpaceError("choices heads and depth must be >= 1")
        if hp["head_dim"] < 1:
            raise SpaceError(f"hparam head_dim={hp['head_dim']} must be >= 1")

    def num_patches(self) -> int:
        return (self.hparams["image_size"] // self.hparams["patch_size"]) ** 2

    def build_supernet(self, data=None) -> nn.Module:
        if data is not None:
            self.check_data(data)
        hp, ch = self.hparams, self.choices
        p = hp["patch_size"]
        patch = tnn.EntangledConv2d(hp["in_channels"], "embed", p, ch, stride=p, padding=0)
        tokens = tnn.EntangledEmbedding(self.num_patches() + 2, "embed", ch)
        nn.init.trunc_normal_(tokens.weight, std=0.02)
        blocks = []
        for i in range(max(ch["depth"])):
            heads, ratio = self.layer_choice("heads", i), self.layer_choice("mlp_ratio", i)
            blocks.append(ViTBlock(
                tnn.EntangledLayerNorm("embed", ch),
                tnn.EntangledAttention("embed", heads, ch, head_dim=hp["head_dim"]),
                tnn.EntangledLayerNorm("embed", ch),
                tnn.EntangledLinear("embed", ("embed", ratio), ch),
                tnn.EntangledLinear(("embed", ratio), "embed", ch)))
        depth = tnn.DepthMixer(blocks, "depth", ch)
        return ViT(patch, tokens, depth, tnn.EntangledLayerNorm("embed", ch),
                   tnn.EntangledLinear("embed", hp["num_classes"], ch))

    def _costs(self, selection: Mapping[str, Any]) -> tuple[int, int]:
        s = self.check_selection(selection)
        hp = self.hparams
        e, d = s["embed"], s["depth"]
        N, C, p = self.num_patches(), hp["num_classes"], hp["patch_size"]
        T = N + 1
        params = e * hp["in_channels"] * p * p + e + (N + 2) * e
        macs = N * e * hp["in_channels"] * p * p
        for i in range(d):
            m = int(round(e * s[self.layer_choice("mlp_ratio", i)]))
            inner = s[self.layer_choice("heads", i)] * hp["head_dim"]
            params += (2 * e + (e * 3 * inner + 3 * inner) + (inner * e + e) + 2 * e
                       + (e * m + m) + (m * e + e))
            macs += T * e * 3 * inner + 2 * T * T * inner + T * inner * e + T * e * m + T * m * e
        params += 2 * e + e * C + C
        macs += e * C
        return params, macs

    def arch_params(self, selection) -> int:
        """Patch conv, class/position tokens, per block LN + qkv + proj + LN + MLP, final
        LN and head."""
        return self._costs(selection)[0]

    def arch_macs(self, selection) -> int:
        """Patch conv, per block ``T e 3hd + 2 T^2 hd + T hd e + 2 T e m``, head."""
        return self._costs(selection)[1]

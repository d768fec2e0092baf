"""entangle() on timm models (random weights, small inputs, no download): ViT
(Attention heads, MLP widths), ConvNeXt (LayerNorm2d, depthwise kernels, MLP),
EfficientNet-Lite (BatchNormAct2d), TF-padded convs (Conv2dSame).

timm imports torchvision, which does not import beside the CPU torch of
requirements/cpu.txt: these tests run in the second environment of
requirements/models.txt (scripts/setup_env.sh --models; see docs/recipes.md)."""

from __future__ import annotations

import pytest
import torch
from nn_util import check_entangled_model
from torch import nn

import tangle_kernels.nn as tnn

timm = pytest.importorskip("timm", reason="timm runs in the requirements/models.txt environment")
from timm.layers import BatchNormAct2d, Conv2dSame, LayerNorm2d  # noqa: E402


def _vit():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        embed_dim=24,
        depth=2,
        num_heads=4,
        num_classes=5,
    )


VIT_DIMS = {
    "blocks.*.attn.num_heads": "heads",
    "blocks.*.mlp.fc1.out_features": "hidden",
    "blocks.*.mlp.fc2.in_features": "hidden",
}


def test_vit_heads_and_mlp_exact():
    x = torch.randn(2, 3, 16, 16)
    sup = check_entangled_model(
        _vit(),
        {"heads": (2, 4), "hidden": (48, 96)},
        VIT_DIMS,
        x,
        [{"heads": 2, "hidden": 48}, {"heads": 4, "hidden": 48}, {"heads": 2, "hidden": 96}],
    )
    assert isinstance(sup.blocks[0].attn, tnn.EntangledAttention)
    child = tnn.extract(sup, {"heads": 2, "hidden": 48})
    att = child.blocks[1].attn
    assert type(att) is timm.layers.Attention
    assert (att.num_heads, att.head_dim, att.attn_dim) == (2, 6, 12)
    assert att.qkv.weight.shape == (36, 24) and att.proj.weight.shape == (24, 12)


def test_vit_heads_through_the_projections_are_refused():
    with pytest.raises(
        ValueError,
        match=r"qkv.out_features inside the timm Attention 'blocks.0.attn'.*'blocks.0.attn.num_heads'",
    ):
        tnn.entangle(_vit(), {"w": (12, 24)}, {"blocks.0.attn.qkv.out_features": "w"})


def test_vit_embedding_width_is_refused_by_the_flow_check():
    # cls_token / pos_embed are [1, *, 24] parameters of the model itself: the
    # sub-network of a narrower patch embedding cannot run, found at entangle time.
    dims = {"patch_embed.proj.out_channels": "e"}
    with pytest.raises(
        ValueError, match=r"smallest choice.*\(VisionTransformer\).*'patch_embed.proj' \(Conv2d"
    ):
        tnn.entangle(_vit(), {"e": (12, 24)}, dims, example_inputs=torch.randn(1, 3, 16, 16))


def _convnext():
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=5)


def test_convnext_kernels_and_mlp_exact():
    dims = {
        "stages.0.blocks.*.conv_dw.kernel_size": "k",
        "stages.0.blocks.*.mlp.fc1.out_channels": "hid",
        "stages.0.blocks.*.mlp.fc2.in_channels": "hid",
    }
    check_entangled_model(
        _convnext(),
        {"k": (3, 7), "hid": (80, 160)},
        dims,
        torch.randn(1, 3, 32, 32),
        [{"k": 3, "hid": 80}, {"k": 7, "hid": 80}],
        fd_entries=1,
    )


def test_layernorm2d_exact_and_extracted_as_itself():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), LayerNorm2d(8), nn.GELU(), nn.Conv2d(8, 4, 1)
    )
    dims = {"0.out_channels": "c", "1.normalized_shape": "c", "3.in_channels": "c"}
    sup = check_entangled_model(model, {"c": (5, 8)}, dims, torch.randn(2, 3, 6, 6), [{"c": 5}])
    child = tnn.extract(sup, {"c": 5})
    assert type(child[1]) is LayerNorm2d and child[1].normalized_shape == (5,)


def _lite0():
    torch.manual_seed(0)
    m = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=5)
    for mod in m.modules():  # non-trivial running statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m


LITE_DIMS = {
    "conv_stem.out_channels": "stem",
    "bn1.num_features": "stem",
    "blocks.0.0.conv_dw.in_channels": "stem",
    "blocks.0.0.conv_dw.out_channels": "stem",
    "blocks.0.0.conv_dw.groups": "stem",
    "blocks.0.0.conv_dw.kernel_size": "k",
    "blocks.0.0.bn1.num_features": "stem",
    "blocks.0.0.conv_pw.in_channels": "stem",
}


def test_efficientnet_lite_batchnorm_act_exact():
    sup = check_entangled_model(
        _lite0(),
        {"stem": (16, 32), "k": (1, 3)},
        LITE_DIMS,
        torch.randn(2, 3, 32, 32),
        [{"stem": 16, "k": 1}, {"stem": 16, "k": 3}],
        fd_entries=1,
    )
    assert isinstance(sup.bn1.act, nn.ReLU6)
    child = tnn.extract(sup, {"stem": 16, "k": 3})
    assert type(child.bn1) is BatchNormAct2d and child.bn1.num_features == 16
    assert isinstance(child.bn1.act, nn.ReLU6)


@pytest.mark.parametrize("size", [9, 10])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_same_exact(stride, size):
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 6, 5, stride=stride), nn.ReLU(), nn.Conv2d(6, 4, 1))
    dims = {"0.out_channels": "c", "0.kernel_size": "k", "2.in_channels": "c"}
    sup = check_entangled_model(
        model,
        {"c": (3, 6), "k": (3, 5)},
        dims,
        torch.randn(2, 3, size, size),
        [{"c": 3, "k": 3}, {"c": 6, "k": 3}],
    )
    child = tnn.extract(sup, {"c": 3, "k": 3})
    assert (
        type(child[0]) is Conv2dSame
        and child[0].kernel_size == (3, 3)
        and child[0].padding == (0, 0)
    )


def test_conv2d_same_refuses_a_1x1_candidate():
    model = nn.Sequential(Conv2dSame(3, 6, 3, stride=2))
    with pytest.raises(ValueError, match=r"Conv2dSame.*odd sizes >= 3"):
        tnn.entangle(model, {"k": (1, 3)}, {"0.kernel_size": "k"})


def test_tf_efficientnet_stem_exact():
    torch.manual_seed(0)
    m = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=5)
    assert type(m.conv_stem) is Conv2dSame
    dims = {k: v for k, v in LITE_DIMS.items() if "kernel" not in k}
    with pytest.raises(
        ValueError, match=r"blocks.0.0.se.conv_reduce \(Conv2d\).*'blocks.0.0.bn1' \(BatchNormAct2d"
    ):
        tnn.entangle(m, {"stem": (16, 32)}, dims, example_inputs=torch.randn(1, 3, 33, 33))
    dims |= {
        "blocks.0.0.se.conv_reduce.in_channels": "stem",
        "blocks.0.0.se.conv_expand.out_channels": "stem",
    }
    check_entangled_model(
        m, {"stem": (16, 32)}, dims, torch.randn(1, 3, 33, 33), [{"stem": 16}], fd_entries=1
    )

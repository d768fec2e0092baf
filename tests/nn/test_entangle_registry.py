"""The converter registry of entangle(): exact-type and subclass matching, refusals
with the module, its type and the fix, the meta data-flow check, tied weights,
stock classes after extract, torch's TransformerEncoderLayer fast path."""

from __future__ import annotations

import pickle

import pytest
import torch
from nn_util import assert_no_tangle_classes, check_entangled_model
from torch import nn

import tangle_kernels.nn as tnn


class ScaledLinear(nn.Linear):
    """A subclass with its own forward: converting it as an nn.Linear would drop the x2."""

    def forward(self, x):
        return 2 * super().forward(x)


class NamedLinear(nn.Linear):
    """A subclass that changes nothing the layer computes."""

    def extra_repr(self):
        return "named " + super().extra_repr()


def test_subclass_with_its_own_forward_is_refused():
    model = nn.Sequential(nn.Linear(4, 6), ScaledLinear(6, 3))
    with pytest.raises(
        ValueError, match=r"'1'.*ScaledLinear.*redefines ScaledLinear.forward.*register_converter"
    ):
        tnn.entangle(model, {"w": (3, 6)}, {"0.out_features": "w", "1.in_features": "w"})
    # untouched, it may stay
    sup = tnn.entangle(model, {"w": (3, 6)}, {"0.out_features": 6})
    assert type(sup[1]) is ScaledLinear


def test_subclass_that_keeps_the_forward_is_converted_and_extracted_as_itself():
    model = nn.Sequential(NamedLinear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    dims = {"0.out_features": "w", "2.in_features": "w"}
    check_entangled_model(model, {"w": (3, 6)}, dims, torch.randn(2, 4), [{"w": 3}])
    child = tnn.extract(tnn.entangle(model, {"w": (3, 6)}, dims), {"w": 3})
    assert type(child[0]) is NamedLinear and type(child[2]) is nn.Linear
    assert child[0].out_features == 3 and child[2].in_features == 3


class Affine(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.scale


def test_unsupported_type_is_named():
    model = nn.Sequential(nn.Linear(4, 6), Affine(6), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"module '1'.*Affine.*has no converter"):
        tnn.entangle(model, {"w": (3, 6)}, {"0.out_features": "w", "1.normalized_shape": "w"})


class Block(nn.Module):
    """resnet's BasicBlock shape: conv1 -> bn1 -> relu -> conv2 -> bn2, + identity."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


def _resnetish():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        Block(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


RES_DIMS = {
    "1.conv1.out_channels": "mid",
    "1.bn1.num_features": "mid",
    "1.conv2.in_channels": "mid",
    "1.conv[12].kernel_size": "k",
}


def test_forgotten_consumer_is_found_at_entangle_time():
    model = _resnetish()
    dims = {k: v for k, v in RES_DIMS.items() if k != "1.conv2.in_channels"}
    x = torch.randn(2, 3, 8, 8)
    tnn.entangle(model, {"mid": (4, 8), "k": (1, 3)}, dims)  # no example: not checked
    with pytest.raises(
        ValueError,
        match=r"smallest choice.*1\.conv2 \(Conv2d\).*\(2, 4, 8, 8\).*'1\.bn1' \(BatchNorm2d",
    ):
        tnn.entangle(model, {"mid": (4, 8), "k": (1, 3)}, dims, example_inputs=x)


def test_resnet_block_exact():
    check_entangled_model(
        _resnetish(),
        {"mid": (4, 8), "k": (1, 3)},
        RES_DIMS,
        torch.randn(2, 3, 8, 8),
        [{"mid": 4, "k": 1}, {"mid": 8, "k": 1}, {"mid": 4, "k": 3}],
    )


def test_tied_weights_stay_tied():
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.LayerNorm(6), head)
    dims = {"0.embedding_dim": "e", "1.normalized_shape": "e", "2.in_features": "e"}
    sup = tnn.entangle(model, {"e": (4, 6)}, dims)
    assert sup[0].weight is sup[2].weight
    child = tnn.extract(sup, {"e": 4})
    assert child[0].weight is child[2].weight and child[0].weight.shape == (10, 4)
    assert sum(p.numel() for p in child.parameters()) == 10 * 4 + 2 * 4
    check_entangled_model(model, {"e": (4, 6)}, dims, torch.randint(0, 10, (2, 3)), [{"e": 4}])


def test_extract_gives_stock_classes_that_pickle_without_the_library():
    model = _resnetish()
    child = tnn.extract(
        tnn.entangle(model, {"mid": (4, 8), "k": (1, 3)}, RES_DIMS), {"mid": 4, "k": 3}
    )
    assert type(child[1].conv1) is nn.Conv2d and type(child[1].bn1) is nn.BatchNorm2d
    assert child[1].conv1.out_channels == 4 and child[1].bn1.num_features == 4
    assert_no_tangle_classes(child)
    again = pickle.loads(pickle.dumps(child)).eval()
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(again(x), child.eval()(x))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_fast_path_is_disabled(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, norm_first=norm_first
    )
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    dims = {"layers.*.linear1.out_features": "ff", "layers.*.linear2.in_features": "ff"}
    x = torch.randn(2, 5, 8)
    sup = check_entangled_model(model, {"ff": (4, 16)}, dims, x, [{"ff": 4}])
    assert sup.layers[0].activation_relu_or_gelu is False
    child = tnn.extract(sup, {"ff": 4})
    assert child.layers[0].activation_relu_or_gelu == model.layers[0].activation_relu_or_gelu
    assert (
        type(child.layers[0]) is nn.TransformerEncoderLayer
        and child.layers[0].linear1.out_features == 4
    )


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_heads_and_width_exact(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        8, 4, dim_feedforward=16, dropout=0.0, batch_first=batch_first
    )
    model = nn.Sequential(
        nn.Linear(3, 8), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    )
    dims = {
        "0.out_features": "e",
        "layers.*.self_attn.embed_dim": "e",
        "layers.*.self_attn.num_heads": "h",
        "layers.*.norm[12].normalized_shape": "e",
        "layers.*.linear1.in_features": "e",
        "layers.*.linear1.out_features": "ff",
        "layers.*.linear2.in_features": "ff",
        "layers.*.linear2.out_features": "e",
    }
    dims = {k if k[0] == "0" else "1." + k: v for k, v in dims.items()}
    x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
    choices = {"e": (4, 8), "h": (2, 4), "ff": (4, 16)}
    sup = check_entangled_model(
        model, choices, dims, x, [{"e": 4, "h": 2, "ff": 4}, {"e": 8, "h": 2, "ff": 16}]
    )
    child = tnn.extract(sup, {"e": 4, "h": 2, "ff": 4})
    att = child[1].layers[1].self_attn
    assert type(att) is nn.MultiheadAttention and (att.embed_dim, att.num_heads, att.head_dim) == (
        4,
        2,
        2,
    )
    assert att.in_proj_weight.shape == (12, 4) and type(att.out_proj) is type(
        layer.self_attn.out_proj
    )
    assert_no_tangle_classes(child)


def test_multihead_attention_projections_are_refused():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    with pytest.raises(
        ValueError, match=r"nn.MultiheadAttention 'self_attn'.*'self_attn.num_heads'"
    ):
        tnn.entangle(layer, {"e": (4, 8)}, {"self_attn.out_proj.out_features": "e"})


def test_conv_with_same_string_padding_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 5, padding="same"), nn.ReLU(), nn.Conv2d(6, 2, 1))
    dims = {"0.out_channels": "c", "0.kernel_size": "k", "2.in_channels": "c"}
    check_entangled_model(
        model, {"c": (3, 6), "k": (3, 5)}, dims, torch.randn(2, 3, 7, 7), [{"c": 3, "k": 3}]
    )

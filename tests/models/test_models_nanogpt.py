"""entangle() on Karpathy's nanoGPT (tests/models/nanogpt_model.py, random weights):
the LayerNorm with optional bias, CausalSelfAttention (embedding width and heads),
the MLP ratio, wte / lm_head weight tying."""

from __future__ import annotations

import pickle

import pytest
import torch
from nanogpt_model import GPT, CausalSelfAttention, GPTConfig, LayerNorm
from nn_util import assert_no_tangle_classes, check_entangled_model

import tangle_kernels.nn as tnn

CHOICES = {"embed": (8, 12), "heads": (2, 4), "ratio": (2, 4)}
DIMS = {
    "transformer.w[tp]e.embedding_dim": "embed",
    "*ln_*.normalized_shape": "embed",
    "transformer.ln_f.normalized_shape": "embed",
    "*.attn.embed_dim": "embed",
    "*.attn.num_heads": "heads",
    "*.mlp.c_fc.in_features": "embed",
    "*.mlp.c_fc.out_features": ("embed", "ratio"),
    "*.mlp.c_proj.in_features": ("embed", "ratio"),
    "*.mlp.c_proj.out_features": "embed",
    "lm_head.in_features": "embed",
}


def _gpt(bias=True):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=17, n_layer=2, n_head=4, n_embd=12, bias=bias))


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_exact(bias):
    model = _gpt(bias)
    idx = torch.randint(0, 17, (2, 6))
    sup = check_entangled_model(
        model,
        CHOICES,
        DIMS,
        idx,
        [
            {"embed": 8, "heads": 2, "ratio": 2},
            {"embed": 12, "heads": 2, "ratio": 4},
            {"embed": 8, "heads": 4, "ratio": 4},
        ],
    )
    assert isinstance(sup.transformer.h[0].attn, tnn.EntangledAttention)
    assert isinstance(sup.transformer.h[0].ln_1, tnn.EntangledLayerNorm)
    assert (sup.transformer.h[0].ln_1.bias is None) == (not bias)


def test_nanogpt_extract_keeps_ties_and_classes():
    model = _gpt()
    sup = tnn.entangle(model, CHOICES, DIMS)
    assert sup.transformer.wte.weight is sup.lm_head.weight  # tied through entangle
    sel = {"embed": 8, "heads": 2, "ratio": 2}
    child = tnn.extract(sup, sel)
    assert child.transformer.wte.weight is child.lm_head.weight  # tied through extract
    ln = child.transformer.h[0].ln_1
    assert type(ln) is LayerNorm and ln.weight.shape == (8,)
    att = child.transformer.h[1].attn
    assert type(att) is CausalSelfAttention and (att.n_embd, att.n_head) == (8, 2)
    assert type(att.c_attn) is torch.nn.Linear and att.c_attn.weight.shape == (24, 8)
    n_params = sum(p.numel() for p in child.parameters())
    cfg = GPTConfig(block_size=8, vocab_size=17, n_layer=2, n_head=2, n_embd=8)
    hand = GPT(cfg)
    for b in hand.transformer.h:  # ratio 2 instead of nanoGPT's 4
        b.mlp.c_fc = torch.nn.Linear(8, 16)
        b.mlp.c_proj = torch.nn.Linear(16, 8)
    assert n_params == sum(p.numel() for p in hand.parameters())
    assert_no_tangle_classes(child)
    again = pickle.loads(pickle.dumps(child))
    idx = torch.randint(0, 17, (1, 5))
    torch.testing.assert_close(again(idx), child(idx))


def test_nanogpt_attention_projection_alone_is_refused():
    with pytest.raises(
        ValueError, match=r"nanoGPT attention 'transformer.h.0.attn'.*attn.embed_dim"
    ):
        tnn.entangle(_gpt(), {"w": (6, 12)}, {"transformer.h.0.attn.c_attn.in_features": "w"})


class MyNorm(torch.nn.Module):
    """A user's LayerNorm without bias (no converter until one is registered)."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n))
        self.bias = None

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-6)


def test_custom_layernorm_registered_in_one_line():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), MyNorm(6), torch.nn.Linear(6, 3))
    dims = {"0.out_features": "w", "1.normalized_shape": "w", "2.in_features": "w"}
    with pytest.raises(
        ValueError, match=r"module '1'.*MyNorm.*has no converter.*register_converter"
    ):
        tnn.entangle(model, {"w": (3, 6)}, dims)
    tnn.register_converter(MyNorm, tnn.layer_norm_converter(1e-6), replace=True)
    check_entangled_model(model, {"w": (3, 6)}, dims, torch.randn(2, 4), [{"w": 3}])
    assert type(tnn.extract(tnn.entangle(model, {"w": (3, 6)}, dims), {"w": 3})[1]) is MyNorm


def test_nanogpt_attention_variant_is_named_not_silently_skipped():
    model = _gpt()
    model.transformer.h[0].attn.softermax_layer = torch.nn.Identity()  # a variant's extra child
    with pytest.raises(
        ValueError, match=r"module 'transformer.h.0.attn'.*CausalSelfAttention.*has no converter"
    ):
        tnn.entangle(model, {"e": (8, 12)}, {"transformer.h.0.attn.embed_dim": "e"})
    with pytest.raises(ValueError, match=r"inside the nanoGPT attention 'transformer.h.0.attn'"):
        tnn.entangle(model, {"e": (8, 12)}, {"transformer.h.0.attn.c_proj.out_features": "e"})

"""entangle() on stock models and extract() of whole supernets."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import tangle_kernels.nn as tnn


class TinyLM(nn.Module):
    """A stock model: embedding, LayerNorm, MLP, head (plain torch modules only)."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln": nn.LayerNorm(8), "fc1": nn.Linear(8, 16), "fc2": nn.Linear(16, 8)})
            for _ in range(2)
        )
        self.ln_f = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        for b in self.blocks:
            x = x + b["fc2"](torch.relu(b["fc1"](b["ln"](x))))
        return self.head(self.ln_f(x))


CHOICES = {"embed": (4, 6, 8), "ratio": (1, 2)}
DIMS = {
    "wte.embedding_dim": "embed",
    "*ln*.normalized_shape": "embed",
    "blocks.*.fc1.in_features": "embed",
    "blocks.*.fc1.out_features": ("embed", "ratio"),
    "blocks.*.fc2.in_features": ("embed", "ratio"),
    "blocks.*.fc2.out_features": "embed",
    "head.in_features": "embed",
}


def test_entangle_stock_model_and_extract():
    model = TinyLM()
    idx = torch.randint(0, 11, (2, 5))
    ref = model(idx)
    sup = tnn.entangle(model, CHOICES, DIMS)
    assert isinstance(sup.blocks[1]["fc1"], tnn.EntangledLinear)
    assert isinstance(sup.ln_f, tnn.EntangledLayerNorm) and isinstance(
        sup.wte, tnn.EntangledEmbedding
    )
    assert isinstance(model.wte, nn.Embedding)  # a copy by default
    torch.testing.assert_close(sup(idx), ref)  # no arch: the max-size model
    # soft arch: one forward, gradients reach every weight and the arch
    arch = {n: torch.rand(len(v), requires_grad=True) for n, v in CHOICES.items()}
    tnn.set_arch(sup, arch)
    sup(idx).square().mean().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in arch.values())
    for name, p in sup.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"zero gradient for {name}"
    for sel in ({"embed": 4, "ratio": 2}, {"embed": 6, "ratio": 1}):
        child = tnn.extract(sup, sel)
        assert not any(isinstance(m, tnn.EntangledModule) for m in child.modules())
        assert child.blocks[0]["fc1"].weight.shape == (sel["embed"] * sel["ratio"], sel["embed"])
        want = child(idx)
        tnn.set_arch(sup, tnn.one_hot_arch(CHOICES, sel))  # hard path
        torch.testing.assert_close(sup(idx), want)
        onehot = {
            n: torch.tensor([float(v == sel[n]) for v in vals]) for n, vals in CHOICES.items()
        }
        tnn.set_arch(sup, onehot)  # soft path with a one-hot mix
        torch.testing.assert_close(sup(idx), want, rtol=1e-5, atol=1e-5)


def test_entangle_inplace_keeps_parameters():
    model = TinyLM()
    w = model.blocks[0]["fc1"].weight
    out = tnn.entangle(model, CHOICES, DIMS, inplace=True)
    assert out is model and model.blocks[0]["fc1"].weight is w
    opt_params = {id(p) for p in model.parameters()}
    assert id(w) in opt_params


def test_entangle_last_pattern_wins_and_segments():
    model = nn.Sequential(nn.Linear(4, 12), nn.Linear(12, 4))
    sup = tnn.entangle(
        model,
        {"a": (2, 4), "b": (1, 3)},
        {
            "*.out_features": "a",
            "0.out_segments": 3,
            "1.in_features": ("a", 3),
            "1.out_features": 4,  # the later, more specific pattern wins
        },
    )
    assert sup[0].out_segments == 3 and sup[0].out_spec.spec == "a"
    assert sup[1].out_spec.spec == 4 and sup[1].in_spec.spec == ("a", 3)


@pytest.mark.parametrize(
    "dims, match",
    [
        ({"blocks.*.fc9.in_features": "embed"}, "pattern 'blocks.\\*.fc9.in_features' matches no"),
        ({"head.in_features": "size"}, "unknown choice 'size'"),
        ({"head.in_features": ("embed", 2)}, "width 16 is above the max 8"),
        (
            {"head.out_features": "embed"},
            "largest candidate 8 is smaller than the existing layer's 11",
        ),
        ({}, "dims: expected a non-empty mapping"),
    ],
)
def test_entangle_errors(dims, match):
    with pytest.raises(ValueError, match=match):
        tnn.entangle(TinyLM(), CHOICES, dims)


def test_entangle_rejects_multihead_attention():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    with pytest.raises(ValueError, match="nn.MultiheadAttention"):
        tnn.entangle(model, {"e": (4, 8)}, {"*.out_proj.in_features": "e"})


def test_readme_example_in_docstring_runs():
    code = textwrap.dedent(tnn.__doc__.split("::\n", 1)[1].split("\nProtocol")[0])
    exec(compile(code, "tangle_kernels.nn docstring", "exec"), {})

"""EntangledLayerNorm and EntangledEmbedding against plain-PyTorch oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nn_util import check_hard, check_soft, combos, place, rand_arch

import tangle_kernels.nn as tnn


def ln_oracle(m: tnn.EntangledLayerNorm):
    """sum_k mix_k pad(layer_norm(x[..., :c_k], w[:c_k], b[:c_k])): every candidate
    normalises over its own prefix (K separate layer norms)."""
    D = m.spec.max

    def fn(x, arch):
        y = 0
        for v, c in combos(m.choices, m.names, arch):
            k = m.spec.size(v)
            w = m.weight[:k] if m.weight is not None else None
            b = m.bias[:k] if m.bias is not None else None
            y = y + c * F.pad(F.layer_norm(x[..., :k], (k,), w, b, m.eps), (0, D - k))
        return y

    return fn


def _ln(ch, spec="d", **kw):
    m = tnn.EntangledLayerNorm(spec, ch, **kw)
    if m.weight is not None:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            if m.bias is not None:
                m.bias.normal_()
    return m


@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
def test_layernorm_soft_hard_extract(affine, bias):
    ch = {"d": (3, 5, 8)}
    m = _ln(ch, elementwise_affine=affine, bias=bias)
    x = (torch.randn(2, 3, 8) * 2 + 1).requires_grad_(True)
    check_soft(m, x, rand_arch(ch), ln_oracle(m))
    for d in (3, 5, 8):
        y = check_hard(m, x, {"d": d}, ln_oracle(m))
        e = m.extract({"d": d})
        assert isinstance(e, torch.nn.LayerNorm)
        torch.testing.assert_close(e(x[..., :d]).detach(), y[..., :d])


def test_layernorm_product_spec_and_precision():
    ch = {"e": (2, 4), "r": (1, 3)}  # widths 2, 6, 4, 12 (one duplicated cut set)
    m = _ln(ch, ("e", "r"))
    # large mean, small spread: E[x^2] - E[x]^2 without a shift would lose everything
    x = (torch.randn(5, 12) * 0.01 + 300).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    m64 = _ln(ch, ("e", "r"), dtype=torch.float64)
    with torch.no_grad():
        m64.weight.copy_(m.weight)
        m64.bias.copy_(m.bias)
    a = rand_arch(ch)
    a64 = {n: v.detach().double() for n, v in a.items()}
    ref64 = ln_oracle(m64)(x64, a64)
    ref32 = ln_oracle(m)(x, a)  # PyTorch's own fp32 error
    got = m(x, a)
    err, perr = (got.double() - ref64).abs().max(), (ref32.double() - ref64).abs().max()
    assert err <= 4 * perr + 1e-5, (err, perr)
    # (badly conditioned on purpose: rstd ~ 100, so fp64 agrees to ~1e-9 relative)
    check_soft(
        m64,
        x64,
        {n: v.requires_grad_(True) for n, v in a64.items()},
        ln_oracle(m64),
        torch.float64,
        tol=dict(rtol=1e-8, atol=1e-8),
    )


def test_layernorm_gradcheck_and_compile():
    ch = {"d": (2, 3, 5)}
    m = _ln(ch, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    a = rand_arch(ch, torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, d, w, b: torch.func.functional_call(m, {"weight": w, "bias": b}, (x, {"d": d})),
        (
            x,
            a["d"],
            m.weight.detach().clone().requires_grad_(True),
            m.bias.detach().clone().requires_grad_(True),
        ),
    )
    m32 = _ln(ch)
    arch = {"d": torch.rand(3)}
    x = torch.randn(2, 4, 5)
    cm = torch.compile(m32, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cm(x, arch), m32(x, arch))


def test_layernorm_no_arch_and_errors():
    m = _ln({"d": (3, 8)})
    x = torch.randn(4, 8)
    torch.testing.assert_close(m(x), F.layer_norm(x, (8,), m.weight, m.bias))
    with pytest.raises(ValueError, match="x: last dimension 6 != normalized width 8"):
        m(torch.randn(2, 6), {"d": torch.ones(2)})
    with pytest.raises(ValueError, match="normalized_shape='d': width 8 is above the max 6"):
        tnn.EntangledLayerNorm.from_module(
            torch.nn.LayerNorm(6), {"d": (3, 8)}, normalized_shape="d"
        )
    with pytest.raises(ValueError, match="only a LayerNorm over the last dimension"):
        tnn.EntangledLayerNorm.from_module(torch.nn.LayerNorm((2, 6)), {"d": (3,)})


# ----------------------------------------------------------------------- Embedding
def emb_oracle(m: tnn.EntangledEmbedding):
    """embedding(idx, sum_k mix_k pad(W[:, :d_k])) (the whole table superposed)."""

    def fn(idx, arch):
        w = sum(
            c * place(m.weight[:, : m.spec.size(v)], m.weight.shape, (slice(0, None),) * 2)
            for v, c in combos(m.choices, m.names, arch)
        )
        return F.embedding(idx, w, m.padding_idx)

    return fn


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_soft_hard_extract(padding_idx):
    ch = {"d": (2, 5, 6)}
    m = tnn.EntangledEmbedding(11, "d", ch, padding_idx=padding_idx)
    idx = torch.tensor([[0, 2, 10, 2], [3, 3, 7, 1]])
    check_soft(m, idx, rand_arch(ch), emb_oracle(m))
    for d in (2, 5, 6):
        y = check_hard(m, idx, {"d": d}, emb_oracle(m))
        e = m.extract({"d": d})
        assert isinstance(e, torch.nn.Embedding) and e.padding_idx == padding_idx
        torch.testing.assert_close(e(idx).detach(), y[..., :d])


def test_embedding_compile_gradcheck_errors():
    ch = {"d": (2, 4)}
    m = tnn.EntangledEmbedding(7, "d", ch, dtype=torch.float64)
    idx = torch.tensor([1, 5, 5, 0])
    a = rand_arch(ch, torch.float64)
    assert torch.autograd.gradcheck(
        lambda w, d: torch.func.functional_call(m, {"weight": w}, (idx, {"d": d})),
        (m.weight.detach().clone().requires_grad_(True), a["d"]),
    )
    m32 = tnn.EntangledEmbedding(7, "d", ch)
    cm = torch.compile(m32, fullgraph=True, backend="aot_eager")
    arch = {"d": torch.rand(2)}
    torch.testing.assert_close(cm(idx, arch), m32(idx, arch))
    torch.testing.assert_close(m32(idx), F.embedding(idx, m32.weight))
    with pytest.raises(ValueError, match="num_embeddings='v'"):
        tnn.EntangledEmbedding("v", "d", ch)
    with pytest.raises(ValueError, match="embedding_dim='d': width 4 is above the max 3"):
        tnn.EntangledEmbedding.from_module(torch.nn.Embedding(7, 3), ch, embedding_dim="d")

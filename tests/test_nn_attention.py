"""EntangledAttention (AutoFormer and nanoGPT modes) against plain-PyTorch oracles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from nn_util import check_hard, check_soft, combos, rand_arch
from test_nn_linear import linear_oracle

import tangle_kernels.nn as tnn


def mha(q, k, v, h, causal):
    """Multi-head attention written out (softmax(q k^T / sqrt(d)) v), no SDPA."""
    B, T, C = q.shape
    d = C // h
    q, k, v = (t.reshape(B, T, h, d).transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)


def attn_oracle(m: tnn.EntangledAttention):
    """AutoFormer: padded-sum q|k|v and proj weights, ONE attention over H_max heads.
    nanoGPT: padded-sum projections, attention outputs mixed over (width, heads)."""
    qkv, proj = linear_oracle(m.qkv), linear_oracle(m.proj)
    E = m.embed_dim

    def fn(x, arch):
        q, k, v = qkv(x, arch).split(m.inner, dim=-1)
        if m.mode == "autoformer":
            y = mha(q, k, v, m.num_heads, m.causal)
        else:
            y = 0
            for vals, c in combos(m.choices, m.names, arch):
                e, h = m.embed_spec.size(vals), m.heads_spec.size(vals)
                y = y + c * F.pad(mha(q[..., :e], k[..., :e], v[..., :e], h, m.causal), (0, E - e))
        return proj(y, arch)

    return fn


CASES = {
    "autoformer": dict(
        embed_dim="e", num_heads="h", head_dim=3, choices={"e": (4, 6), "h": (1, 2, 3)}
    ),
    "autoformer causal, no proj bias": dict(
        embed_dim="e",
        num_heads="h",
        head_dim=2,
        causal=True,
        proj_bias=False,
        choices={"e": (3, 5), "h": (2, 3)},
    ),
    "nanogpt causal": dict(
        embed_dim="e", num_heads="h", causal=True, choices={"e": (4, 8), "h": (1, 2, 4)}
    ),
    "nanogpt fixed width": dict(embed_dim=6, num_heads="h", choices={"h": (1, 2, 3)}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_attention_soft_hard_extract(name):
    m = tnn.EntangledAttention(**CASES[name])
    x = torch.randn(2, 5, m.embed_dim, requires_grad=True)
    check_soft(m, x, rand_arch(m.choices), attn_oracle(m))
    for vv in (
        [v[0] for v in m.choices.values()],
        [v[-1] for v in m.choices.values()],
        [v[1] for v in m.choices.values()],
    ):
        sel = dict(zip(m.choices, vv))
        y = check_hard(m, x, sel, attn_oracle(m))
        e = m.extract(sel)
        w = e.embed_dim
        assert torch.all(y[..., w:] == 0)
        torch.testing.assert_close(e(x[..., :w]).detach(), y[..., :w])


def test_attention_no_arch_is_plain_and_compile():
    m = tnn.EntangledAttention(**CASES["nanogpt causal"])
    x = torch.randn(2, 5, 8)
    plain = m.extract({"e": 8, "h": 4})
    torch.testing.assert_close(m(x), plain(x))
    arch = {n: torch.rand(len(v)) for n, v in m.choices.items()}
    for name in ("nanogpt causal", "autoformer"):
        m = tnn.EntangledAttention(**CASES[name])
        x = torch.randn(1, 4, m.embed_dim)
        arch = {n: torch.rand(len(v)) for n, v in m.choices.items()}
        cm = torch.compile(m, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(cm(x, arch), m(x, arch))


def test_attention_gradcheck_fp64():
    m = tnn.EntangledAttention(
        embed_dim="e",
        num_heads="h",
        choices={"e": (2, 4), "h": (1, 2)},
        causal=True,
        dtype=torch.float64,
    )
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    a = rand_arch(m.choices, torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, e, h: m(x, {"e": e, "h": h}), (x, a["e"], a["h"]), fast_mode=True
    )


def test_attention_errors():
    with pytest.raises(ValueError, match=r"num_heads='h': 3 heads do not divide embed_dim=8"):
        tnn.EntangledAttention("e", "h", {"e": (6, 8), "h": (1, 3)})
    with pytest.raises(ValueError, match="embed_dim='x': unknown choice 'x'"):
        tnn.EntangledAttention("x", "h", {"h": (1, 2)})
    with pytest.raises(ValueError, match="head_dim=0"):
        tnn.EntangledAttention(4, "h", {"h": (1, 2)}, head_dim=0)
    m = tnn.EntangledAttention(4, "h", {"h": (1, 2)})
    with pytest.raises(ValueError, match=r"x: expected \[B, T, 4\]"):
        m(torch.randn(2, 3, 5))

"""The one-node superposed LayerNorm on CPU (tangle_kernels.ops.mixed_layernorm, C++
kernels csrc/cpu/layernorm_mix_cpu.cpp) against the K-separate-layer-norms oracle
(``sum_k mix_k pad(layer_norm(x[..., :c_k], w[:c_k])) + b_mix``, float64 autograd), on
random widths (duplicates, uncovered columns, negative weights), forward and every
gradient; float64 gradcheck; bitwise stable across thread counts; the module takes it."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import tangle_kernels.nn as tnn
from tangle_kernels import superpose
from tangle_kernels.ops.mixed_layernorm import fused_available, mixed_layer_norm


def oracle(x, w, b, mix, widths, eps):
    E = x.shape[-1]
    y = 0
    for m, c in zip(mix, widths):
        t = F.layer_norm(x[..., :c], (c,), w[:c] if w is not None else None, None, eps)
        y = y + m * F.pad(t, (0, E - c))
    return y + b if b is not None else y


def case(seed, dtype):
    rng = random.Random(seed)
    E = rng.choice([7, 16, 33, 96])
    K = rng.randint(1, 4)
    widths = [rng.randint(1, E) for _ in range(K)]
    if rng.random() < 0.3:
        widths.append(widths[0])  # a duplicated width
    if rng.random() < 0.5:
        widths[-1] = E
    g = torch.Generator().manual_seed(seed)
    N = rng.choice([1, 5, 700])  # 700 x 96 crosses the kernels' parallel threshold
    x = torch.randn(N, E + 3, generator=g, dtype=dtype)[:, 1:E + 1] * 3 + 2  # strided rows
    w = torch.rand(E, generator=g, dtype=dtype) + 0.5 if rng.random() < 0.7 else None
    b = torch.randn(E, generator=g, dtype=dtype) if rng.random() < 0.7 else None
    mix = torch.randn(len(widths), generator=g, dtype=dtype)
    return x, w, b, mix, widths


def _grads(fn, x, w, b, mix, G):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b, mix)]
    y = fn(*leaves)
    req = [t for t in leaves if t is not None]
    return (y, *torch.autograd.grad(y, req, G))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_vs_oracle_random_widths(seed, dtype):
    x, w, b, mix, widths = case(seed, dtype)
    eps = 1e-5
    G = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=dtype)
    got = _grads(lambda x, w, b, m: mixed_layer_norm(x, w, b, m, widths, eps), x, w, b, mix, G)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    ref = _grads(lambda x, w, b, m: oracle(x, w, b, m, widths, eps), d(x), d(w), d(b), d(mix), G.double())
    # float32: sums over a row (<= E terms) and over rows (N terms) of O(1) products
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5 * x.shape[0] ** 0.5)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.double(), r, **tol)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    widths = (2, 5, 3, 5)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b, m: mixed_layer_norm(x, w, b, m, widths, 1e-5), (x, w, b, m))


def test_bitwise_across_threads():
    """The column sums (dw, d b_mix) and d mix are reduced in fixed chunks of rows: the
    same bits for 1 and 2 threads (rows above the parallel threshold)."""
    x = torch.randn(900, 64) + 1
    w, b, mix, widths = torch.rand(64) + 0.5, torch.randn(64), torch.rand(3), [16, 40, 64]
    G = torch.randn_like(x)
    n = torch.get_num_threads()
    outs = []
    try:
        for th in (1, 2):
            torch.set_num_threads(th)
            outs.append(_grads(lambda x, w, b, m: mixed_layer_norm(x, w, b, m, widths, 1e-5), x, w, b, mix, G))
    finally:
        torch.set_num_threads(n)
    for a, c in zip(*outs):
        assert torch.equal(a, c)


def test_module_takes_the_fused_node_and_matches_the_composition():
    """EntangledLayerNorm under a soft arch on CPU float32 is one node of the kernels;
    under autocast (the composition) it computes the same values."""
    ch = {"d": (8, 20, 32)}
    m = tnn.EntangledLayerNorm("d", ch)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    x = torch.randn(4, 5, 32, requires_grad=True)
    arch = {"d": torch.softmax(torch.randn(3), 0).requires_grad_(True)}
    assert fused_available(x)
    y = m(x, arch)
    assert "MixedLayerNorm" in type(y.grad_fn).__name__
    G = torch.randn_like(y)
    gx, ga, gw, gb = torch.autograd.grad(y, [x, arch["d"], m.weight, m.bias], G)
    y2 = m.mixed_xhat(x, arch["d"]) * m.weight + superpose(m.bias, arch["d"], m.layout)
    gx2, ga2, gw2, gb2 = torch.autograd.grad(y2, [x, arch["d"], m.weight, m.bias], G)
    for a, r in ((y, y2), (gx, gx2), (ga, ga2), (gw, gw2), (gb, gb2)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_available(x)
    assert not fused_available(x.half())

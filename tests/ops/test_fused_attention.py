"""The fused CPU attention with dropout (tangle_kernels.ops.attention, csrc/cpu/
attention_cpu.cpp): against the plain-torch oracle under the kernel's own keep mask on
random shapes (causal and not, Tq != Tk, odd sizes, strided views, several query
blocks), forward and every gradient; float64 gradcheck; the mask's statistics,
repeatability and independence of threads; the supernet's head-partition node with
dropout against the reference composition under the same masks; input errors."""

from __future__ import annotations

import random

import pytest
import torch

from tangle_kernels.ops import attention as att
from tangle_kernels.ops.attention import (
    attention_reference,
    dropout_keep_mask,
    fused_attention,
    fused_attention_available,
)

pytestmark = pytest.mark.skipif(fused_attention_available() is not None,
                                reason=f"fused attention: {fused_attention_available()}")

TOLS = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def _qkv(B, H, Tq, Tk, D, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # [B, T, 3, H, D] storage, as the head-partition gathers write it
        base = torch.randn(B, max(Tq, Tk), 3, H, D, generator=g, dtype=dtype)
        q = base[:, :Tq, 0].transpose(1, 2)
        k, v = (base[:, :Tk, i].transpose(1, 2) for i in (1, 2))
        return [t.detach().requires_grad_() for t in (q, k, v)]
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_()
            for T in (Tq, Tk, Tk)]


@pytest.mark.parametrize("seed", range(10))
def test_vs_oracle_random_shapes(seed):
    rng = random.Random(seed)
    dtype = rng.choice([torch.float32, torch.float64])
    causal = rng.random() < 0.6
    B, H, D = rng.randint(1, 3), rng.randint(1, 3), rng.choice([1, 3, 8, 17])
    Tq = rng.choice([1, 5, 33, 64, 65, 130])
    Tk = Tq if causal and rng.random() < 0.7 else rng.choice([1, 7, 64, 129])
    p = rng.choice([0.0, 0.1, 0.5])
    scale = rng.choice([None, 0.3])
    q, k, v = _qkv(B, H, Tq, Tk, D, dtype, seed, strided=rng.random() < 0.5 and Tq == Tk)
    y = fused_attention(q, k, v, causal=causal, scale=scale, dropout_p=p, seed=1000 + seed)
    keep = dropout_keep_mask(1000 + seed, B, H, Tq, Tk, p)
    ref = attention_reference(q, k, v, causal=causal, scale=scale, dropout_p=p, keep=keep)
    torch.testing.assert_close(y, ref, **TOLS[dtype])
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (q, k, v), g)
    exp = torch.autograd.grad(ref, (q, k, v), g)
    for x, e in zip(got, exp):
        torch.testing.assert_close(x, e, **TOLS[dtype])


def test_equals_torch_sdpa_without_dropout():
    q, k, v = _qkv(2, 3, 70, 70, 16, torch.float64, 1)
    for causal in (False, True):
        y = fused_attention(q, k, v, causal=causal)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_fp64(causal):
    q, k, v = _qkv(1, 2, 9, 9, 3, torch.float64, 2)
    assert torch.autograd.gradcheck(
        lambda q, k, v: fused_attention(q, k, v, causal=causal, dropout_p=0.3, seed=5), (q, k, v))


def test_mask_statistics_and_repeatability():
    p = 0.2
    keep = dropout_keep_mask(123, 4, 3, 64, 64, p)
    rate = 1.0 - keep.float().mean().item()
    assert abs(rate - p) < 0.01  # 49k draws: 4.6 sigma
    assert torch.equal(keep, dropout_keep_mask(123, 4, 3, 64, 64, p))
    other = dropout_keep_mask(124, 4, 3, 64, 64, p)
    assert (keep != other).float().mean() > 0.2  # a new seed, a new mask
    # rows and (batch, head) slices are not copies of each other
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    assert not torch.equal(keep[0, 0], keep[0, 1])
    # neighbouring columns are uncorrelated
    x = keep.float().flatten(0, 2)
    c = torch.corrcoef(torch.stack([x[:, :-1].flatten(), x[:, 1:].flatten()]))[0, 1]
    assert abs(c) < 0.02


def test_dropout_is_applied_and_unbiased():
    torch.manual_seed(0)
    q, k, v = _qkv(2, 2, 32, 32, 8, torch.float64, 3)
    y0 = fused_attention(q, k, v, causal=True)
    ys = torch.stack([fused_attention(q, k, v, causal=True, dropout_p=0.3) for _ in range(200)])
    assert (ys[0] - y0).abs().max() > 1e-2  # the dropout is on
    assert not torch.equal(ys[0], ys[1])  # a seed per call from torch's generator
    err = (ys.mean(0) - y0).abs().mean() / y0.abs().mean()
    assert err < 0.05  # E[z / (1 - p)] = 1
    torch.manual_seed(7)
    a = fused_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(7)
    assert torch.equal(a, fused_attention(q, k, v, dropout_p=0.3))  # manual_seed repeats


def test_threads_bitwise():
    q, k, v = _qkv(2, 3, 100, 100, 12, torch.float32, 4)
    g = torch.randn(2, 3, 100, 12)
    old = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = fused_attention(q, k, v, causal=True, dropout_p=0.2, seed=9)
            res.append((y, *torch.autograd.grad(y, (q, k, v), g)))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_errors():
    q, k, v = _qkv(1, 2, 4, 4, 3, torch.float32, 5)
    with pytest.raises(ValueError, match="dropout_p"):
        fused_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="4-D"):
        fused_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="do not match"):
        fused_attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match="float32/float64"):
        fused_attention(q.half(), k.half(), v.half())


def test_turned_off_by_env(monkeypatch):
    monkeypatch.setenv("TANGLE_FUSED_ATTENTION", "0")
    assert "TANGLE_FUSED_ATTENTION" in fused_attention_available()
    q, k, v = _qkv(1, 1, 4, 4, 3, torch.float32, 6)
    with pytest.raises(RuntimeError, match="unavailable"):
        fused_attention(q, k, v)


# --- the supernet's head-partition attention with dropout ----------------------------

from tangle_kernels.ops.head_partition import (  # noqa: E402
    PartitionPlan,
    partition_attention,
    partition_attention_reference,
)


def _plan_inputs(seed):
    rng = random.Random(200 + seed)
    heads = rng.sample([1, 2, 3, 4, 6], rng.randint(1, 3))
    embeds = rng.sample([12, 24, 36], rng.randint(1, 3))
    plan = PartitionPlan(max(embeds), embeds, heads)
    dtype = rng.choice([torch.float32, torch.float64])
    g = torch.Generator().manual_seed(seed)
    B, T = 2, rng.choice([5, 70])
    qkv = torch.randn(B, T, 3 * plan.E, generator=g, dtype=dtype).requires_grad_()
    a = torch.rand(len(embeds), generator=g, dtype=dtype).add_(0.2).requires_grad_()
    b = torch.rand(len(heads), generator=g, dtype=dtype).add_(0.2).requires_grad_()
    return plan, qkv, a, b


def _masked_reference(plan, qkv, a, b, causal, p, seed):
    """The reference composition, each head count's call under the fused kernel's mask
    (the node draws one seed per head count, in order, from torch's generator)."""
    torch.manual_seed(seed)
    seeds = [att.draw_seed() for _ in plan.heads]

    def attend(j, q, k, v):
        B, h, T, _ = q.shape
        keep = dropout_keep_mask(seeds[j], B, h, T, T, p)
        return attention_reference(q, k, v, causal=causal, scale=1.0, dropout_p=p, keep=keep)

    return partition_attention_reference(qkv, a, b, plan, causal=causal, dropout_p=p, attend=attend)


@pytest.mark.parametrize("seed", range(8))
def test_partition_node_with_dropout_vs_reference(seed):
    """With attention dropout on CPU the head-partition attention is ONE node (gathers,
    the fused kernel per head count, the scatter): equal to the reference composition
    under the same masks, forward and every gradient."""
    plan, qkv, a, b = _plan_inputs(seed)
    causal = seed % 2 == 0
    torch.manual_seed(seed)
    y = partition_attention(qkv, a, b, plan, causal=causal, dropout_p=0.3)
    assert type(y.grad_fn).__name__ == "_PartitionAttentionBackward"
    ref = _masked_reference(plan, qkv, a, b, causal, 0.3, seed)
    assert (ref - partition_attention(qkv, a, b, plan, causal=causal)).abs().max() > 1e-3
    g = torch.ones_like(y) + y.detach()
    dtype = qkv.dtype
    for x, e in zip((y, *torch.autograd.grad(y, (qkv, a, b), g)),
                    (ref, *torch.autograd.grad(ref, (qkv, a, b), g))):
        tol = dict(TOLS[dtype])
        if dtype == torch.float32:  # float32 rounding on the tensor's own scale
            tol = dict(rtol=1e-4, atol=4e-6 * float(e.detach().abs().max()) + 1e-5)
            if e.dim() == 1:  # a, b: reductions over B*T*E terms
                tol = dict(rtol=1e-4, atol=1e-4 * float(e.detach().abs().max()) + 1e-6)
        torch.testing.assert_close(x, e, **tol)


def test_partition_node_with_dropout_gradcheck_fp64():
    plan = PartitionPlan(12, [6, 12], [1, 3])
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 5, 36, generator=g, dtype=torch.float64).requires_grad_()
    a = torch.rand(2, generator=g, dtype=torch.float64).add_(0.2).requires_grad_()
    b = torch.rand(2, generator=g, dtype=torch.float64).add_(0.2).requires_grad_()

    def fn(q, a, b):
        torch.manual_seed(0)
        return partition_attention(q, a, b, plan, causal=True, dropout_p=0.25)

    assert torch.autograd.gradcheck(fn, (qkv, a, b))

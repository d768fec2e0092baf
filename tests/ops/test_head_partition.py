"""Head-partition attention (tangle_kernels.ops.head_partition): the fused CPU node
(C++ gathers/scatters + flash attention, one autograd node) against the plain-torch
composition, on random plans, forward and every gradient; float64 gradcheck; the
coefficient gradients bitwise stable across thread counts; input errors."""

from __future__ import annotations

import random

import pytest
import torch
from tol_util import DEV, gpu, gpu_lane  # noqa: F401  (gpu_lane: the GPU cases' fixture)

from tangle_kernels.ops import head_partition as hp
from tangle_kernels.ops.head_partition import (
    PartitionPlan,
    partition_attention,
    partition_attention_reference,
)


def random_plan(rng: random.Random) -> PartitionPlan:
    """E = lcm-friendly width; head counts dividing every embedding width."""
    heads = rng.sample([1, 2, 3, 4, 6], rng.randint(1, 3))
    base = 12  # every head count above divides 12
    embeds = rng.sample([base * f for f in (1, 2, 3)], rng.randint(1, 3))
    return PartitionPlan(max(embeds), embeds, heads)


def inputs(plan, dtype, seed, grads=(True, True, True)):
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 5
    qkv = torch.randn(B, T, 3 * plan.E, generator=g, dtype=dtype).requires_grad_(grads[0])
    a = torch.rand(len(plan.embeds), generator=g, dtype=dtype).add_(0.2).requires_grad_(grads[1])
    b = torch.rand(len(plan.heads), generator=g, dtype=dtype).add_(0.2).requires_grad_(grads[2])
    return qkv, a, b


TOLS = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def test_fused_path_is_taken(monkeypatch):
    """The CPU float32/float64 call is the one-node fused path, with dropout too (the
    fused attention kernel); with that kernel off, dropout takes the gather / torch
    attention / scatter path."""
    plan = PartitionPlan(24, [12, 24], [2, 4])
    qkv, a, b = inputs(plan, torch.float32, 0)
    y = partition_attention(qkv, a, b, plan)
    assert type(y.grad_fn).__name__ == "_PartitionAttentionBackward"
    y2 = partition_attention(qkv, a, b, plan, dropout_p=0.1)
    assert type(y2.grad_fn).__name__ == "_PartitionAttentionBackward"
    monkeypatch.setenv("TANGLE_FUSED_ATTENTION", "0")
    y3 = partition_attention(qkv, a, b, plan, dropout_p=0.1)
    assert type(y3.grad_fn).__name__ == "_PartitionScatterBackward"


@pytest.mark.parametrize("seed", range(12))
def test_fused_vs_reference_random_plans(seed):
    rng = random.Random(seed)
    plan = random_plan(rng)
    dtype = rng.choice([torch.float32, torch.float64])
    causal = rng.random() < 0.5
    grads = (rng.random() < 0.8, rng.random() < 0.7, rng.random() < 0.7)
    if not any(grads):
        grads = (True, False, False)
    qkv, a, b = inputs(plan, dtype, seed, grads)
    y = partition_attention(qkv, a, b, plan, causal=causal)
    ref = partition_attention_reference(qkv, a, b, plan, causal=causal)
    torch.testing.assert_close(y, ref, **TOLS[dtype])
    assert ref.abs().max() > 1e-2
    g = torch.randn_like(y)
    leaves = [t for t in (qkv, a, b) if t.requires_grad]
    got = torch.autograd.grad(y, leaves, g)
    exp = torch.autograd.grad(ref, leaves, g)
    for x, e in zip(got, exp):
        scale = dict(TOLS[dtype])
        if dtype == torch.float32 and e.dim() == 1:  # a, b: reductions over B*T*E terms
            scale = dict(rtol=1e-4, atol=1e-4 * float(e.abs().max()) + 1e-6)
        torch.testing.assert_close(x, e, **scale)


@pytest.mark.parametrize("seed", range(8))
def test_dropout_path_vs_reference_random_plans(seed, monkeypatch):
    """With attention dropout and the fused attention kernel off, the CPU path is the
    gather node, torch's attention calls with dropout, the scatter node: under the same
    RNG state (the same dropout masks: one attention call per head count, in the same
    order and shapes) it equals the reference composition, forward and every gradient."""
    monkeypatch.setenv("TANGLE_FUSED_ATTENTION", "0")
    rng = random.Random(100 + seed)
    plan = random_plan(rng)
    dtype = rng.choice([torch.float32, torch.float64])
    qkv, a, b = inputs(plan, dtype, seed)
    causal = seed % 2 == 0
    res = []
    for fn in (partition_attention, partition_attention_reference):
        torch.manual_seed(seed)
        y = fn(qkv, a, b, plan, causal=causal, dropout_p=0.3)
        res.append((y, *torch.autograd.grad(y, (qkv, a, b), torch.ones_like(y) + y.detach())))
    assert type(res[0][0].grad_fn).__name__ == "_PartitionScatterBackward"
    torch.manual_seed(seed)
    no_drop = partition_attention(qkv, a, b, plan, causal=causal)
    assert (no_drop - res[0][0]).abs().max() > 1e-3  # the dropout is on
    for i, (x, e) in enumerate(zip(*res)):
        tol = dict(TOLS[dtype])
        if dtype == torch.float32 and e.dim() == 1:  # a, b: reductions over B*T*E terms
            tol = dict(rtol=1e-4, atol=1e-4 * float(e.abs().max()) + 1e-6)
        torch.testing.assert_close(x, e, **tol)


def test_dropout_gradcheck_fp64(monkeypatch):
    """gradcheck of the torch-attention dropout path (the masks fixed by re-seeding
    every call)."""
    monkeypatch.setenv("TANGLE_FUSED_ATTENTION", "0")
    plan = PartitionPlan(12, [6, 12], [1, 3])
    qkv, a, b = inputs(plan, torch.float64, 3)

    def fn(q, a, b):
        torch.manual_seed(0)
        return partition_attention(q, a, b, plan, causal=True, dropout_p=0.25)

    assert torch.autograd.gradcheck(fn, (qkv, a, b))


def test_gradcheck_fp64():
    plan = PartitionPlan(12, [6, 12], [1, 3])
    for causal in (False, True):
        qkv, a, b = inputs(plan, torch.float64, 3)
        assert torch.autograd.gradcheck(
            lambda q, a, b: partition_attention(q, a, b, plan, causal=causal), (qkv, a, b)
        )


def test_repeated_width_candidates():
    """Two embedding candidates of the same width (a product spec can give that) add."""
    plan = PartitionPlan(12, [6, 12, 6], [2, 3])
    qkv, a, b = inputs(plan, torch.float64, 4)
    torch.testing.assert_close(
        partition_attention(qkv, a, b, plan), partition_attention_reference(qkv, a, b, plan)
    )


def test_coefficient_grads_bitwise_across_threads():
    """d a and d b come from chunked dot products added in chunk order: the same bits
    for 1 and 2 threads (rows above the parallel threshold)."""
    plan = PartitionPlan(48, [24, 48], [2, 4])
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(4, 96, 3 * 48, generator=g).requires_grad_()
    a = torch.rand(2, generator=g).requires_grad_()
    b = torch.rand(2, generator=g).requires_grad_()
    dy = torch.randn(4, 96, 48, generator=g)
    n = torch.get_num_threads()
    out = []
    try:
        for th in (1, 2, 1):
            torch.set_num_threads(th)
            out.append(torch.autograd.grad(partition_attention(qkv, a, b, plan), (a, b), dy))
    finally:
        torch.set_num_threads(n)
    for got in out[1:]:
        assert torch.equal(got[0], out[0][0]) and torch.equal(got[1], out[0][1])


def test_errors():
    with pytest.raises(ValueError, match="3 heads do not divide embed 8"):
        PartitionPlan(12, [8, 12], [3])
    with pytest.raises(ValueError, match="5 heads do not divide E=12"):
        PartitionPlan(12, [12], [5])
    with pytest.raises(ValueError, match="embedding width 16 > E=12"):
        PartitionPlan(12, [16], [2])
    plan = PartitionPlan(12, [6, 12], [2])
    qkv, a, b = inputs(plan, torch.float32, 0)
    with pytest.raises(ValueError, match=r"qkv: expected \[B, T, 36\]"):
        partition_attention(qkv[..., :30], a, b, plan)
    with pytest.raises(ValueError, match=r"a, b: expected shapes \(2,\) and \(1,\)"):
        partition_attention(qkv, a[:1], b, plan)
    from tangle_kernels.backends.cpu.head_partition import head_gather

    with pytest.raises(ValueError, match="float32/float64"):
        head_gather(qkv.detach().half()[..., :12], torch.empty(2, 5, 2, 6).half(),
                       2, [3, 6], [1.0, 1.0], accumulate=False)


def test_non_contiguous_qkv():
    """A q | k | v tensor with strided rows is made contiguous before the kernels."""
    plan = PartitionPlan(12, [6, 12], [2, 3])
    qkv, a, b = inputs(plan, torch.float64, 7)
    wide = torch.randn(2, 5, 3 * plan.E * 2, dtype=torch.float64)[..., ::2]
    torch.testing.assert_close(
        partition_attention(wide, a, b, plan), partition_attention_reference(wide, a, b, plan)
    )
    assert hp._kernels_available(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scatter_multi_equals_one_scatter_per_head_count(dtype):
    """head_scatter_multi (every head count's scatter in one pass over dst's rows) gives
    the bits of one scatter per head count in order (the first writes, the rest add) and
    the same dots; strided sources and dst (q|k|v parts), rows above the parallel
    threshold, a width that leaves columns to zero-fill."""
    from tangle_kernels.backends.cpu.head_partition import head_scatter, head_scatter_multi

    g = torch.Generator().manual_seed(11)
    B, T, E = 3, 200, 48
    heads, embeds = [2, 4, 6], [24, 36]  # no candidate spans E: columns 36.. are zero-filled
    srcs = [torch.randn(B, T, 3, h, E // h, generator=g, dtype=dtype)[:, :, 1] for h in heads]
    widths = [[e // h for e in embeds] for h in heads]
    coefs = [[float(torch.rand(1, generator=g)) for _ in embeds] for _ in heads]
    X = torch.randn(B, T, 3, E, generator=g, dtype=dtype)
    want = torch.full((B, T, 3, E), float("nan"), dtype=dtype)
    got = want.clone()
    dots_want = [head_scatter(s, want[:, :, 2], h, w, c, accumulate=j > 0, other=X[:, :, 0])
                 for j, (s, h, w, c) in enumerate(zip(srcs, heads, widths, coefs))]
    dots_got = head_scatter_multi(srcs, got[:, :, 2], heads, widths, coefs, accumulate=False,
                                  other=X[:, :, 0])
    assert torch.equal(got[:, :, 2], want[:, :, 2]) and not got[:, :, 2].isnan().any()
    assert got[:, :, :2].isnan().all()  # only the addressed part is written
    for a, b in zip(dots_got, dots_want):
        assert torch.equal(a, b)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.empty(B, T, E, dtype=dtype)
        d1 = head_scatter_multi(srcs, one, heads, widths, coefs, accumulate=False, other=X[:, :, 0])
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, got[:, :, 2]) and all(torch.equal(a, b) for a, b in zip(d1, dots_got))
    with pytest.raises(ValueError, match="source of shape"):
        head_scatter_multi(srcs[:1], one, [4], widths[:1], coefs[:1], accumulate=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_multi_equals_one_gather_each(dtype):
    """head_gather_multi (several gathers over the same rows in one pass) writes the bits
    of one gather each: strided sources (q|k|v parts) and destinations, mixed head counts
    and widths (a candidate narrower than the slot: zero-filled), rows above the parallel
    threshold, any thread count; mismatched rows are refused."""
    from tangle_kernels.backends.cpu.head_partition import head_gather, head_gather_multi

    g = torch.Generator().manual_seed(12)
    B, T, E = 3, 200, 48
    X = torch.randn(B, T, 3, E, generator=g, dtype=dtype)
    heads, embeds = [2, 4, 6, 4], [24, 36]
    srcs = [X[:, :, p] for p in (0, 1, 2, 1)]
    widths = [[e // h for e in embeds] for h in heads]
    coefs = [[float(torch.rand(1, generator=g)) for _ in embeds] for _ in heads]
    want = [torch.full((B, T, 3, h, E // h), float("nan"), dtype=dtype)[:, :, 1] for h in heads]
    for s, d, h, w, c in zip(srcs, want, heads, widths, coefs):
        head_gather(s, d, h, w, c, accumulate=False)
    n = torch.get_num_threads()
    for threads in (1, 2):
        got = [torch.full((B, T, 3, h, E // h), float("nan"), dtype=dtype)[:, :, 1] for h in heads]
        try:
            torch.set_num_threads(threads)
            head_gather_multi(srcs, got, heads, widths, coefs)
        finally:
            torch.set_num_threads(n)
        for a, b in zip(got, want):
            assert torch.equal(a, b) and not a.isnan().any()
    # against the definition: slot (r, u) = sum_i [u < d_i] c_i src[r d_i + u]
    h, w, c = heads[1], widths[1], coefs[1]
    exp = torch.zeros(B, T, h, E // h, dtype=dtype)
    for d, ci in zip(w, c):
        exp[..., :d] += ci * srcs[1][..., :h * d].reshape(B, T, h, d)
    torch.testing.assert_close(want[1], exp)
    with pytest.raises(ValueError, match="same rows"):
        head_gather_multi([X[:, :, 0], X[:1, :, 0]], [want[0], want[1][:1]], heads[:2], widths[:2],
                          coefs[:2])


# ------------------------------------------------------------------ GPU cases
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_bucket", [16, 32, 128])
@gpu
def test_nanogpt_attention_grouped_vs_loop_gpu(dtype, head_bucket):
    """The grouped nanoGPT-mode attention (one SDPA call per head-width group, flash
    or memory-efficient kernels on GPU, head widths such as 72 padded to 80 / 96)
    equals the per-candidate loop on CUDA, forward and gradients."""
    import tangle_kernels.nn as tnn

    torch.manual_seed(0)
    m = tnn.EntangledAttention("e", "h", {"e": (96, 144, 192), "h": (2, 3, 4)}, causal=True,
                               head_bucket=head_bucket).to(DEV, dtype)
    x = torch.randn(2, 64, 192, device=DEV, dtype=dtype, requires_grad=True)
    arch = {n: torch.softmax(torch.randn(len(v), device=DEV), 0).requires_grad_(True) for n, v in m.choices.items()}

    def loop(x, arch):
        q, k, v = m.qkv(x, arch).split(m.inner, dim=-1)
        return m.proj(m._forward_partitions_loop(q, k, v, m._mix(arch, m.names)), arch)

    ins = [x, *arch.values()]
    y = m(x, arch)
    gy = torch.randn_like(y)
    g1 = torch.autograd.grad(y, ins + list(m.parameters()), gy)
    y2 = loop(x, arch)
    g2 = torch.autograd.grad(y2, ins + list(m.parameters()), gy)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(y, y2, **tol)
    for a, b in zip(g1, g2):
        scale = b.abs().max().item() + 1e-6
        assert (a - b).abs().max().item() <= tol["rtol"] * scale + tol["atol"], (a - b).abs().max()

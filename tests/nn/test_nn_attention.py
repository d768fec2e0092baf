"""EntangledAttention (AutoFormer and nanoGPT modes) against plain-PyTorch oracles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from nn_util import TOL, check_hard, check_soft, combos, rand_arch
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


def partition_oracle(m: tnn.EntangledAttention, q, k, v, arch):
    """nanoGPT ``soft_heads="partition"`` written out: for every head count h, q | k | v
    of every embedding candidate e cut into h heads of width e/h, zero-padded to the
    max head width E/h, q pre-scaled by sqrt(E/h)/sqrt(e/h) (mha then divides by
    sqrt(E/h)), mixed with the embedding weights; one mha per h; each candidate's head
    outputs put back at r e/h + t and mixed with (heads weight) x (embedding weight)."""
    E = m.embed_dim
    B, T, _ = q.shape
    ew = [(m.embed_spec.size(vals), c) for vals, c in combos(m.choices, m.embed_spec.names, arch)]
    hw = [(m.heads_spec.size(vals), c) for vals, c in combos(m.choices, m.heads_spec.names, arch)]
    y = 0
    for h, bh in hw:
        D = E // h
        mixed = []
        for t, is_q in ((q, True), (k, False), (v, False)):
            acc = 0
            for e, ae in ew:
                d = e // h
                heads = F.pad(t[..., :e].reshape(B, T, h, d), (0, D - d))
                if is_q:
                    heads = heads * math.sqrt(D) / math.sqrt(d)
                acc = acc + ae * heads
            mixed.append(acc.reshape(B, T, E))
        o = mha(*mixed, h, m.causal).reshape(B, T, h, D)
        for e, ae in ew:
            d = e // h
            y = y + bh * ae * F.pad(o[..., :d].reshape(B, T, e), (0, E - e))
    return y


def attn_oracle(m: tnn.EntangledAttention):
    """AutoFormer: padded-sum q|k|v and proj weights, ONE attention over H_max heads.
    nanoGPT: padded-sum projections, then ``soft_heads="partition"``: one attention per
    head count over the embedding-mixed heads (:func:`partition_oracle`); ``"exact"``:
    attention outputs mixed over (width, heads)."""
    qkv, proj = linear_oracle(m.qkv), linear_oracle(m.proj)
    E = m.embed_dim

    def fn(x, arch):
        q, k, v = qkv(x, arch).split(m.inner, dim=-1)
        if m.mode == "autoformer":
            y = mha(q, k, v, m.num_heads, m.causal)
        elif m.soft_heads == "partition":
            y = partition_oracle(m, q, k, v, arch)
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
    "nanogpt head dims differ": dict(
        embed_dim="e", num_heads="h", choices={"e": (8, 16), "h": (2, 4)}
    ),
}


@pytest.mark.parametrize(
    "name,soft_heads",
    [(n, s) for n in CASES for s in (("partition", "exact") if "nanogpt" in n else ("partition",))],
)
def test_attention_soft_hard_extract(name, soft_heads):
    m = tnn.EntangledAttention(**CASES[name], soft_heads=soft_heads)
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


# ------------------------------------------------ nanoGPT exact output mixture (option)
# soft_heads="exact": the soft nanoGPT forward stacks the heads of every (width, heads) candidate into ONE
# attention call; the per-candidate loop (one call per candidate) is its reference.

BATCHED = {
    "head dims differ": dict(choices={"e": (8, 16), "h": (2, 4)}),  # d = 4, 2, 8, 4
    "three widths": dict(choices={"e": (4, 6, 12), "h": (1, 2)}),  # d = 4, 2, 6, 3, 12, 6
    "fixed width": dict(embed_dim=12, choices={"h": (1, 3, 4, 6)}),  # d = 12, 4, 3, 2
    "fixed heads": dict(num_heads=2, choices={"e": (2, 6, 10)}),  # d = 1, 3, 5
}


def make_nanogpt(name, causal, dtype=torch.float32, head_bucket=16):
    kw = dict(embed_dim="e", num_heads="h", causal=causal, dtype=dtype, head_bucket=head_bucket,
              grouped_heads=True, soft_heads="exact")
    kw.update(BATCHED[name])
    return tnn.EntangledAttention(**kw)


def loop_forward(m: tnn.EntangledAttention):
    """The module's per-candidate reference: same q|k|v / proj, K_E * K_H SDPA calls."""

    def fn(x, arch):
        q, k, v = m.qkv(x, arch).split(m.inner, dim=-1)
        return m.proj(m._forward_partitions_loop(q, k, v, m._mix(arch, m.names)), arch)

    return fn


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("head_bucket", [1, 2, 64])  # exact widths / some padding / one call
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(BATCHED))
def test_nanogpt_batched_vs_loop_and_oracle(name, causal, dtype, head_bucket):
    """Batched == per-candidate loop == padded-sum oracle (mha written out), forward and
    every gradient (x, q|k|v and proj weights/biases, both arch vectors)."""
    m = make_nanogpt(name, causal, dtype, head_bucket)
    widths = sorted({min(m.head_pad, -(-(e // h) // head_bucket) * head_bucket) for e, h in m._cands})
    assert [D for _, _, D in m.head_groups] == widths
    assert m.mode == "nanogpt" and m.heads_total == sum(h for _, h in m._cands)
    x = torch.randn(2, 7, m.embed_dim, dtype=dtype, requires_grad=True)
    arch = rand_arch(m.choices, dtype)
    y = check_soft(m, x, arch, loop_forward(m), dtype=dtype)
    check_soft(m, x, arch, attn_oracle(m), dtype=dtype)
    assert y.abs().max() > 0.01  # not a vacuous comparison


def test_nanogpt_batched_gradcheck_fp64():
    """gradcheck of the batched combine itself w.r.t. q|k|v and mix (head dims 2, 1, 4, 2)
    and of the whole module w.r.t. x and both arch vectors."""
    m = tnn.EntangledAttention(
        "e", "h", {"e": (4, 8), "h": (2, 4)}, causal=False, dtype=torch.float64, head_bucket=2,
        grouped_heads=True, soft_heads="exact",
    )
    assert len(m.head_groups) == 2  # widths {2, 1 -> 2} and {4}
    qkv = torch.randn(1, 3, 3 * m.inner, dtype=torch.float64, requires_grad=True)
    mix = (torch.rand(len(m._cands), dtype=torch.float64) + 0.3).requires_grad_(True)
    assert torch.autograd.gradcheck(m._forward_partitions, (qkv, mix))
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    a = rand_arch(m.choices, torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, e, h: m(x, {"e": e, "h": h}), (x, a["e"], a["h"]), fast_mode=True
    )


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Records the keyword arguments of every F.scaled_dot_product_attention call."""
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def test_nanogpt_one_sdpa_call_per_width_group(sdpa_calls):
    """Soft nanoGPT forward: one attention call per head-width group (the loop makes
    K_E * K_H), with the module's is_causal / dropout_p and scale=1 (q pre-scaled per
    head)."""
    for bucket, n_calls in ((4, 3), (8, 2), (16, 1)):  # widths 8, 16, 4, 8, 2, 4
        sdpa_calls.clear()
        m = tnn.EntangledAttention("e", "h", {"e": (8, 16), "h": (1, 2, 4)}, head_bucket=bucket,
                                   grouped_heads=True, soft_heads="exact")
        m(torch.randn(1, 3, 16), rand_arch(m.choices))
        assert len(sdpa_calls) == len(m.head_groups) == n_calls, bucket
    with pytest.raises(ValueError, match="head_bucket=0"):
        tnn.EntangledAttention("e", "h", {"e": (8, 16), "h": (1, 2)}, head_bucket=0)
    sdpa_calls.clear()
    m = tnn.EntangledAttention("e", "h", {"e": (8, 16), "h": (1, 2, 4)}, causal=True, dropout=0.25,
                               grouped_heads=True, soft_heads="exact")
    x = torch.randn(2, 5, 16)
    arch = rand_arch(m.choices)
    m.eval()
    y = m(x, arch)
    assert len(sdpa_calls) == 1
    assert sdpa_calls[0]["scale"] == 1.0 and sdpa_calls[0]["is_causal"] is True
    assert sdpa_calls[0]["dropout_p"] == 0.0
    sdpa_calls.clear()
    y_loop = loop_forward(m)(x, arch)
    assert len(sdpa_calls) == 6  # the counter sees every call
    torch.testing.assert_close(y, y_loop)
    sdpa_calls.clear()
    m.train()
    y = m(x, arch)
    assert len(sdpa_calls) == 1 and sdpa_calls[0]["dropout_p"] == 0.25
    y.sum().backward()
    sdpa_calls.clear()
    # the one-hot path in training: the sub-network's one call, with dropout on CPU the
    # fused kernel (tangle_kernels.ops.attention)
    import tangle_kernels.ops.attention as att

    fused = []
    real_fused = att.fused_attention

    def counting_fused(*a, **k):
        fused.append(k)
        return real_fused(*a, **k)

    att.fused_attention = counting_fused
    try:
        m(x, tnn.one_hot_arch(m.choices, {"e": 8, "h": 2})).sum().backward()
    finally:
        att.fused_attention = real_fused
    assert len(sdpa_calls) + len(fused) == 1
    assert len(fused) == (1 if att.fused_attention_available() is None else 0)
    m.eval()
    m(x, tnn.one_hot_arch(m.choices, {"e": 8, "h": 2}))
    assert len(sdpa_calls) == 1  # no dropout: torch's attention


def test_nanogpt_grouping_default_by_device(sdpa_calls):
    """grouped_heads=None: the per-candidate loop on CPU (measured faster there), the
    grouped calls on CUDA; the two agree."""
    m = tnn.EntangledAttention("e", "h", {"e": (8, 16), "h": (1, 2, 4)}, soft_heads="exact")
    assert m.grouped_heads is None
    x = torch.randn(1, 3, 16)
    arch = rand_arch(m.choices)
    y = m(x, arch)
    assert len(sdpa_calls) == 6  # K_E * K_H on CPU
    m.grouped_heads = True
    sdpa_calls.clear()
    torch.testing.assert_close(m(x, arch), y)
    assert len(sdpa_calls) == len(m.head_groups) == 1
    with pytest.raises(ValueError, match="grouped_heads='yes'"):
        tnn.EntangledAttention("e", "h", {"e": (8, 16), "h": (1, 2)}, grouped_heads="yes")


def test_nanogpt_batched_buffers():
    """The index tables are non-persistent buffers: not in the state dict, moved and
    cast with the module; a float32-built module cast to float64 stays exact (the q
    multipliers 1/sqrt(d) are a float64 buffer, cast to the input's dtype per call)."""
    m = tnn.EntangledAttention("e", "h", {"e": (6, 12), "h": (2, 3)}, grouped_heads=True,
                               soft_heads="exact")
    assert not [k for k in m.state_dict() if "_hd_" in k]
    assert (m.heads_total, m.head_pad) == (10, 6)
    m2 = tnn.EntangledAttention("e", "h", {"e": (6, 12), "h": (2, 3)}, soft_heads="exact")
    m2.load_state_dict(m.state_dict())  # the same keys as a module without the tables
    m = m.double()
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    arch = rand_arch(m.choices, torch.float64)
    torch.testing.assert_close(m(x, arch), loop_forward(m)(x, arch), **TOL[torch.float64])


# ------------------------------------------- nanoGPT head partitions (the default)
PARTITION = {
    "two widths": dict(choices={"e": (4, 8), "h": (1, 2, 4)}),
    "three widths": dict(choices={"e": (4, 6, 12), "h": (1, 2)}),
    "fixed width": dict(embed_dim=12, choices={"h": (1, 3, 4, 6)}),
    "fixed heads": dict(num_heads=2, choices={"e": (2, 6, 10)}),
}


def make_partition(name, causal=True, dtype=torch.float32, soft_heads="partition"):
    kw = dict(embed_dim="e", num_heads="h", causal=causal, dtype=dtype, soft_heads=soft_heads)
    kw.update(PARTITION[name])
    return tnn.EntangledAttention(**kw)


@pytest.mark.parametrize("name", list(PARTITION))
def test_partition_one_hot_equals_exact_and_extract(name):
    """Under a one-hot SOFT arch (a plain dict: the soft path runs) the head-partition
    relaxation, the exact output mixture and the extracted sub-network agree, for every
    candidate; under a non-one-hot arch the two relaxations differ when the embedding
    width is a choice (so the comparison above is not vacuous) and coincide when it is
    not."""
    torch.manual_seed(0)
    part = make_partition(name, dtype=torch.float64)
    exact = make_partition(name, dtype=torch.float64, soft_heads="exact")
    exact.load_state_dict(part.state_dict())
    x = torch.randn(2, 5, part.embed_dim, dtype=torch.float64)
    for combo in combos(part.choices, part.names, {n: torch.ones(len(v)) for n, v in part.choices.items()}):
        sel = combo[0]
        arch = {n: tnn.one_hot_arch(part.choices, sel)[n].double() for n in part.choices}
        y_p, y_e = part(x, arch), exact(x, arch)
        sub = part.extract(sel)
        w = sub.embed_dim
        ref = F.pad(sub(x[..., :w]), (0, part.embed_dim - w))
        torch.testing.assert_close(y_p, ref, **TOL[torch.float64])
        torch.testing.assert_close(y_e, ref, **TOL[torch.float64])
    arch = rand_arch(part.choices, torch.float64)
    if part.embed_spec.names:
        assert max_err(part(x, arch), exact(x, arch)) > 1e-3
    else:  # one embedding width: both are sum_h b_h attend_h, the same relaxation
        torch.testing.assert_close(part(x, arch), exact(x, arch), **TOL[torch.float64])


def test_partition_paper_slots_break_one_hot():
    """The TangleNAS code's head slots (head r at r E/h, scale 1/sqrt(E/h)) do not give
    the extracted sub-network for a non-max embedding width; ours does (same input)."""
    torch.manual_seed(1)
    m = make_partition("two widths", dtype=torch.float64)  # e in (4, 8), h in (1, 2, 4)
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    sel = {"e": 4, "h": 2}
    arch = {n: tnn.one_hot_arch(m.choices, sel)[n].double() for n in m.choices}
    q, k, v = m.qkv(x, arch).split(m.inner, dim=-1)
    B, T, E = q.shape
    h, D = 2, E // 2
    paper = mha(q, k, v, h, m.causal)  # slots of width E/h over the max width, 1/sqrt(E/h)
    sub = m.extract(sel)
    ref = F.pad(sub(x[..., :4]), (0, 4))
    assert max_err(m.proj(paper, arch), ref) > 1e-3
    torch.testing.assert_close(m(x, arch), ref, **TOL[torch.float64])
    assert D == 4


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(PARTITION))
def test_partition_soft_vs_oracle_fp32(name, causal):
    m = make_partition(name, causal)
    x = torch.randn(2, 6, m.embed_dim, requires_grad=True)
    # atol: the k-bias gradient is exactly 0 in exact arithmetic (softmax is shift
    # invariant), so both sides are float32 rounding noise of two attention
    # implementations summed over B*T = 12 rows (~1e-4); everything else is O(1)
    tol = dict(rtol=2e-5, atol=2e-4)
    y = check_soft(m, x, rand_arch(m.choices), attn_oracle(m), tol=tol)
    assert y.abs().max() > 0.01


def test_partition_gradcheck_fp64():
    """gradcheck of the module's head-partition path w.r.t. x and both arch vectors
    (on CPU: the one-node fused path with the C++ gathers)."""
    m = make_partition("three widths", causal=True, dtype=torch.float64)
    x = torch.randn(1, 3, 12, dtype=torch.float64, requires_grad=True)
    a = rand_arch(m.choices, torch.float64)
    assert torch.autograd.gradcheck(lambda x, e, h: m(x, {"e": e, "h": h}), (x, a["e"], a["h"]))


def test_partition_one_attention_call_per_head_count(monkeypatch):
    """Soft arch: one attention call per head count (3 here; the exact mixture makes
    K_E * K_H = 6), on the fused path and on the composition (dropout in training)."""
    import tangle_kernels.ops.head_partition as hp

    calls = []
    real_flash, real_sdpa = hp._FLASH, F.scaled_dot_product_attention

    def flash(*a, **k):
        calls.append("flash")
        return real_flash(*a, **k)

    def sdpa(*a, **k):
        calls.append("sdpa")
        return real_sdpa(*a, **k)

    import tangle_kernels.backends.cpu as cpu_backend

    real_fused = cpu_backend.attention_forward

    def fused(*a, **k):
        calls.append("fused")
        return real_fused(*a, **k)

    monkeypatch.setattr(hp, "_FLASH", flash)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(cpu_backend, "attention_forward", fused)
    m = tnn.EntangledAttention("e", "h", {"e": (8, 16), "h": (1, 2, 4)}, causal=True, dropout=0.25)
    x = torch.randn(2, 5, 16)
    arch = rand_arch(m.choices)
    m.eval()
    m(x, arch).sum().backward()
    assert calls == ["flash"] * 3
    calls.clear()
    m.train()  # attention dropout: the fused kernel with dropout, one call per head count
    m(x, arch).sum().backward()
    assert calls == ["fused"] * 3
    calls.clear()
    monkeypatch.setenv("TANGLE_FUSED_ATTENTION", "0")  # without it: torch's attention
    m(x, arch)
    assert calls == ["sdpa"] * 3


@pytest.mark.parametrize("batch_first", [True, False])
def test_from_module_multihead_attention(batch_first):
    """from_module on nn.MultiheadAttention: the max choice is the module, a one-hot
    arch equals the extracted stock module (its head attributes updated)."""
    torch.manual_seed(0)
    mha_mod = torch.nn.MultiheadAttention(12, 4, batch_first=batch_first).eval()
    choices = {"e": (8, 12), "h": (2, 4)}
    att = tnn.EntangledAttention.from_module(mha_mod, choices, embed_dim="e", num_heads="h").eval()
    x = torch.randn(2, 5, 12) if batch_first else torch.randn(5, 2, 12)
    torch.testing.assert_close(att(x, x, x, need_weights=False)[0], mha_mod(x, x, x, need_weights=False)[0])
    for sel in ({"e": 8, "h": 2}, {"e": 12, "h": 2}, {"e": 8, "h": 4}):
        child = att.extract(sel)
        assert type(child) is torch.nn.MultiheadAttention
        assert (child.embed_dim, child.num_heads, child.head_dim) == (sel["e"], sel["h"], sel["e"] // sel["h"])
        xs = x[..., : sel["e"]]
        want = child(xs, xs, xs, need_weights=False)[0]
        got = att(x, x, x, need_weights=False, arch=tnn.one_hot_arch(choices, sel))[0]
        torch.testing.assert_close(got[..., : sel["e"]], want, **TOL[torch.float32])
        assert not got[..., sel["e"] :].any()
    with pytest.raises(ValueError, match="need_weights=False"):
        att(x, x, x)
    with pytest.raises(TypeError, match="no attention converter"):
        tnn.EntangledAttention.from_module(torch.nn.Linear(4, 4))

"""Every public op and module compiles with ``fullgraph=True`` on its FIRST call, with
layouts built just before (or inside) the compiled function (issue 16).

Each case starts from a fresh dynamo state (``torch._dynamo.reset()``) and fresh
layouts, so nothing was warmed up by an eager call. Most cases compile with the
``aot_eager`` backend (dynamo + AOTAutograd with fake tensors: what decides whether a
graph is whole; inductor's code generation takes tens of seconds per graph on CPU;
tests/test_compile_search.py runs a fresh EntangledLinear through inductor). Shapes
are tiny.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import tangle_kernels as tk
import tangle_kernels.nn as tnn
from tangle_kernels.layout import Layout

TOL = dict(rtol=1e-5, atol=1e-5)


def _compiled(fn, backend="aot_eager"):
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend(backend)
    return torch.compile(fn, fullgraph=True, backend=cnt), cnt


def _grads(out, leaves):
    return torch.autograd.grad(out, leaves, allow_unused=True)


def _check(fn, args, backend="aot_eager"):
    """fn(*args) compiled on its first call == eager, values and gradients; one graph."""
    cf, cnt = _compiled(fn, backend)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    yc = cf(*args)
    gc = _grads(yc, leaves)
    ye = fn(*args)
    ge = _grads(ye, leaves)
    torch.testing.assert_close(yc, ye, **TOL)
    for a, b in zip(gc, ge):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, **TOL)
    cf(*args)  # a second call reuses the graph
    assert cnt.frame_count == 1
    return cnt


def test_issue_example():
    """The issue's example: a fresh Layout, entangled_linear with a bias (whose layout
    is derived inside the traced region), fullgraph, first call (inductor on a fresh
    EntangledLinear: tests/test_compile_search.py)."""
    layout = Layout.prefix((12, 8), [[6, 12], [4, 8]])
    x = torch.randn(3, 8)
    w = torch.randn(12, 8, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    m = torch.softmax(torch.randn(layout.K), 0).requires_grad_()
    assert "_projections" in layout.__dict__ and not layout._projections  # nothing derived yet
    _check(lambda x, w, b, m: tk.entangled_linear(x, w, b, m, layout).sum(), (x, w, b, m))


def _random_layout(rng: random.Random, rank: int) -> Layout:
    shape = tuple(rng.randint(2, 9) for _ in range(rank))
    K = rng.randint(1, 4)
    boxes = []
    for _ in range(K):
        box = []
        for s in shape:
            lo = rng.randint(0, s - 1)
            box.append((lo, rng.randint(lo + 1, s)))
        boxes.append(box)
    return Layout(shape, boxes)


@pytest.mark.parametrize("seed", range(4))
def test_random_layouts_first_call(seed):
    """Property: for random layouts (built fresh, after a dynamo reset) superpose,
    entangled_linear (bias layout derived while tracing) and entangled_conv2d (a
    projected bias layout) compile whole on their first call and equal eager mode."""
    rng = random.Random(seed)
    torch.manual_seed(seed)

    lay = _random_layout(rng, rng.randint(1, 4))
    w = torch.randn(lay.shape, requires_grad=True)
    m = torch.rand(lay.K).requires_grad_()
    _check(lambda w, m: tk.superpose(w, m, lay).square().sum(), (w, m))

    lay2 = _random_layout(rng, 2)
    out, inn = lay2.shape
    x = torch.randn(3, inn)
    w2 = torch.randn(lay2.shape, requires_grad=True)
    b2 = torch.randn(out, requires_grad=True)
    m2 = torch.rand(lay2.K).requires_grad_()
    _check(lambda x, w, b, m: tk.entangled_linear(x, w, b, m, lay2).square().sum(), (x, w2, b2, m2))

    lay4 = _random_layout(rng, 4)
    o, i, kh, kw = lay4.shape
    x4 = torch.randn(2, i, kh + 2, kw + 2)
    w4 = torch.randn(lay4.shape, requires_grad=True)
    b4 = torch.randn(o, requires_grad=True)
    m4 = torch.rand(lay4.K).requires_grad_()

    def conv(x, w, b, m):
        bl = lay4.project([0])  # derived while tracing
        return tk.entangled_conv2d(x, w, b, m, lay4, bias_mix=m, bias_layout=bl, padding=1).square().sum()

    _check(conv, (x4, w4, b4, m4))


def test_layout_built_inside_the_traced_region():
    """Layout(...), the named constructors and project() called inside the compiled
    function itself: built outside the trace, the graph stays whole."""
    x = torch.randn(3, 8)
    w = torch.randn(12, 8, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    m = torch.rand(4).requires_grad_()

    def f(x, w, b, m):
        lay = Layout.grid((12, 8), {"o": [6, 12], "i": [4, 8]}, lambda o, i: [(0, o), (0, i)])
        raw = Layout((12, 8), [((0, 6), (0, 4)), ((0, 6), (0, 8)), ((0, 12), (0, 4)), ((0, 12), (0, 8))])
        y = tk.entangled_linear(x, w, b, m, lay)
        return y.square().sum() + tk.superpose(b, m, raw.project([0])).sum()

    _check(f, (x, w, b, m))
    # the layouts built while tracing are ordinary layouts
    lay = Layout.grid((12, 8), {"o": [6, 12], "i": [4, 8]}, lambda o, i: [(0, o), (0, i)])
    assert lay.choice_names == ("o", "i") and lay.project([0]) is lay.project((0,))


def test_tables_of_another_device_are_built_outside_the_trace():
    """Device tables requested while tracing (here: the meta device, the CPU lane's
    stand-in for a GPU) are built and cached for real, outside the graph."""
    lay = Layout.prefix((6, 4), [[3, 6], [2, 4]])
    x = torch.randn(5, device="meta")

    def f(x):
        return x * lay.tables(x.device)["B32"].sum()

    cf, cnt = _compiled(f)
    assert cf(x).shape == (5,)
    assert ("meta", None) in lay._device_cache and cnt.frame_count == 1
    cf(x)
    assert cnt.frame_count == 1


# ------------------------------------------------------------------------ modules
def _module_cases():
    ch = {"i": [4, 8], "o": [6, 12]}
    yield "linear", lambda: tnn.EntangledLinear("i", "o", ch), ch, (3, 8)
    ch2 = {"c": [4, 8], "k": [1, 3], "o": [6, 12]}
    yield "conv", lambda: tnn.EntangledConv2d("c", "o", "k", ch2), ch2, (2, 8, 5, 5)
    ch3 = {"c": [4, 8], "k": [1, 3]}
    yield "conv_dw_transform", lambda: tnn.EntangledConv2d(
        "c", "c", "k", ch3, groups="c", kernel_transform=True), ch3, (2, 8, 5, 5)
    chb = {"c": [4, 8]}
    yield "batchnorm", lambda: tnn.EntangledBatchNorm2d("c", chb), chb, (2, 8, 3, 3)
    yield "layernorm", lambda: tnn.EntangledLayerNorm("c", chb), chb, (2, 3, 8)
    yield "embedding", lambda: tnn.EntangledEmbedding(11, "c", chb), chb, None
    cha = {"e": [8, 16], "h": [1, 2]}
    yield "attention_nanogpt", lambda: tnn.EntangledAttention("e", "h", cha, causal=True), cha, (2, 5, 16)
    yield "attention_autoformer", lambda: tnn.EntangledAttention("e", "h", cha, head_dim=4), cha, (2, 5, 16)
    chd = {"d": [1, 2], "c": [4, 8]}
    yield "depth_mixer", lambda: tnn.DepthMixer(
        [tnn.EntangledLinear("c", "c", chd) for _ in range(2)], "d", chd), chd, (3, 8)
    cho = {"op": [0, 1], "c": [4, 8]}
    yield "op_mixer", lambda: tnn.OpMixer([tnn.EntangledLinear("c", "c", cho), nn.Identity()], "op", cho), \
        cho, (3, 8)


@pytest.mark.parametrize("case", list(_module_cases()), ids=lambda c: c[0])
def test_every_module_first_call(case):
    """Every tangle_kernels.nn module, freshly built, compiles whole on its first call
    under a soft arch and under a HardArch (GDAS-style: gradients to the vectors), and
    equals eager mode in value and gradients."""
    _, make, choices, xshape = case
    for hard in (False, True):
        torch.manual_seed(0)
        mod = make()
        x = torch.randint(0, 11, (2, 5)) if xshape is None else torch.randn(xshape)
        if hard:
            arch = tnn.one_hot_arch(choices, {n: v[0] for n, v in choices.items()})
            for v in arch.values():
                v.requires_grad_(True)
        else:
            arch = {n: torch.rand(len(v)).requires_grad_() for n, v in choices.items()}
        vecs = list(arch.values())

        def f(x, *vs, mod=mod, arch=arch):
            a = type(arch)(dict(zip(arch, vs)), arch.index) if hard else dict(zip(arch, vs))
            return mod(x, a).square().sum()

        _check(f, (x, *vecs))


def test_partition_attention_compiles_to_the_cpu_node():
    """The nanoGPT head-partition attention under torch.compile on CPU: with attention
    dropout the ``tangle::partition_attention_*`` custom ops (the eager node's kernels,
    opcheck-clean; the seeds drawn in the graph: a new mask each call; gradients flow),
    without dropout the reference composition (== the eager node); one whole graph."""
    from tangle_kernels.ops import head_partition as hp

    plan = hp.PartitionPlan(24, [12, 24], [2, 4, 3])
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 9, 72, generator=g, requires_grad=True)
    a = torch.rand(2, generator=g).add_(0.2).requires_grad_()
    b = torch.rand(3, generator=g).add_(0.2).requires_grad_()
    calls = []
    real = hp._node_forward

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    hp._node_forward = counting
    try:
        f, cnt = _compiled(lambda q, a, b: hp.partition_attention(q, a, b, plan))
        y = f(qkv, a, b)
        assert cnt.frame_count == 1 and not calls  # no dropout: the reference composition
        fd, cnt = _compiled(lambda q, a, b: hp.partition_attention(q, a, b, plan, dropout_p=0.3))
        y1, y2 = fd(qkv, a, b), fd(qkv, a, b)
        assert cnt.frame_count == 1 and len(calls) == 2  # the custom op ran the node
    finally:
        hp._node_forward = real
    ref = hp.partition_attention(qkv, a, b, plan)
    G = torch.randn_like(y)
    torch.testing.assert_close(y, ref, **TOL)
    for x, e in zip(_grads((y * G).sum(), (qkv, a, b)), _grads((ref * G).sum(), (qkv, a, b))):
        torch.testing.assert_close(x, e, **TOL)
    assert (y1 - y2).abs().max() > 1e-3 and (y1 - ref).abs().max() > 1e-3
    assert all(t is not None and t.isfinite().all() for t in _grads(y1.sum(), (qkv, a, b)))
    # the op itself: the eager node's values, bitwise, under the same seeds
    seeds = torch.tensor([1, 2, 3])
    torch.manual_seed(5)
    direct = hp._pa_fwd_op(qkv, a, b, seeds, 24, [12, 24], [2, 4, 3], True, 0.3)[0]
    node = hp._node_forward(qkv.detach(), a.detach(), b.detach(), plan, True, 0.3, [1, 2, 3])[0]
    assert torch.equal(direct, node)
    for p in (0.0, 0.25):
        torch.library.opcheck(hp._pa_fwd_op, (qkv.detach().requires_grad_(), a.detach().requires_grad_(),
                                              b.detach().requires_grad_(), seeds, 24, [12, 24],
                                              [2, 4, 3], True, p))

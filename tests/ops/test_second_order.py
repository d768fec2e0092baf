"""Second derivatives (issue 24): every op is twice differentiable on every route, with
the reference composition's second derivatives; ``torch.autograd.grad(...,
create_graph=True)`` included (the once-differentiable nodes used to be pruned there
silently, and the fused CPU nodes returned gradients without a graph).

gradgradcheck in float64 on random layouts, the issue's example against the padded
sum, and a Hessian-vector product in the architecture logits through the README's conv
supernet against finite differences.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import tangle_kernels as tk
import tangle_kernels.nn as tnn
from tangle_kernels import backends
from tangle_kernels.backends.reference import superpose_reference
from tangle_kernels.ops.entangled_linear import bias_layout

# The kernel backends that run CPU tensors (from the registry), and the oracle.
CPU_BACKENDS = [b for b in backends.AUTO_ORDER["cpu"] if b in backends.IMPLS["superpose"]
                and backends.why_unavailable("superpose", b, torch.device("cpu")) is None]
F64 = dict(dtype=torch.float64)


def random_layout(rng: random.Random, rank: int) -> tk.Layout:
    shape = [rng.choice([1, 2, 3, 5, 6]) for _ in range(rank)]
    boxes = []
    for _ in range(rng.randint(1, 4)):
        box = []
        for s in shape:
            lo = rng.randrange(s)
            box.append((lo, rng.randint(lo + 1, s)))
        boxes.append(box)
    return tk.Layout(shape, boxes)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_superpose_gradgradcheck(backend, seed):
    lay = random_layout(random.Random(seed), rank=1 + seed % 4)
    w = torch.randn(lay.shape, **F64, requires_grad=True)
    m = torch.rand(lay.K, **F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda w, m: tk.superpose(w, m, lay, backend=backend), (w, m))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_superpose_issue_example_equals_padded_sum(backend):
    """``(superpose(W, mix)**3).sum() + (W**3).sum() + (mix**3).sum()``: the second
    derivative through ``torch.autograd.grad(create_graph=True)`` equals the padded sum's."""
    lay = tk.Layout.grid((6, 5), {"e": [2, 5], "r": [1, 2, 3]}, lambda e, r: [(0, 2 * r), (0, e)])
    w0 = torch.randn(lay.shape, **F64)
    m0 = torch.rand(lay.K, **F64)
    out = []
    for fn in (lambda w, m: tk.superpose(w, m, lay, backend=backend),
               lambda w, m: superpose_reference(w, m, lay)):
        w, m = w0.clone().requires_grad_(), m0.clone().requires_grad_()
        loss = (fn(w, m) ** 3).sum() + (w ** 3).sum() + (m ** 3).sum()
        gw, gm = torch.autograd.grad(loss, (w, m), create_graph=True)
        out.append(torch.autograd.grad((gw.sum() + gm.sum()), (w, m)))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_superpose_compile_route_is_twice_differentiable():
    """The custom-op route (what torch.compile traces), called directly."""
    from tangle_kernels.ops.superpose import _superpose_custom_op

    lay = random_layout(random.Random(7), rank=2)
    w = torch.randn(lay.shape, **F64, requires_grad=True)
    m = torch.rand(lay.K, **F64, requires_grad=True)
    for backend in CPU_BACKENDS:
        assert torch.autograd.gradgradcheck(lambda w, m: _superpose_custom_op(w, m, lay, backend), (w, m))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_entangled_linear_gradgradcheck(backend, seed):
    rng = random.Random(seed)
    fout, fin = rng.choice([3, 4, 6]), rng.choice([2, 4, 5])
    lay = tk.Layout.prefix((fout, fin), [sorted({rng.randint(1, fout), fout}), [rng.randint(1, fin), fin]])
    x = torch.randn(3, fin, **F64, requires_grad=True)
    w = torch.randn(lay.shape, **F64, requires_grad=True)
    b = torch.randn(fout, **F64, requires_grad=True)
    m = torch.rand(lay.K, **F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w, b, m: tk.entangled_linear(x, w, b, m, lay, backend=backend), (x, w, b, m))
    assert bias_layout(lay).K == lay.K


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_entangled_conv2d_gradgradcheck(backend):
    lay = tk.Layout.conv((4, 3, 3, 3), [2, 4], [2, 3], [1, 3])
    blay = lay.project((0,))
    x = torch.randn(2, 3, 5, 5, **F64, requires_grad=True)
    w = torch.randn(lay.shape, **F64, requires_grad=True)
    b = torch.randn(4, **F64, requires_grad=True)
    m = torch.rand(lay.K, **F64, requires_grad=True)
    bm = torch.rand(blay.K, **F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w, b, m, bm: tk.entangled_conv2d(x, w, b, m, lay, bias_mix=bm, bias_layout=blay,
                                                   padding=1, backend=backend), (x, w, b, m, bm))


def test_mixed_layernorm_node_gradgradcheck():
    from tangle_kernels.ops.mixed_layernorm import fused_available, mixed_layer_norm

    x = torch.randn(3, 7, **F64, requires_grad=True)
    if not fused_available(x):
        pytest.skip("the C++ extension is not built")
    w = torch.randn(7, **F64, requires_grad=True)
    b = torch.randn(7, **F64, requires_grad=True)
    m = torch.rand(3, **F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w, b, m: mixed_layer_norm(x, w, b, m, (3, 5, 7), 1e-5),
                                        (x, w, b, m))


def test_entangled_layernorm_module_second_derivative_equals_composition():
    """The module's soft path (the CPU node) against its composition (the oracle): the
    second derivative of a loss in x (``d/dx`` of ``||dL/dx||^2``)."""
    m = tnn.EntangledLayerNorm("d", {"d": [3, 5, 8]}).double()
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x0 = torch.randn(4, 8, **F64)
    mix = torch.softmax(torch.randn(3, **F64), 0)
    out = []
    for fused in (True, False):
        x = x0.clone().requires_grad_()
        if fused:
            y = m(x, {"d": mix})
        else:
            y = m.mixed_xhat(x, mix) * m.weight + superpose_reference(m.bias, mix, m.layout)
        (gx,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
        out.append(torch.autograd.grad(gx.square().sum(), x)[0])
    torch.testing.assert_close(out[0], out[1], rtol=1e-9, atol=1e-9)


def test_fused_attention_gradgradcheck():
    from tangle_kernels.ops.attention import fused_attention, fused_attention_available

    if fused_attention_available() is not None:
        pytest.skip(f"fused attention: {fused_attention_available()}")
    q, k, v = (torch.randn(1, 2, 4, 3, **F64, requires_grad=True) for _ in range(3))
    for p in (0.0, 0.3):
        assert torch.autograd.gradgradcheck(
            lambda q, k, v: fused_attention(q, k, v, causal=True, dropout_p=p, seed=5), (q, k, v))


def _plan_inputs():
    from tangle_kernels.ops.head_partition import PartitionPlan

    plan = PartitionPlan(8, [4, 8], [1, 2, 4])
    qkv = torch.randn(1, 3, 24, **F64, requires_grad=True)
    a = torch.softmax(torch.randn(2, **F64), 0).requires_grad_()
    b = torch.softmax(torch.randn(3, **F64), 0).requires_grad_()
    return plan, qkv, a, b


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_partition_attention_node_gradgradcheck(dropout_p):
    from tangle_kernels.ops.head_partition import partition_attention

    plan, qkv, a, b = _plan_inputs()

    def fn(qkv, a, b):
        torch.manual_seed(0)  # the node draws its dropout seeds from torch's generator
        return partition_attention(qkv, a, b, plan, causal=True, dropout_p=dropout_p)

    torch.manual_seed(0)
    y = partition_attention(qkv, a, b, plan, causal=True, dropout_p=dropout_p)
    if backends.why_unavailable("head_partition", "cpu", qkv.device) is None:
        assert type(y.grad_fn).__name__ in ("_PartitionAttentionBackward", "_PartitionScatterBackward")
    assert torch.autograd.gradgradcheck(fn, (qkv, a, b))


def test_partition_gather_scatter_nodes_gradgradcheck(monkeypatch):
    """The dropout path without the fused attention: the gather and scatter nodes
    around torch's own attention (dropout 0 inside: only the nodes are tested)."""
    from tangle_kernels.ops import head_partition_nodes as nodes

    if backends.why_unavailable("head_partition", "cpu", torch.device("cpu")) is not None:
        pytest.skip("the C++ extension is not built")
    plan, qkv, a, b = _plan_inputs()

    def fn(qkv, a, b):
        parts = nodes._PartitionGather.apply(qkv, a, plan)
        outs = [(parts[3 * j] * parts[3 * j + 1] + parts[3 * j + 2]).sin() for j in range(len(plan.heads))]
        return nodes._PartitionScatter.apply(a, b, plan, *outs)

    assert torch.autograd.gradgradcheck(fn, (qkv, a, b))


def test_hessian_vector_product_in_the_architecture_logits():
    """The README's conv supernet (SiLU for ReLU: central differences must not straddle
    a kink): ``H v`` of the loss in the architecture logits (what RobustDARTS/SDARTS-style
    analyses compute) equals finite differences of the gradient, on the default (kernel)
    backends: the conv, linear and batch-norm nodes and superpose."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 8, 5, padding=2), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 12), nn.SiLU(), nn.Linear(12, 5),
    ).double()
    choices = {"c": [4, 6, 8], "k": [3, 5], "hidden": [6, 12]}
    supernet = tnn.entangle(model, choices, {
        "0.out_channels": "c", "1.num_features": "c", "3.in_channels": "c",
        "[03].kernel_size": "k", "7.out_features": "hidden", "9.in_features": "hidden",
    })
    x = torch.randn(4, 3, 8, 8, **F64)
    names = list(choices)
    sizes = [len(choices[n]) for n in names]
    alpha0 = torch.randn(sum(sizes), **F64) * 0.5
    v = torch.randn(sum(sizes), **F64)

    def grad_alpha(alpha, create_graph):
        parts = torch.split(alpha, sizes)
        tnn.set_arch(supernet, {n: p.softmax(0) for n, p in zip(names, parts)})
        loss = supernet(x).logsumexp(-1).mean()
        (g,) = torch.autograd.grad(loss, alpha, create_graph=create_graph)
        return g

    types = {type(m).__name__ for m in supernet.modules()}
    assert {"EntangledConv2d", "EntangledLinear", "EntangledBatchNorm2d"} <= types
    alpha = alpha0.clone().requires_grad_()
    g = grad_alpha(alpha, True)
    (hv,) = torch.autograd.grad(g @ v, alpha)
    eps = 1e-5
    fd = (grad_alpha((alpha0 + eps * v).requires_grad_(), False)
          - grad_alpha((alpha0 - eps * v).requires_grad_(), False)) / (2 * eps)
    torch.testing.assert_close(hv, fd, rtol=1e-5, atol=1e-8)


def test_fused_linear_second_derivative_equals_the_composition():
    """The fused Triton node (float32: the interpreter's GEMM): the second derivative of a loss in (x, W, mix) equals the composition's."""
    if backends.why_unavailable("linear", "triton", torch.device("cpu")) is not None:
        pytest.skip(backends.why_unavailable("linear", "triton", torch.device("cpu")))
    lay = tk.Layout.prefix((6, 5), [[3, 6], [2, 5]])
    torch.manual_seed(3)
    x0, w0 = torch.randn(4, 5), torch.randn(lay.shape)
    m0 = torch.rand(lay.K)

    def second(fn):
        x, w, m = (t.clone().requires_grad_() for t in (x0, w0, m0))
        gx, gw, gm = torch.autograd.grad((fn(x, w, m) ** 2).sum(), (x, w, m), create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum() + gm.square().sum(), (x, w, m))

    got = second(lambda x, w, m: tk.entangled_linear(x, w, None, m, lay, backend="triton"))
    want = second(lambda x, w, m: torch.nn.functional.linear(x, superpose_reference(w, m, lay)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

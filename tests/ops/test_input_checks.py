"""Bad inputs get one clear error naming the argument (issue 24): a backend that is not a
string, layout bounds that are not integers (2.7 used to be floored silently), and
torch.func transforms through the kernels (a raw data-pointer error before)."""

from __future__ import annotations

import pytest
import torch

import tangle_kernels as tk
from tangle_kernels import backends
from tangle_kernels.backends.reference import superpose_reference

KERNEL_BACKENDS = [b for b in backends.backends_of("superpose") if b != "reference"
                   and backends.why_unavailable("superpose", b, torch.device("cpu")) is None]
LAY = tk.Layout.prefix((4, 3), [[2, 4], [1, 3]])


@pytest.mark.parametrize("bad", [1, 2.5, ["cpu"], b"cpu"])
def test_backend_must_be_a_string(bad):
    w, m = torch.randn(LAY.shape), torch.rand(LAY.K)
    x = torch.randn(2, 3)
    calls = [
        lambda: tk.superpose(w, m, LAY, backend=bad),
        lambda: tk.entangled_linear(x, w, None, m, LAY, backend=bad),
        lambda: tk.entangled_conv2d(torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1), None,
                                    torch.rand(1), tk.Layout.prefix((2, 2, 1, 1), [[2], None, None, None]),
                                    backend=bad),
        lambda: backends.resolve("superpose", bad, w.device),
        lambda: backends.why_unavailable("superpose", bad, w.device),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"backend: expected a str"):
            call()


def test_registry_names_are_checked():
    with pytest.raises(ValueError, match="unknown op"):
        backends.resolve("nope", None, torch.device("cpu"))
    assert "unknown backend" in backends.why_unavailable("superpose", "nope", torch.device("cpu"))
    assert "no 'cuda' kernel for layernorm" in backends.why_unavailable("layernorm", "cuda", torch.device("cuda"))
    with pytest.raises(RuntimeError, match="backend='nope' cannot run: unknown backend"):
        tk.superpose(torch.randn(LAY.shape), torch.rand(LAY.K), LAY, backend="nope")


@pytest.mark.parametrize("build", [
    lambda: tk.Layout((4, 4), [[(0, 2.7), (0, 4)]]),
    lambda: tk.Layout((4, 4), [[(0.5, 2), (0, 4)]]),
    lambda: tk.Layout((4.5, 4), [[(0, 2), (0, 4)]]),
    lambda: tk.Layout((4, 4), [[(0, True), (0, 4)]]),
    lambda: tk.Layout((4, 4), [[(0, "2"), (0, 4)]]),
    lambda: tk.Layout.prefix((4, 4), [[2.7, 4], None]),
    lambda: tk.Layout.centered((4, 5, 5), [3.5, 5], dims=(1, 2)),
    lambda: tk.Layout.conv((4, 4, 5, 5), [2.2, 4], None, [3, 5]),
])
def test_layout_bounds_must_be_integers(build):
    with pytest.raises(TypeError, match="expected an integer"):
        build()


def test_layout_accepts_integer_like_values():
    import numpy as np

    a = tk.Layout((4, 4), [[(0, np.int64(2)), (0, 4)], [(0, torch.tensor(4)), (0, 4.0)]])
    b = tk.Layout((4, 4), [[(0, 2), (0, 4)], [(0, 4), (0, 4)]])
    assert a == b


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_func_transforms_are_refused(backend):
    w = torch.randn(LAY.shape)
    ms = torch.rand(3, LAY.K)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.vmap(lambda m: tk.superpose(w, m, LAY, backend=backend))(ms)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.grad(lambda m: tk.superpose(w, m, LAY, backend=backend).sum())(ms[0])
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.grad(lambda w: tk.entangled_linear(x, w, None, ms[0], LAY, backend=backend).sum())(w)


def test_torch_func_runs_with_the_reference_backend():
    w = torch.randn(LAY.shape)
    ms = torch.rand(3, LAY.K)
    got = torch.func.vmap(lambda m: tk.superpose(w, m, LAY, backend="reference"))(ms)
    want = torch.stack([superpose_reference(w, m, LAY) for m in ms])
    torch.testing.assert_close(got, want)
    g = torch.func.grad(lambda m: tk.superpose(w, m, LAY, backend="reference").square().sum())(ms[0])
    m0 = ms[0].clone().requires_grad_()
    (want_g,) = torch.autograd.grad(superpose_reference(w, m0, LAY).square().sum(), m0)
    torch.testing.assert_close(g, want_g)


def test_torch_func_refused_by_the_fused_cpu_nodes():
    from tangle_kernels.ops.attention import fused_attention, fused_attention_available
    from tangle_kernels.ops.head_partition import PartitionPlan, partition_attention
    from tangle_kernels.ops.mixed_layernorm import fused_available, mixed_layer_norm

    x = torch.randn(2, 6)
    if fused_available(x):
        with pytest.raises(RuntimeError, match="torch.func transforms"):
            torch.func.grad(lambda x: mixed_layer_norm(x, None, None, torch.rand(2), (3, 6), 1e-5).sum())(x)
    if fused_attention_available() is None:
        q = torch.randn(1, 1, 3, 2)
        with pytest.raises(RuntimeError, match="torch.func transforms"):
            torch.func.grad(lambda q: fused_attention(q, q, q, dropout_p=0.1, seed=1).sum())(q)
    if backends.why_unavailable("head_partition", "cpu", x.device) is None:
        plan = PartitionPlan(4, [2, 4], [1, 2])
        qkv = torch.randn(1, 3, 12)
        with pytest.raises(RuntimeError, match="torch.func transforms"):
            torch.func.grad(lambda q: partition_attention(q, torch.rand(2), torch.rand(2), plan).sum())(qkv)

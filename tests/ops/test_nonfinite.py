"""Non-finite values (issue 24): on every backend, superpose and the layer ops behave as
the padded sum does. ``d mix_k`` depends only on the cells inside candidate k (a NaN or
inf weight in one candidate's region never reaches another candidate's gradient), the
cells no candidate covers are 0 in W_mix whatever the weight holds there, and a NaN
``mix_k`` makes all of W_mix NaN but only candidate k's box of dW.

Backends from the registry: every one that runs CPU tensors here (triton under
``TRITON_INTERPRET=1``), on the eager route and the custom-op (torch.compile) route.
"""

from __future__ import annotations

import pytest
import torch

import tangle_kernels as tk
from tangle_kernels import backends
from tangle_kernels.backends.reference import superpose_reference
from tangle_kernels.ops.superpose import _superpose_custom_op

CPU = torch.device("cpu")
KERNEL_BACKENDS = [b for b in backends.backends_of("superpose") if b != "reference"
                   and backends.why_unavailable("superpose", b, CPU) is None]
NAN, INF = float("nan"), float("inf")


def _grads(fn, w, m, g):
    w, m = w.clone().requires_grad_(), m.clone().requires_grad_()
    out = fn(w, m)
    gw, gm = torch.autograd.grad(out, (w, m), g)
    return out.detach(), gw, gm


def _routes(backend, lay):
    return {
        "eager": lambda w, m: tk.superpose(w, m, lay, backend=backend),
        "custom_op": lambda w, m: _superpose_custom_op(w, m, lay, backend),
    }


def _assert_like_reference(got, ref, what):
    for name, a, b in zip(("W_mix", "dW", "d mix"), got, ref):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what} {name}: NaN pattern differs"
        torch.testing.assert_close(a, b, equal_nan=True, msg=f"{what} {name}")


LAYOUTS = {
    # the largest candidate covers everything
    "prefix": tk.Layout.prefix((6, 5), [[2, 4, 6], [3, 5]]),
    # boxes that leave cells uncovered (rows 4.., columns 3.. of no candidate)
    "uncovered": tk.Layout((6, 5), [[(0, 2), (0, 3)], [(1, 4), (0, 2)], [(0, 4), (1, 3)]]),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bad_weight_reaches_only_its_candidates(backend, bad, name):
    lay = LAYOUTS[name]
    torch.manual_seed(0)
    w = torch.randn(lay.shape, dtype=torch.float64)
    w[-1, -1] = bad  # inside only the largest candidate (prefix) / no candidate (uncovered)
    if name == "uncovered":
        w[5, 4] = bad
    m = torch.rand(lay.K, dtype=torch.float64)
    g = torch.randn(lay.shape, dtype=torch.float64)
    ref = _grads(lambda w, m: superpose_reference(w, m, lay), w, m, g)
    if name == "prefix":
        assert torch.isfinite(ref[2][:-1]).all() and not torch.isfinite(ref[2][-1])
    else:
        assert torch.isfinite(ref[2]).all() and ref[0][5, 4] == 0
    for route, fn in _routes(backend, lay).items():
        _assert_like_reference(_grads(fn, w, m, g), ref, f"{backend} {route} {name} {bad}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_nan_mix_poisons_w_mix_and_only_its_box_of_dw(backend, name):
    lay = LAYOUTS[name]
    torch.manual_seed(1)
    w = torch.randn(lay.shape, dtype=torch.float64)
    g = torch.randn(lay.shape, dtype=torch.float64)
    m = torch.rand(lay.K, dtype=torch.float64)
    m[0] = NAN
    ref = _grads(lambda w, m: superpose_reference(w, m, lay), w, m, g)
    assert torch.isnan(ref[0]).all() and not torch.isnan(ref[1]).all() and torch.isfinite(ref[2]).all()
    for route, fn in _routes(backend, lay).items():
        _assert_like_reference(_grads(fn, w, m, g), ref, f"{backend} {route} {name}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_layer_ops_bad_weight(backend):
    """The layer nodes (entangled_linear's and entangled_conv2d's) give the same d mix
    as their padded-sum composition with a NaN weight in the largest candidate only."""
    lay = tk.Layout.prefix((6, 4), [[3, 6], [2, 4]])
    torch.manual_seed(2)
    dt = torch.float32 if backend == "triton" else torch.float64  # the fused GEMM: float32 here
    x = torch.randn(5, 4, dtype=dt)
    w = torch.randn(lay.shape, dtype=dt)
    w[5, 3] = NAN
    b = torch.randn(6, dtype=dt)
    m = torch.rand(lay.K, dtype=dt)
    from tangle_kernels.ops.entangled_linear import bias_layout

    def ref_lin(x, w, b, m):
        return torch.nn.functional.linear(x, superpose_reference(w, m, lay),
                                          superpose_reference(b, m, bias_layout(lay)))

    def grads(fn):
        ts = [t.clone().requires_grad_() for t in (w, b, m)]
        y = fn(x, *ts)
        return torch.autograd.grad(y.sum(), ts[2])[0]

    ours = grads(lambda x, w, b, m: tk.entangled_linear(x, w, b, m, lay, backend=backend))
    torch.testing.assert_close(ours, grads(ref_lin), equal_nan=True, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(ours[:-1]).all()

    clay = tk.Layout.conv((4, 3, 3, 3), [2, 4], [1, 3], [1, 3])
    cw = torch.randn(clay.shape, dtype=torch.float64)
    cw[3, 2, 0, 0] = INF  # a corner: only the largest kernel, the largest channels
    img = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    cm = torch.rand(clay.K, dtype=torch.float64)

    def conv_grad(fn):
        w_, m_ = cw.clone().requires_grad_(), cm.clone().requires_grad_()
        return torch.autograd.grad(fn(w_, m_).sum(), m_)[0]

    got = conv_grad(lambda w_, m_: tk.entangled_conv2d(img, w_, None, m_, clay, padding=1, backend=backend))
    want = conv_grad(lambda w_, m_: torch.nn.functional.conv2d(img, superpose_reference(w_, m_, clay), padding=1))
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    torch.testing.assert_close(got, want, equal_nan=True)

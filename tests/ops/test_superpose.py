"""superpose: every backend against the padded-sum oracle, forward and backward.

Mirrors tangle_kernels/ops/superpose.py. The Triton backend has its own file
(tests/test_triton_backend.py) because the interpreter is slow.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tol_util import (  # noqa: F401  (gpu_lane, pmode: fixtures of the GPU cases)
    DEV,
    GPU_BACKENDS,
    LAYOUTS,
    assert_superpose_within,
    dmix_scale,
    gpu,
    gpu_backends,
    gpu_check,
    gpu_inputs,
    gpu_lane,
    gpu_oracle,
    gpu_run,
    pmode,
    superpose_bounds,
)

import tangle_kernels as tk
from tangle_kernels import _ext, backends
from tangle_kernels.backends.reference import superpose_masksum, superpose_reference

# The kernel backends that run CPU tensors, from the registry (cpu where built, torch).
CPU_BACKENDS = [b for b in backends.AUTO_ORDER["cpu"] if b in backends.IMPLS["superpose"]
                and backends.why_unavailable("superpose", b, torch.device("cpu")) is None]
# Tolerances: tests/tol_util.py (float64 oracle on the same rounded inputs; bounds from
# the dtype's unit roundoff and the length of each sum).


def oracle_grads(weight, mix, layout, grad):
    w = weight.detach().clone().requires_grad_(True)
    m = mix.detach().clone().requires_grad_(True)
    out = superpose_reference(w, m, layout)
    gw, gm = torch.autograd.grad(out, (w, m), grad)
    return out.detach(), gw, gm


def run_backend(weight, mix, layout, grad, backend):
    w = weight.detach().clone().requires_grad_(True)
    m = mix.detach().clone().requires_grad_(True)
    out = tk.superpose(w, m, layout, backend=backend)
    gw, gm = torch.autograd.grad(out, (w, m), grad)
    return out.detach(), gw, gm


# --------------------------------------------------------------------- layouts
PRIMES_AND_SMALL = st.sampled_from([1, 2, 3, 5, 7, 8, 11, 13, 16])


@st.composite
def layouts(draw, max_rank=4):
    rank = draw(st.integers(1, max_rank))
    shape = tuple(draw(PRIMES_AND_SMALL) for _ in range(rank))
    k = draw(st.integers(1, 6))
    boxes = []
    for _ in range(k):
        box = []
        for size in shape:
            lo = draw(st.integers(0, size - 1))
            hi = draw(st.integers(lo + 1, size))
            box.append((lo, hi))
        boxes.append(box)
    return tk.Layout(shape, boxes)


@settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(), data=st.data())
def test_random_layouts_match_oracle(layout, data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    for dtype in (torch.float64, torch.float32):
        w = torch.randn(layout.shape, generator=g, dtype=dtype)
        mix = torch.randn(layout.K, generator=g, dtype=dtype)
        grad = torch.randn(layout.shape, generator=g, dtype=dtype)
        for backend in CPU_BACKENDS:
            got = run_backend(w, mix, layout, grad, backend)
            assert [t.dtype for t in got] == [dtype] * 3, backend
            # float64 oracle on the same inputs; bound from eps and the sum lengths
            assert_superpose_within(got, w, mix, layout, grad, dtype, f"{backend} {dtype} {layout}")


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize(
    "layout",
    [
        tk.Layout.grid((12, 7), {"e": [2, 4, 7], "r": [1, 2]}, lambda e, r: [(0, min(12, e * r)), (0, e)]),
        tk.Layout.conv((4, 3, 5, 5), [2, 4], [1, 3], [1, 3, 5]),
        tk.Layout.segmented((9, 3), 0, 3, [1, 3], tie=[1]),
        tk.Layout.prefix((7,), [[1, 4, 7]]),
        tk.Layout((1, 1, 1), [((0, 1), (0, 1), (0, 1))]),
    ],
    ids=["grid", "conv", "qkv", "1d", "k1-size1"],
)
def test_gradcheck_float64(backend, layout):
    w = torch.randn(layout.shape, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(layout.K, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, m: tk.superpose(w, m, layout, backend=backend), (w, mix))


def test_masksum_matches_reference():
    lay = tk.Layout.conv((4, 3, 5, 5), [2, 4], [1, 3], [3, 5])
    w = torch.randn(lay.shape, dtype=torch.float64)
    mix = torch.rand(lay.K, dtype=torch.float64)
    torch.testing.assert_close(superpose_masksum(w, mix, lay), superpose_reference(w, mix, lay))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    """Half dtypes: outputs within one rounding of the fp64 oracle on the same rounded
    inputs; d mix (accumulated in float32) within the float32 reduction bound of
    tests/tol_util.py against that oracle (not against PyTorch's bf16/fp16-rounded d mix,
    whose own error, 0.1-0.5 here, would hide dropped products)."""
    lay = tk.Layout.grid((96, 40), {"e": [10, 20, 40], "r": [1, 2]}, lambda e, r: [(0, e * r + 16), (0, e)])
    w64 = torch.randn(lay.shape, dtype=torch.float64)
    mix64 = torch.rand(lay.K, dtype=torch.float64)
    g64 = torch.randn(lay.shape, dtype=torch.float64)
    w, g = w64.to(dtype), g64.to(dtype)
    exact_lp = oracle_grads(w.double(), mix64.float().double(), lay, g.double())
    ours = run_backend(w, mix64.float(), lay, g, backend)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == torch.float32
    eps = torch.finfo(dtype).eps
    for i in (0, 1):  # out, dW: one rounding of the exact product
        err = (ours[i].double() - exact_lp[i]).abs()
        assert (err <= exact_lp[i].abs() * eps + 1e-30).all()
    _, bounds = superpose_bounds(w, mix64.float(), lay, g, torch.float32)
    ours_err = (ours[2].double() - exact_lp[2]).abs()
    assert (ours_err <= bounds[2]).all(), (ours_err.max(), bounds[2].min())
    # the allowance stays well below one dropped product (|g w| ~ 0.64 on average);
    # the old one (2x PyTorch's same-dtype d mix error vs unrounded inputs) was 0.03-1
    assert bounds[2].max() < 0.1, bounds[2]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_and_k1(backend):
    lay = tk.Layout.prefix((6, 9), [[6], [9]])  # K = 1, the full weight
    base = torch.randn(9, 6, dtype=torch.float64)
    w = base.t().requires_grad_(False)  # non-contiguous view
    assert not w.is_contiguous()
    mix = torch.tensor([0.75], dtype=torch.float64)
    out = tk.superpose(w, mix, lay, backend=backend)
    torch.testing.assert_close(out, 0.75 * w)


def test_cpu_backend_deterministic_across_threads():
    if not _ext.has_cpu_ext():
        pytest.skip("C++ extension not built")
    code = (
        "import torch, tangle_kernels as tk\n"
        "lay = tk.Layout.conv((64, 48, 7, 7), [16, 32, 64], [12, 24, 48], [3, 5, 7])\n"
        "g = torch.Generator().manual_seed(1)\n"
        "w = torch.randn(lay.shape, generator=g).requires_grad_(True)\n"
        "m = torch.rand(lay.K, generator=g).requires_grad_(True)\n"
        "G = torch.randn(lay.shape, generator=g)\n"
        "tk.superpose(w, m, lay, backend='cpu').backward(G)\n"
        "print(m.grad.double().numpy().tobytes().hex())\n"
    )
    outs = []
    for n in ("1", "2", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=n)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outs.append(r.stdout.strip())
    assert outs[0] == outs[1] == outs[2]


def test_nan_mix_behaves_like_padded_sum():
    lay = tk.Layout.prefix((4, 4), [[2, 4], None])
    w = torch.randn(4, 4)
    mix = torch.tensor([float("nan"), 1.0])
    ours = tk.superpose(w, mix, lay)
    ref = superpose_reference(w, mix, lay)
    assert torch.isnan(ours).all() and torch.isnan(ref).all()
    neg = torch.tensor([-1.0, 0.5])
    torch.testing.assert_close(tk.superpose(w, neg, lay), superpose_reference(w, neg, lay))


# --------------------------------------------------------------- integration
def test_opcheck():
    lay = tk.Layout.grid((10, 6), {"e": [2, 6], "r": [1, 2]}, lambda e, r: [(0, min(10, 5 * r)), (0, e)])
    tabs = lay.tables("cpu")
    w = torch.randn(lay.shape, requires_grad=True)
    mix = torch.rand(lay.K, requires_grad=True)
    t = lay.cell_values(mix).detach().requires_grad_(True)
    for backend in CPU_BACKENDS:
        args = (w, t, tabs["rowgrp"], tabs["colgrp"], tabs["runs"], backend)
        torch.library.opcheck(torch.ops.tangle.superpose_fwd.default, args)
        g = torch.randn(lay.shape)
        torch.library.opcheck(
            torch.ops.tangle.superpose_bwd.default, (g, w.detach(), t.detach(), *args[2:])
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_route_equals_custom_op_route(backend, dtype):
    """Eager calls skip the custom-op dispatcher (one autograd.Function); torch.compile
    traces the custom ops. Same kernels: W_mix and dW bitwise, d mix to rounding."""
    import importlib

    sp = importlib.import_module("tangle_kernels.ops.superpose")
    lay = tk.Layout.conv((6, 5, 5, 5), [3, 6], [2, 5], [1, 3, 5])
    w0 = torch.randn(lay.shape, dtype=dtype)
    m0 = torch.rand(lay.K, dtype=torch.float32)
    g = torch.randn(lay.shape, dtype=dtype)
    res = []
    for route in (sp.superpose, lambda w, m, lay_, backend: sp._superpose_custom_op(w, m, lay_, backend)):
        w, m = w0.clone().requires_grad_(True), m0.clone().requires_grad_(True)
        out = route(w, m, lay, backend=backend)
        res.append((out.detach(), *torch.autograd.grad(out, (w, m), g)))
    (o1, w1, m1), (o2, w2, m2) = res
    assert torch.equal(o1, o2) and torch.equal(w1, w2)
    assert m1.dtype == m2.dtype == torch.float32
    torch.testing.assert_close(m1, m2, rtol=1e-6, atol=1e-6)
    # no grad needed: the forward alone, same bits
    with torch.no_grad():
        assert torch.equal(sp.superpose(w0, m0, lay, backend=backend), o1)
    # only one of the two inputs needs a gradient
    w = w0.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(sp.superpose(w, m0, lay, backend=backend), w, g)
    assert torch.equal(gw, w1)
    m = m0.clone().requires_grad_(True)
    (gm,) = torch.autograd.grad(sp.superpose(w0, m, lay, backend=backend), m, g)
    assert torch.equal(gm, m1)


def test_double_backward_equals_the_reference():
    """Issue 24: a double backward was refused (once_differentiable); it now runs and
    equals the padded sum's (the second derivative through d W and d mix)."""
    lay = tk.Layout.prefix((4, 4), [[2, 4], None])
    w0 = torch.randn(4, 4, dtype=torch.float64)
    m0 = torch.rand(2, dtype=torch.float64)
    got = []
    for backend in ("reference", *CPU_BACKENDS):
        w, m = w0.clone().requires_grad_(), m0.clone().requires_grad_()
        (gw,) = torch.autograd.grad(tk.superpose(w, m, lay, backend=backend).square().sum(), w,
                                    create_graph=True)
        gw.sum().backward()
        got.append((w.grad, m.grad))
    for gw2, gm2 in got[1:]:
        torch.testing.assert_close(gw2, got[0][0])
        torch.testing.assert_close(gm2, got[0][1])


def test_torch_compile_fullgraph():
    lay = tk.Layout.grid((12, 8), {"e": [4, 8], "r": [1, 2, 3]}, lambda e, r: [(0, 4 * r), (0, e)])
    w = torch.randn(lay.shape, requires_grad=True)
    alpha = torch.randn(6, requires_grad=True)

    def f(x, w, alpha):
        mix = torch.softmax(alpha, 0)
        return (x @ tk.superpose(w, mix, lay).t()).square().sum()

    x = torch.randn(5, 8)
    cf = torch.compile(f, fullgraph=True, backend="inductor")
    got = cf(x, w, alpha)
    gw, ga = torch.autograd.grad(got, (w, alpha))
    ref_out = (x @ superpose_reference(w, torch.softmax(alpha, 0), lay).t()).square().sum()
    rw, ra = torch.autograd.grad(ref_out, (w, alpha))
    torch.testing.assert_close(got, ref_out)
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(ga, ra)


def test_autocast_cpu():
    lay = tk.Layout.prefix((16, 8), [[8, 16], [4, 8]])
    w = torch.randn(lay.shape, requires_grad=True)
    alpha = torch.zeros(lay.K, requires_grad=True)
    x = torch.randn(3, 8)
    alpha0 = torch.randn(lay.K)
    with torch.no_grad():
        alpha.copy_(alpha0)
    dy = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wm = tk.superpose(w, torch.softmax(alpha, 0), lay)
        y = torch.nn.functional.linear(x, wm)
    assert wm.dtype == torch.float32 and y.dtype == torch.bfloat16
    (y.float() * dy).sum().backward()
    assert w.grad is not None and alpha.grad is not None and torch.isfinite(alpha.grad).all()
    # the same computation with the padded-sum oracle under the same autocast: superpose
    # is not autocast (float32 W_mix, same values), the linear after it is (bf16)
    wr = w.detach().clone().requires_grad_(True)
    ar = alpha0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wm_ref = superpose_reference(wr, torch.softmax(ar, 0), lay)
        y_ref = torch.nn.functional.linear(x, wm_ref)
    (y_ref.float() * dy).sum().backward()
    torch.testing.assert_close(wm, wm_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(y, y_ref)  # same float32 W_mix values -> same bf16 GEMM
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alpha.grad, ar.grad, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------- errors
def test_bad_inputs_name_the_argument():
    lay = tk.Layout.prefix((4, 4), [[2, 4], None])
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="mix: expected a vector of length K=2"):
        tk.superpose(w, torch.rand(3), lay)
    with pytest.raises(ValueError, match="mix: is on meta"):
        tk.superpose(w, torch.rand(2, device="meta"), lay)
    with pytest.raises(ValueError, match="weight: shape"):
        tk.superpose(torch.randn(5, 4), torch.rand(2), lay)
    with pytest.raises(TypeError, match="mix: must be a floating"):
        tk.superpose(w, torch.tensor([1, 0]), lay)
    with pytest.raises(TypeError, match="weight: dtype"):
        tk.superpose(w.long(), torch.rand(2), lay)
    with pytest.raises(TypeError, match="layout:"):
        tk.superpose(w, torch.rand(2), "not a layout")
    with pytest.raises(ValueError, match=r"boxes\[0\]\[1\]: lo=3 >= hi=3"):
        tk.Layout((4, 4), [[(0, 2), (3, 3)]])
    with pytest.raises(ValueError, match="outside dimension 0"):
        tk.Layout((4, 4), [[(0, 5), (0, 4)]])
    with pytest.raises(ValueError, match="empty candidate list"):
        tk.Layout((4, 4), [])
    with pytest.raises(ValueError, match="has 1 ranges but the weight has rank 2"):
        tk.Layout((4, 4), [[(0, 2)]])
    with pytest.raises(ValueError, match="rank must be 1 to 4"):
        tk.Layout((2, 2, 2, 2, 2), [[(0, 1)] * 5])
    with pytest.raises(ValueError, match="kernel size=4 cannot be centred"):
        tk.Layout.conv((4, 4, 7, 7), kernel_sizes=[3, 4])
    with pytest.raises(ValueError, match="kernel size=9 must be in"):
        tk.Layout.conv((4, 4, 7, 7), kernel_sizes=[9])
    with pytest.raises(ValueError, match="overlapping boxes"):
        tk.Layout((4,), [[(0, 2)], [(1, 3)]], owners=[0, 0])


def test_backend_selection(monkeypatch):
    lay = tk.Layout.prefix((4, 4), [[2, 4], None])
    w, mix = torch.randn(4, 4), torch.rand(2)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        tk.superpose(w, mix, lay, backend="cuda")
    with pytest.raises(RuntimeError, match="unknown backend"):
        tk.superpose(w, mix, lay, backend="nope")
    monkeypatch.setenv("TANGLE_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="TANGLE_KERNELS_BACKEND='cuda' cannot run"):
        tk.superpose(w, mix, lay)
    monkeypatch.setenv("TANGLE_KERNELS_BACKEND", "torch")
    from tangle_kernels import backends

    assert backends.resolve("superpose", None, w.device) == "torch"
    monkeypatch.delenv("TANGLE_KERNELS_BACKEND")
    assert backends.resolve("superpose", None, w.device) == ("cpu" if _ext.has_cpu_ext() else "torch")


# ------------------------------------------------------------------- layouts
def test_named_constructors():
    lay = tk.Layout.conv((8, 6, 7, 7), [4, 8], [3, 6], [3, 5, 7])
    assert lay.K == 12 and lay.choice_names == ("out", "in", "kernel")
    assert lay.boxes[0] == ((0, 4), (0, 3), (2, 5), (2, 5))
    qkv = tk.Layout.segmented((12, 4), 0, 3, [2, 4], tie=[1])
    assert qkv.K == 2 and qkv.owners == (0, 0, 0, 1, 1, 1)
    assert qkv.boxes[1] == ((4, 6), (0, 2))
    b = qkv.project([0])
    assert b.shape == (12,) and b.K == 2 and b.boxes[0] == ((0, 2),)
    pre = tk.Layout.prefix((5, 3), [[2, 5], None])
    assert pre.boxes == (((0, 2), (0, 3)), ((0, 5), (0, 3)))
    cen = tk.Layout.centered((2, 7, 7), [3, 7])
    assert cen.boxes[0] == ((0, 2), (2, 5), (2, 5))


def test_grid_order_matches_outer_product():
    from tangle_kernels.nn.arch import candidate_mix

    lay = tk.Layout.grid((12, 4), {"e": [2, 4], "r": [1, 2, 3]}, lambda e, r: [(0, e * r), (0, e)])
    a = {"e": torch.tensor([0.25, 0.75], dtype=torch.float64), "r": torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)}
    mix = candidate_mix(a, lay.choice_names)
    for k, lab in enumerate(lay.labels):
        expect = a["e"][[2, 4].index(lab["e"])] * a["r"][[1, 2, 3].index(lab["r"])]
        assert mix[k] == expect
    # The mask of a prefix layout is the cumulative weight of the candidates covering it.
    M = lay.mask(mix)
    assert M[0, 0] == pytest.approx(1.0) and M[11, 3] == pytest.approx(float(a["e"][1] * a["r"][2]))


# ------------------------------------------------------------------ GPU cases
# (the ``gpu`` mark: skipped without CUDA, run by scripts/gpu_lane.sh)
@pytest.mark.parametrize("pmode", ["deterministic", "atomic"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@gpu
def test_random_layouts_vs_oracle_gpu(dtype, pmode):
    layouts = LAYOUTS if dtype == torch.float32 else LAYOUTS[:20]
    for i, lay in enumerate(layouts):
        w, mix, grad = gpu_inputs(lay, dtype, i)
        exact = gpu_oracle(w, mix, lay, grad)
        scale = dmix_scale(w, lay, grad)
        for backend in gpu_backends():
            got = gpu_run(w, mix, lay, grad, backend)
            gpu_check(got, exact, scale, dtype, f"{backend} {pmode} {dtype} {lay}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@gpu
def test_float64_gpu(backend):
    if backend not in gpu_backends():
        pytest.skip("CUDA extension not built")
    for i, lay in enumerate(LAYOUTS[:10]):
        w, mix, grad = gpu_inputs(lay, torch.float64, i)
        exact = gpu_oracle(w, mix.double(), lay, grad)
        got = gpu_run(w, mix.double(), lay, grad, backend)
        for a, b in zip(got, exact):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


BIG = {
    "gpt2_mlp_3072x768_K9": lambda: tk.Layout.grid(
        (3072, 768), {"embed": [192, 384, 768], "ratio": [2, 3, 4]},
        lambda embed, ratio: [(0, embed * ratio), (0, embed)],
    ),
    "conv_256x256x7x7_K27": lambda: tk.Layout.conv(
        (256, 256, 7, 7), [64, 128, 256], [64, 128, 256], [3, 5, 7]
    ),
}


@pytest.mark.parametrize("pmode", ["deterministic", "atomic"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(BIG))
@gpu
def test_big_shapes_gpu(name, dtype, pmode):
    lay = BIG[name]()
    w, mix, grad = gpu_inputs(lay, dtype, 1)
    exact = gpu_oracle(w, mix, lay, grad)
    scale = dmix_scale(w, lay, grad)
    for backend in gpu_backends():
        got = gpu_run(w, mix, lay, grad, backend)
        gpu_check(got, exact, scale, dtype, f"{backend} {pmode} {dtype} {name}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", list(BIG) + ["odd_97x257x3"])
@gpu
def test_deterministic_mode_bitwise_gpu(backend, name, monkeypatch):
    if backend not in gpu_backends():
        pytest.skip("CUDA extension not built")
    monkeypatch.setenv("TANGLE_DETERMINISTIC", "1")
    lay = BIG[name]() if name in BIG else tk.Layout.prefix((97, 257, 3), [[13, 97], [100, 257], None])
    w, mix, grad = gpu_inputs(lay, torch.float32, 2)
    ref = None
    for _ in range(5):
        got = gpu_run(w, mix, lay, grad, backend)
        if ref is None:
            ref = got
        else:
            for a, b in zip(got, ref):
                assert torch.equal(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@gpu
def test_direct_modes_and_noncontiguous_gpu(backend):
    """Both P modes through the backend module; strided and unaligned inputs."""
    if backend not in gpu_backends():
        pytest.skip("CUDA extension not built")
    from tangle_kernels import backends

    mod = backends.get("superpose", backend)
    lay = tk.Layout.prefix((130, 67), [[30, 130], [17, 40, 67]])
    tabs = lay.tables(DEV)
    mix = torch.rand(lay.K, device=DEV)
    t = lay.cell_values(mix)
    base_w = torch.randn(67, 131, device=DEV)
    base_g = torch.randn(67, 131, device=DEV)
    w = base_w[:, 1:].t()  # non-contiguous and not 16-byte aligned
    g = base_g[:, 1:].t()
    # Expected values from the padded-sum oracle (tests/tol_util.py), not from the
    # tables the kernels read: W_mix, dW = G * M and d mix = B^T P (P through the
    # layout's cell values, which the forward check pins to the padded sum).
    out = mod.forward(w, t, dict(tabs))
    for mode in ("deterministic", "atomic"):
        dw, p = mod.backward(g, w, t, dict(tabs), mode=mode)
        m64 = mix.detach().double().requires_grad_(True)
        (dmix,) = torch.autograd.grad((p.double() * lay.cell_values(m64, torch.float64)).sum(), m64)
        assert_superpose_within((out, dw, dmix), w, mix, lay, g, torch.float32, f"{backend} {mode}")
        # the cells partition the weight: P sums to sum(G * W), whatever the tables say
        total = (g.double() * w.double()).sum()
        torch.testing.assert_close(p.double().sum(), total, rtol=1e-5, atol=1e-3)


@gpu
def test_torch_compile_gpu():
    lay = tk.Layout.grid((96, 64), {"e": [16, 32, 64], "r": [1, 2]}, lambda e, r: [(0, min(96, 48 * r)), (0, e)])
    w = torch.randn(lay.shape, device=DEV, requires_grad=True)
    alpha = torch.randn(lay.K, device=DEV, requires_grad=True)
    x = torch.randn(8, 64, device=DEV)

    def f(x, w, alpha):
        return (x @ tk.superpose(w, torch.softmax(alpha, 0), lay).t()).square().sum()

    cf = torch.compile(f, fullgraph=True)
    got = cf(x, w, alpha)
    gw, ga = torch.autograd.grad(got, (w, alpha))
    ref = (x @ superpose_reference(w, torch.softmax(alpha, 0), lay).t()).square().sum()
    rw, ra = torch.autograd.grad(ref, (w, alpha))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("det", [False, True])
@gpu
def test_cuda_graph_capture_of_a_training_step_gpu(det, monkeypatch):
    """A whole fwd+bwd step (superpose on the cuda/triton backends, the fused linear,
    d mix through softmax) captured in a CUDA graph and replayed on new inputs equals
    the eager step: no host syncs, allocations or stream mix-ups inside the ops (the
    remedy for per-call CPU overhead at small sizes: torch.cuda.graphs or
    torch.compile(mode="reduce-overhead"))."""
    from tangle_kernels.ops.entangled_linear import entangled_linear

    monkeypatch.setenv("TANGLE_DETERMINISTIC", "1" if det else "0")
    torch.manual_seed(0)
    lin = tk.Layout.grid((192, 128), {"e": [64, 128], "r": [1, 2, 3]}, lambda e, r: [(0, 64 * r), (0, e)])
    conv = tk.Layout.conv((32, 16, 5, 5), [16, 32], [8, 16], [3, 5])
    params = {
        "w": torch.randn(lin.shape, device=DEV) * 0.1, "b": torch.randn(192, device=DEV),
        "c": torch.randn(conv.shape, device=DEV), "alpha": torch.randn(lin.K, device=DEV),
        "beta": torch.randn(conv.K, device=DEV),
    }
    for p in params.values():
        p.requires_grad_(True)
    x = torch.randn(64, 128, device=DEV)
    img = torch.randn(2, 16, 8, 8, device=DEV)

    def step(P, x, img, backend):
        y = entangled_linear(x, P["w"], P["b"], torch.softmax(P["alpha"], 0), lin, backend="triton")
        wc = tk.superpose(P["c"], torch.softmax(P["beta"], 0), conv, backend=backend)
        loss = y.square().mean() + F.conv2d(img, wc, padding=2).square().mean()
        loss.backward()
        return loss

    for backend in gpu_backends():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                for p in params.values():
                    p.grad = None
                step(params, x, img, backend)
        torch.cuda.current_stream().wait_stream(s)
        for p in params.values():
            p.grad = None
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            loss = step(params, x, img, backend)
        x.copy_(torch.randn_like(x))
        img.copy_(torch.randn_like(img))
        g.replay()
        torch.cuda.synchronize()
        ref = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        ref_loss = step(ref, x.clone(), img.clone(), backend)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
        for k in params:
            torch.testing.assert_close(params[k].grad, ref[k].grad, rtol=1e-4, atol=1e-5, msg=f"{backend} {k}")
        for p in params.values():
            p.grad = None

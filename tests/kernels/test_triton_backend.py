"""The triton backend of superpose (and the fused entangled linear) against the
padded-sum oracle.

CPU lane: runs under ``TRITON_INTERPRET=1`` (set by tests/conftest.py) on tiny
shapes. GPU lane (``TANGLE_GPU_LANE=1`` with a CUDA device): the same tests run on
the GPU. Mirrors tangle_kernels/backends/triton/superpose.py.
"""

from __future__ import annotations

import importlib.util
import os
import types

import numpy as np
import pytest
import torch
from linear_util import check_compiled_fused_linear, linear_oracle
from tol_util import assert_superpose_within, superpose_bounds

import tangle_kernels as tk
from tangle_kernels import backends
from tangle_kernels.backends.reference import superpose_reference

LANE = os.environ.get("TANGLE_GPU_LANE", "0") not in ("", "0")
DEV = "cuda" if LANE and torch.cuda.is_available() else "cpu"

# Skipped only where triton is not installed at all. Where it is, the backend must be
# usable: a failure to import the kernels (triton_superpose.py, triton_linear.py) is a
# test failure (test_triton_backend_is_available), never a skip.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_why = backends.why_unavailable("superpose", "triton", torch.device(DEV)) if _TRITON_INSTALLED else "not installed"
pytestmark = pytest.mark.skipif(not _TRITON_INSTALLED, reason="triton is not installed")


def test_triton_backend_is_available():
    assert _why is None, f"triton is installed but its backend cannot run on {DEV}: {_why}"
    from tangle_kernels.backends.triton import linear as triton_linear, superpose as triton_superpose  # noqa: F401


def oracle(w, mix, layout, grad):
    wr = w.detach().clone().requires_grad_(True)
    mr = mix.detach().clone().requires_grad_(True)
    out = superpose_reference(wr, mr, layout)
    return (out.detach(), *torch.autograd.grad(out, (wr, mr), grad))


def ours(w, mix, layout, grad, backend="triton"):
    wr = w.detach().clone().requires_grad_(True)
    mr = mix.detach().clone().requires_grad_(True)
    out = tk.superpose(wr, mr, layout, backend=backend)
    return (out.detach(), *torch.autograd.grad(out, (wr, mr), grad))


SIZES = [1, 2, 3, 5, 7, 11, 13, 16, 17]


def random_layouts(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rank = int(rng.integers(1, 5))
        shape = [int(rng.choice(SIZES)) for _ in range(rank)]
        while int(np.prod(shape)) > 2000:
            shape[int(np.argmax(shape))] //= 2
        k = int(rng.integers(1, 7))
        boxes = []
        for _ in range(k):
            box = []
            for s in shape:
                lo = int(rng.integers(0, s))
                box.append((lo, int(rng.integers(lo + 1, s + 1))))
            boxes.append(box)
        out.append(tk.Layout(shape, boxes))
    return out


FIXED = [
    tk.Layout.grid((12, 7), {"e": [2, 4, 7], "r": [1, 2]}, lambda e, r: [(0, min(12, e * r)), (0, e)]),
    tk.Layout.conv((4, 3, 5, 5), [2, 4], [1, 3], [1, 3, 5]),
    tk.Layout.segmented((9, 3), 0, 3, [1, 3], tie=[1]),
    tk.Layout.prefix((7,), [[1, 4, 7]]),
    tk.Layout((1, 1, 1), [((0, 1), (0, 1), (0, 1))]),  # K = 1, size-1 dims
    tk.Layout.prefix((1, 13), [[1], [5, 13]]),
    tk.Layout.conv((3, 2, 7, 7), [3], [2], [3, 5, 7]),  # many column groups
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_and_named_layouts_vs_oracle(dtype):
    layouts = FIXED + random_layouts(24 if dtype == torch.float32 else 8, seed=int(dtype.itemsize))
    g = torch.Generator().manual_seed(0)
    for lay in layouts:
        w = torch.randn(lay.shape, generator=g, dtype=dtype).to(DEV)
        mix = torch.randn(lay.K, generator=g, dtype=dtype).to(DEV)
        grad = torch.randn(lay.shape, generator=g, dtype=dtype).to(DEV)
        got = ours(w, mix, lay, grad)
        assert [t.dtype for t in got] == [dtype] * 3, lay
        # float64 oracle on the same inputs; bounds from eps and the sum lengths
        assert_superpose_within(got, w, mix, lay, grad, dtype, f"{dtype} {lay}")


def test_float16():
    lay = tk.Layout.grid((24, 20), {"e": [5, 10, 20], "r": [1, 2]}, lambda e, r: [(0, min(24, e * r + 4)), (0, e)])
    w = torch.randn(lay.shape, dtype=torch.float64)
    g = torch.randn(lay.shape, dtype=torch.float64)
    mix = torch.rand(lay.K, dtype=torch.float64)
    wh, gh = w.half(), g.half()
    exact = oracle(wh.double(), mix.float().double(), lay, gh.double())
    got = ours(wh.to(DEV), mix.float().to(DEV), lay, gh.to(DEV))
    assert got[0].dtype == torch.float16 and got[2].dtype == torch.float32
    eps = torch.finfo(torch.float16).eps
    for i in (0, 1):  # one rounding of the exact product
        err = (got[i].cpu().double() - exact[i]).abs()
        assert (err <= exact[i].abs() * eps + 1e-30).all()
    _, bounds = superpose_bounds(wh, mix.float(), lay, gh, torch.float32)
    err = (got[2].cpu().double() - exact[2]).abs()
    assert (err <= bounds[2]).all(), (err.max(), bounds[2].min())


@pytest.mark.skipif(DEV != "cpu", reason="interpreter-only refusal (on a CUDA device the kernel runs)")
def test_bfloat16_refused_in_interpreter():
    lay = tk.Layout.prefix((4, 4), [[2, 4], None])
    with pytest.raises(TypeError, match="bfloat16 is not supported under TRITON_INTERPRET"):
        tk.superpose(torch.randn(4, 4, dtype=torch.bfloat16), torch.rand(2), lay, backend="triton")


def test_gradcheck_float64():
    lay = tk.Layout.grid((5, 4), {"e": [2, 4], "r": [1, 2]}, lambda e, r: [(0, min(5, 2 * r + 1)), (0, e)])
    w = torch.randn(lay.shape, dtype=torch.float64, device=DEV, requires_grad=True)
    mix = torch.randn(lay.K, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, m: tk.superpose(w, m, lay, backend="triton"), (w, mix))


def test_both_p_modes_and_noncontiguous():
    from tangle_kernels.backends.pytorch import superpose as torch_backend
    from tangle_kernels.backends.triton import superpose as triton_superpose

    lay = tk.Layout.conv((6, 5, 7, 7), [3, 6], [2, 5], [3, 5, 7])
    tabs = lay.tables(DEV)
    t = lay.cell_values(torch.rand(lay.K, device=DEV))
    w = torch.randn(lay.cols, lay.rows, device=DEV).t()  # non-contiguous [R, C] view
    g = torch.randn(lay.cols, lay.rows, device=DEV).t()
    ref_dw, ref_p = torch_backend.backward(g, w, t, dict(tabs))
    for mode in ("deterministic", "atomic"):
        dw, p = triton_superpose.backward(g, w, t, dict(tabs), mode=mode)
        torch.testing.assert_close(dw, ref_dw)
        torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(triton_superpose.forward(w, t, dict(tabs)), torch_backend.forward(w, t, dict(tabs)))
    with pytest.raises(ValueError, match="mode: expected"):
        triton_superpose.backward(g, w, t, dict(tabs), mode="fast")


ORDERS = ("in order", "reversed", "shuffled")


def set_program_order(monkeypatch, order: str, seed: int = 0) -> None:
    """Make the triton interpreter run a launch's programs in ``order`` ("in order",
    "reversed" or a seeded "shuffled" permutation) instead of always 0, 1, 2, ...: the
    executed i-th program gets program id ``perm[i]`` (all of them run, once each), so
    any legal GPU schedule of independent programs can be replayed on the CPU."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    set_idx = type(builder).set_grid_idx
    perms: dict[int, list[int]] = {}

    def permuted(self, x, y, z):
        nx, ny, nz = self.grid_dim
        n = nx * ny * nz
        perm = perms.get(n)
        if perm is None:
            perm = list(range(n))
            if order == "reversed":
                perm.reverse()
            elif order == "shuffled":
                np.random.default_rng(seed + n).shuffle(perm)
            perms[n] = perm
        x2, r = divmod(perm[(x * ny + y) * nz + z], ny * nz)
        set_idx(self, x2, *divmod(r, nz))

    monkeypatch.setattr(builder, "set_grid_idx", types.MethodType(permuted, builder))


def runs_under_program_orders(monkeypatch, fn):
    """``fn()`` under each program order (interpreter), or 5 times (GPU: the hardware
    picks the order)."""
    if DEV != "cpu":
        return [fn() for _ in range(5)]
    out = []
    for order in ORDERS:
        with monkeypatch.context() as m:
            set_program_order(m, order)
            out.append(fn())
    return out


def test_program_order_patch_reorders_programs(monkeypatch):
    """The order patch really changes the order programs run in (else the determinism
    tests below could not fail on the CPU)."""
    if DEV != "cpu":
        pytest.skip("interpreter program order: CPU lane only (on a CUDA device the GPU orders programs)")
    import triton
    import triton.language as tl

    @triton.jit
    def record(out_ptr, counter_ptr):
        i = tl.atomic_add(counter_ptr, 1)
        tl.store(out_ptr + i, tl.program_id(0))

    seen = {}
    for order in ORDERS:
        with monkeypatch.context() as m:
            set_program_order(m, order)
            out = torch.full((16,), -1, dtype=torch.int32)
            record[(16,)](out, torch.zeros(1, dtype=torch.int32))
            seen[order] = out.tolist()
    assert seen["in order"] == list(range(16))
    assert seen["reversed"] == list(range(15, -1, -1))
    assert sorted(seen["shuffled"]) == list(range(16)) and seen["shuffled"] not in (seen["in order"], seen["reversed"])


def test_dmix_deterministic(monkeypatch):
    """Deterministic mode (per-program partials reduced in a fixed order) is bitwise
    stable whatever order the programs run in; the atomic mode, whose float32 atomic
    adds follow the program order, is allowed to differ, and on the CPU lane it does
    under one of the orders (so the orders really were different schedules)."""
    from tangle_kernels.backends.triton import superpose as triton_superpose

    monkeypatch.setenv("TANGLE_DETERMINISTIC", "1")
    lay = tk.Layout.conv((16, 12, 7, 7), [4, 16], [3, 12], [3, 5, 7])
    w = torch.randn(lay.shape, device=DEV)
    mix = torch.rand(lay.K, device=DEV)
    grad = torch.randn(lay.shape, device=DEV)
    res = runs_under_program_orders(monkeypatch, lambda: ours(w, mix, lay, grad))
    for again in res[1:]:
        for a, b in zip(again, res[0]):
            assert torch.equal(a, b)
    tabs = lay.tables(DEV)
    t = lay.cell_values(mix)
    w2, g2 = w.reshape(lay.rows, lay.cols), grad.reshape(lay.rows, lay.cols)
    for mode in ("deterministic", "atomic"):
        ps = runs_under_program_orders(
            monkeypatch, lambda mode=mode: triton_superpose.backward(g2, w2, t, dict(tabs), mode=mode)[1]
        )
        same = all(torch.equal(p, ps[0]) for p in ps[1:])
        if mode == "deterministic":
            assert same
        else:
            for p in ps[1:]:
                torch.testing.assert_close(p, ps[0], rtol=1e-5, atol=1e-4)
            if DEV == "cpu":
                assert not same, "the atomic P did not change with the program order"


# ------------------------------------------------------------- fused linear
LINEAR_LAYOUTS = [
    tk.Layout.grid((37, 23), {"e": [5, 11, 23], "r": [1, 2]}, lambda e, r: [(0, min(37, e * r + 3)), (0, e)]),
    tk.Layout.segmented((18, 7), 0, 3, [2, 6], tie=[1]),  # q|k|v blocks
    tk.Layout.prefix((1, 1), [[1], [1]]),  # size-1, K = 1
]


def check_fused_linear(x, w, b, mix, dy, lay, what):
    """The fused triton linear's output and its x, W, bias and mix gradients (float32)
    against the float64 padded-sum oracle."""
    from tangle_kernels.ops.entangled_linear import entangled_linear

    ts = [t.clone().requires_grad_(True) for t in (x, w, b, mix)]
    y = entangled_linear(*ts, lay, backend="triton")
    got = (y, *torch.autograd.grad(y, ts, dy))
    y_ref, rs = linear_oracle(x, w, b, mix, lay)
    ref = (y_ref, *torch.autograd.grad(y_ref, rs, dy.double()))
    for name, a, r in zip(("y", "dx", "dW", "dbias", "dmix"), got, ref):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4, msg=f"{name} {what}")


@pytest.mark.parametrize("lay", LINEAR_LAYOUTS, ids=["grid", "qkv", "1x1"])
def test_fused_linear_vs_oracle(lay):
    out_f, in_f = lay.shape
    x = torch.randn(2, 5, in_f, device=DEV)
    w = torch.randn(lay.shape, device=DEV)
    b = torch.randn(out_f, device=DEV)
    mix = torch.randn(lay.K, device=DEV)
    dy = torch.randn(2, 5, out_f, device=DEV)
    check_fused_linear(x, w, b, mix, dy, lay, lay)


def test_fused_linear_runs_aligned_zero_and_nan_mix():
    """The GEMM main loop runs over maximal runs of one mask group and scales the
    partial tile by the run's mask: 16-aligned runs (vector-hint variant), runs whose
    mask is exactly 0 on a tile (skipped), NaN mixes (propagated like the padded-sum),
    a transposed (non-contiguous) weight."""
    from tangle_kernels.ops.entangled_linear import entangled_linear

    lay = tk.Layout.prefix((64, 48), [[32, 64], [16, 32, 48]])
    assert lay.run_alignment == (True, True)
    assert not LINEAR_LAYOUTS[0].run_alignment[0]
    x = torch.randn(3, 48, device=DEV)
    w = torch.randn(lay.shape, device=DEV)
    b = torch.randn(64, device=DEV)
    dy = torch.randn(3, 64, device=DEV)
    onehot = torch.zeros(lay.K, device=DEV)
    onehot[1] = 1.0  # out 32, in 32: rows >= 32 and cols >= 32 masked to exactly 0
    for mix in (torch.randn(lay.K, device=DEV), onehot):
        check_fused_linear(x, w, b, mix, dy, lay, mix)
    # a transposed weight view goes through its strides
    wt = torch.randn(48, 64, device=DEV).t()
    mix = torch.rand(lay.K, device=DEV)
    torch.testing.assert_close(
        entangled_linear(x, wt, None, mix, lay, backend="triton"),
        entangled_linear(x, wt.contiguous(), None, mix, lay, backend="torch"), rtol=1e-4, atol=1e-4,
    )
    nan_mix = mix.clone()
    nan_mix[0] = float("nan")
    y = entangled_linear(x, w, None, nan_mix, lay, backend="triton")
    y_ref = entangled_linear(x, w, None, nan_mix, lay, backend="reference")
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.isnan(y).all()


class _FlatSpy:
    """Stands in for ``_masked_linear_kernel`` (and its autotuned variant): records the
    FLAT constexpr the launcher chose for each launch, then runs the real kernel."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.append(kwargs["FLAT"])
            return launch(*args, **kwargs)

        return run


def spy_flat(monkeypatch):
    from tangle_kernels.backends.triton import linear as TL

    seen: list[bool] = []
    monkeypatch.setattr(TL, "_masked_linear_kernel", _FlatSpy(TL._masked_linear_kernel, seen))
    tuned = TL._tuned
    monkeypatch.setattr(TL, "_tuned", lambda kind: _FlatSpy(tuned(kind), seen) if kind != "dw" else tuned(kind))
    return seen


def padded_sum_matrix(w, mix, lay):
    """W_mix of the padded-sum oracle, float64 (independent of the kernels' tables)."""
    return superpose_reference(w.detach().double(), mix.detach().double(), lay)


@pytest.mark.parametrize("lay", [
    tk.Layout.prefix((128, 128), [[64, 128], [64, 128]]),
    tk.Layout.grid((128, 80), {"e": [64, 80], "r": [1, 2]}, lambda e, r: [(0, 64 * r), (0, e)]),
], ids=["prefix", "grid-tail"])
def test_fused_linear_flat_pipeline_equals_per_run_loop(lay, monkeypatch):
    """Run starts that are multiples of the K tile (64 here: the largest K tile of the
    interpreter, the fixed GPU tiles and the autotune candidates): the launcher takes
    the one main loop over all K tiles (FLAT, the pipeline runs across run boundaries),
    checked by spying on the kernel launches, and it gives the per-run loop's result and
    the padded-sum oracle's, with a partial last tile ("grid-tail": K = 80), a one-hot
    mix (runs masked to exactly 0) and NaN."""
    from tangle_kernels.backends.triton import linear as TL

    ca, ra = lay.run_start_align
    assert ca >= 64 and ra >= 64, lay.run_start_align
    seen = spy_flat(monkeypatch)
    tabs = lay.tables(DEV)
    out_f, in_f = lay.shape
    x = torch.randn(5, in_f, device=DEV)
    w = torch.randn(lay.shape, device=DEV)
    b = torch.randn(out_f, device=DEV)
    dy = torch.randn(5, out_f, device=DEV)
    onehot = torch.zeros(lay.K, device=DEV)
    onehot[0] = 1.0
    for mix in (torch.rand(lay.K, device=DEV), onehot):
        t = lay.cell_values(mix)
        W_mix = padded_sum_matrix(w, mix, lay)
        y_ref = x.double() @ W_mix.t() + b.double()
        seen.clear()
        ys = [TL.linear_forward(x, w, t, tabs, b, aligned=lay.run_alignment[0], start_align=a) for a in (ca, 0)]
        dxs = [TL.linear_backward(dy, x, w, t, dict(tabs), mode="deterministic",
                                  aligned_rows=lay.run_alignment[1], start_align_rows=a)[0] for a in (ra, 0)]
        assert seen == [True, False, True, False], seen  # the FLAT loop really ran, then the per-run one
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dxs[0], dxs[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ys[0].double(), y_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dxs[0].double(), dy.double() @ W_mix, rtol=1e-4, atol=1e-4)
    nan = torch.rand(lay.K, device=DEV)
    nan[-1] = float("nan")
    y = TL.linear_forward(x, w, lay.cell_values(nan), tabs, b, start_align=ca)
    assert torch.isnan(y).all()


def test_fused_linear_p_modes_deterministic_and_no_bias(monkeypatch):
    """dx, dW and P of the fused linear's backward in both P modes against the
    padded-sum oracle (d mix = B^T P against the oracle's d mix; the total of P against
    sum(G * W), which needs no table); the deterministic mode is bitwise stable under
    any program order, the atomic one agrees to rounding."""
    from tangle_kernels.backends.triton import linear as triton_linear
    from tangle_kernels.ops.entangled_linear import entangled_linear

    lay = LINEAR_LAYOUTS[0]
    tabs = lay.tables(DEV)
    x = torch.randn(19, 23, device=DEV)
    w = torch.randn(lay.shape, device=DEV)
    dy = torch.randn(19, 37, device=DEV)
    mix = torch.rand(lay.K, device=DEV)
    t = lay.cell_values(mix)
    res = {m: triton_linear.linear_backward(dy, x, w, t, dict(tabs), mode=m) for m in ("deterministic", "atomic")}
    det = runs_under_program_orders(
        monkeypatch, lambda: triton_linear.linear_backward(dy, x, w, t, dict(tabs), mode="deterministic"))
    for again in det:
        for a, b in zip(again, res["deterministic"]):
            assert torch.equal(a, b)
    W_mix = padded_sum_matrix(w, mix, lay)
    G = dy.double().t() @ x.double()
    m64 = mix.detach().double().requires_grad_(True)
    (dmix_ref,) = torch.autograd.grad((superpose_reference(w.double(), m64, lay) * G).sum(), m64)
    dW_ref = superpose_reference(G, mix.double(), lay)  # linear in its first argument: G * M
    for m, (dx, dw, p) in res.items():
        torch.testing.assert_close(dx.double(), dy.double() @ W_mix, rtol=1e-4, atol=1e-4, msg=m)
        torch.testing.assert_close(dw.double(), dW_ref, rtol=1e-4, atol=1e-4, msg=m)
        m2 = mix.detach().double().requires_grad_(True)
        (dmix,) = torch.autograd.grad((p.double() * lay.cell_values(m2, torch.float64)).sum(), m2)
        torch.testing.assert_close(dmix, dmix_ref, rtol=1e-4, atol=1e-3, msg=m)
        torch.testing.assert_close(p.double().sum(), (G * w.double()).sum(), rtol=1e-4, atol=1e-3, msg=m)
    # no bias, unfused path equals fused path
    mix = torch.rand(lay.K, device=DEV)
    y1 = entangled_linear(x, w, None, mix, lay, backend="triton")
    y2 = entangled_linear(x, w, None, mix, lay, backend="torch")
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(DEV != "cpu", reason="interpreter-only refusal (on a CUDA device the kernel runs)")
def test_fused_linear_refuses_half_in_interpreter():
    from tangle_kernels.ops.entangled_linear import entangled_linear

    lay = tk.Layout.prefix((4, 4), [[2, 4], None])
    x, w = torch.randn(2, 4).half(), torch.randn(4, 4).half()
    with pytest.raises(TypeError, match="fused triton linear cannot run"):
        entangled_linear(x, w, None, torch.rand(2), lay, backend="triton")


def test_fused_linear_opcheck():
    lay = tk.Layout.prefix((6, 5), [[3, 6], [2, 5]])
    tabs = lay.tables(DEV)
    x = torch.randn(4, 5, device=DEV, requires_grad=True)
    w = torch.randn(6, 5, device=DEV, requires_grad=True)
    t = lay.cell_values(torch.rand(lay.K, device=DEV)).detach().requires_grad_(True)
    b = torch.randn(6, device=DEV, requires_grad=True)
    tables = (tabs["rowgrp"], tabs["colgrp"], tabs["runs"], tabs["rowruns"])
    torch.library.opcheck(
        torch.ops.tangle.entangled_linear_fwd.default, (x, w, t, *tables, *lay.run_alignment, b)
    )
    dy = torch.randn(4, 6, device=DEV)
    torch.library.opcheck(
        torch.ops.tangle.entangled_linear_bwd.default,
        (dy, x.detach(), w.detach(), t.detach(), *tables, lay.run_alignment[1]),
    )


def test_fused_linear_torch_compile_fullgraph():
    """Under torch.compile the fused path is the tangle::entangled_linear_* custom ops
    (the eager route is an autograd.Function); both give the same values and grads."""
    check_compiled_fused_linear(tk.Layout.prefix((32, 16), [[16, 32], [8, 16]]), DEV)


def test_fused_linear_automatic_policy(monkeypatch):
    """Automatic choice of entangled_linear: unfused (cuBLAS on the superposed weight)
    by default; with TANGLE_FUSED_LINEAR=1, fused on CUDA when the GEMM runs on tensor
    cores (16-bit, or float32 with TF32 allowed), unfused for IEEE float32 and float64;
    CPU tensors never take the fused path automatically. (A stand-in object with a
    CUDA device: the policy is host-side logic.)"""
    import importlib
    from types import SimpleNamespace

    el = importlib.import_module("tangle_kernels.ops.entangled_linear")
    monkeypatch.delenv("TANGLE_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(el.backends, "why_unavailable", lambda op, name, dev: None)
    monkeypatch.setattr(el.backends, "triton_interpret", lambda: False)
    dev = torch.device("cuda", 0)

    def fused(dtype, tf32):
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            w = SimpleNamespace(device=dev, dtype=dtype)
            return el._use_fused(None, w, w)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev

    monkeypatch.delenv("TANGLE_FUSED_LINEAR", raising=False)
    for dt, tf32 in ((torch.bfloat16, False), (torch.float16, True), (torch.float32, True)):
        assert not fused(dt, tf32)
    monkeypatch.setenv("TANGLE_FUSED_LINEAR", "1")
    assert fused(torch.bfloat16, False) and fused(torch.float16, False)
    assert fused(torch.float32, True)
    assert not fused(torch.float32, False)
    assert not fused(torch.float64, True)
    cpu = torch.zeros(1)
    assert not el._use_fused(None, cpu, cpu)

"""GPU lane: the cuda and triton backends of superpose, and the fused entangled linear,
against the padded-sum oracle on a real CUDA device (run by scripts/gpu_lane.sh).

Every test is marked ``gpu`` and skipped without CUDA (tests/conftest.py). Under
``TANGLE_GPU_LANE=1`` a missing CUDA extension is a failure, not a skip.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from linear_util import check_compiled_fused_linear, linear_oracle
from tol_util import assert_superpose_within

import tangle_kernels as tk
from tangle_kernels import _ext
from tangle_kernels.backends.reference import superpose_reference

pytestmark = pytest.mark.gpu

LANE = os.environ.get("TANGLE_GPU_LANE", "0") not in ("", "0")
DEV = "cuda"
LOW = (torch.float16, torch.bfloat16)


def _backends():
    out = ["triton"]
    if _ext.has_cuda_ext():
        out.append("cuda")
    return out


@pytest.fixture(scope="module", autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if LANE and not _ext.has_cuda_ext():
        pytest.fail(f"GPU lane: the CUDA extension is not built ({_ext._C_ERROR})")
    yield


@pytest.fixture
def pmode(request, monkeypatch):
    """Select the P mode through the public switch (TANGLE_DETERMINISTIC)."""
    monkeypatch.setenv("TANGLE_DETERMINISTIC", "1" if request.param == "deterministic" else "0")
    return request.param


def oracle(weight, mix, layout, grad):
    """Exact (float64) padded-sum output, dW and d mix of the given (rounded) inputs."""
    w = weight.detach().double().requires_grad_(True)
    m = mix.detach().double().requires_grad_(True)
    out = superpose_reference(w, m, layout)
    gw, gm = torch.autograd.grad(out, (w, m), grad.double())
    return out.detach(), gw, gm


def dmix_scale(weight, layout, grad):
    m = torch.ones(layout.K, dtype=torch.float64, device=weight.device, requires_grad=True)
    out = superpose_reference(weight.detach().double().abs(), m, layout)
    (s,) = torch.autograd.grad(out, m, grad.detach().double().abs())
    return s


def run(weight, mix, layout, grad, backend):
    w = weight.detach().clone().requires_grad_(True)
    m = mix.detach().clone().requires_grad_(True)
    out = tk.superpose(w, m, layout, backend=backend)
    gw, gm = torch.autograd.grad(out, (w, m), grad)
    return out.detach(), gw, gm


def check(got, exact, scale, dtype, what):
    out, gw, gm = got
    eo, ew, em = exact
    assert out.dtype == dtype and gw.dtype == dtype, what
    if dtype in LOW:
        # One ulp of the exact value; in the subnormal range (float16 below 6.1e-5)
        # the ulp is the fixed subnormal spacing, not |b| * eps.
        fi = torch.finfo(dtype)
        for name, a, b in (("out", out, eo), ("dW", gw, ew)):
            err = (a.double() - b).abs()
            bad = err > torch.clamp(b.abs() * fi.eps, min=fi.smallest_normal * fi.eps)
            assert not bad.any(), f"{what} {name}: {int(bad.sum())} elements off by > 1 ulp"
        rel = 1e-4
    else:
        torch.testing.assert_close(out.double(), eo, rtol=1e-5, atol=1e-6, msg=what + " out")
        torch.testing.assert_close(gw.double(), ew, rtol=1e-5, atol=1e-6, msg=what + " dW")
        rel = 1e-5
    err = (gm.double() - em).abs()
    tol = rel * scale + 1e-5
    assert (err <= tol).all(), f"{what} dmix: max err {err.max().item():.3g}, tol {tol.min().item():.3g}"


# ------------------------------------------------------------------ layouts
SIZES = [1, 2, 3, 7, 13, 31, 64, 97, 128, 257]


def random_layouts(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rank = int(rng.integers(1, 5))
        shape = [int(rng.choice(SIZES)) for _ in range(rank)]
        while int(np.prod(shape)) > 300_000:
            shape[int(np.argmax(shape))] //= 2
        k = int(rng.integers(1, 10))
        boxes = []
        for _ in range(k):
            box = []
            for s in shape:
                lo = int(rng.integers(0, s))
                hi = int(rng.integers(lo + 1, s + 1))
                box.append((lo, hi))
            boxes.append(box)
        out.append(tk.Layout(shape, boxes))
    return out


LAYOUTS = random_layouts(50)


def inputs(layout, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(layout.shape, generator=g, device=DEV).to(dtype)
    mix = torch.rand(layout.K, generator=g, device=DEV)
    grad = torch.randn(layout.shape, generator=g, device=DEV).to(dtype)
    return w, mix, grad


@pytest.mark.parametrize("pmode", ["deterministic", "atomic"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_layouts_vs_oracle(dtype, pmode):
    layouts = LAYOUTS if dtype == torch.float32 else LAYOUTS[:20]
    for i, lay in enumerate(layouts):
        w, mix, grad = inputs(lay, dtype, i)
        exact = oracle(w, mix, lay, grad)
        scale = dmix_scale(w, lay, grad)
        for backend in _backends():
            got = run(w, mix, lay, grad, backend)
            check(got, exact, scale, dtype, f"{backend} {pmode} {dtype} {lay}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_float64(backend):
    if backend not in _backends():
        pytest.skip("CUDA extension not built")
    for i, lay in enumerate(LAYOUTS[:10]):
        w, mix, grad = inputs(lay, torch.float64, i)
        exact = oracle(w, mix.double(), lay, grad)
        got = run(w, mix.double(), lay, grad, backend)
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
def test_big_shapes(name, dtype, pmode):
    lay = BIG[name]()
    w, mix, grad = inputs(lay, dtype, 1)
    exact = oracle(w, mix, lay, grad)
    scale = dmix_scale(w, lay, grad)
    for backend in _backends():
        got = run(w, mix, lay, grad, backend)
        check(got, exact, scale, dtype, f"{backend} {pmode} {dtype} {name}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", list(BIG) + ["odd_97x257x3"])
def test_deterministic_mode_bitwise(backend, name, monkeypatch):
    if backend not in _backends():
        pytest.skip("CUDA extension not built")
    monkeypatch.setenv("TANGLE_DETERMINISTIC", "1")
    lay = BIG[name]() if name in BIG else tk.Layout.prefix((97, 257, 3), [[13, 97], [100, 257], None])
    w, mix, grad = inputs(lay, torch.float32, 2)
    ref = None
    for _ in range(5):
        got = run(w, mix, lay, grad, backend)
        if ref is None:
            ref = got
        else:
            for a, b in zip(got, ref):
                assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_direct_modes_and_noncontiguous(backend):
    """Both P modes through the backend module; strided and unaligned inputs."""
    if backend not in _backends():
        pytest.skip("CUDA extension not built")
    from tangle_kernels import backends

    mod = backends.get(backend)
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


# -------------------------------------------------------------- fused linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(512, 768, 3072), (77, 130, 333)])
def test_fused_linear_vs_oracle(shape, dtype):
    from tangle_kernels.ops.entangled_linear import bias_layout, entangled_linear

    n, fin, fout = shape
    lay = tk.Layout.grid(
        (fout, fin), {"e": [fin // 4, fin // 2, fin], "r": [1, 2, 4]},
        lambda e, r: [(0, min(fout, e * r)), (0, e)],
    )
    x = torch.randn(n, fin, device=DEV).to(dtype)
    w = (torch.randn(fout, fin, device=DEV) / fin**0.5).to(dtype)
    b = torch.randn(fout, device=DEV).to(dtype)
    mix = torch.softmax(torch.randn(lay.K, device=DEV), 0)
    dy = torch.randn(n, fout, device=DEV).to(dtype)
    y_ref, xs = linear_oracle(x, w, b, mix, lay)
    grads_ref = torch.autograd.grad(y_ref, xs, dy.double())
    ts = [t.detach().clone().requires_grad_(True) for t in (x, w, b, mix)]
    y = entangled_linear(ts[0], ts[1], ts[2], ts[3], lay, backend="triton")
    grads = torch.autograd.grad(y, ts, dy)
    # Plain F.linear on the materialised W_mix in the same dtype: our error must be
    # comparable to PyTorch's own (cuBLAS) error against the float64 oracle.
    ps = [t.detach().clone().requires_grad_(True) for t in (x, w, b, mix)]
    y_pt = F.linear(ps[0], tk.superpose(ps[1], ps[3], lay, backend="torch"),
                    tk.superpose(ps[2], ps[3], bias_layout(lay), backend="torch"))
    grads_pt = torch.autograd.grad(y_pt, ps, dy)
    names = ("y", "dx", "dW", "db", "dmix")
    for name, a, r, p in zip(names, (y, *grads), (y_ref, *grads_ref), (y_pt, *grads_pt)):
        err = (a.double() - r).abs().max().item()
        err_pt = (p.double() - r).abs().max().item()
        scale = r.abs().max().item() + 1e-6
        assert err <= 4 * err_pt + 1e-5 * scale, f"{name} {dtype} {shape}: ours {err:.3g} vs torch {err_pt:.3g}"


# ------------------------------------------------------------ torch.compile
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


def test_torch_compile_fused_linear_gpu():
    check_compiled_fused_linear(tk.Layout.prefix((96, 64), [[48, 96], [32, 64]]), DEV)


# ----------------------------------------------------------- attention, layers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_bucket", [16, 32, 128])
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


@pytest.mark.parametrize("mix_kind", ["soft", "one_hot"])
def test_fused_linear_aligned_runs_gpu(mix_kind):
    """The fused GEMM's 16-aligned run path (tl.multiple_of hints) with runs skipped
    where the mask is exactly 0 on a tile, against the float64 oracle."""
    from tangle_kernels.ops.entangled_linear import entangled_linear

    lay = tk.Layout.grid((1536, 384), {"e": [128, 256, 384], "r": [2, 3, 4]},
                         lambda e, r: [(0, e * r), (0, e)])
    assert lay.run_alignment == (True, True)
    x = torch.randn(300, 384, device=DEV)
    w = torch.randn(lay.shape, device=DEV) / 384**0.5
    b = torch.randn(1536, device=DEV)
    mix = torch.softmax(torch.randn(lay.K, device=DEV), 0)
    if mix_kind == "one_hot":
        mix = torch.zeros(lay.K, device=DEV)
        mix[4] = 1.0
    dy = torch.randn(300, 1536, device=DEV)
    y_ref, xs = linear_oracle(x, w, b, mix, lay)
    grads_ref = torch.autograd.grad(y_ref, xs, dy.double())
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # IEEE fp32 dots: tight comparison
    try:
        ts = [t.detach().clone().requires_grad_(True) for t in (x, w, b, mix)]
        y = entangled_linear(*ts, lay, backend="triton")
        grads = torch.autograd.grad(y, ts, dy)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    for name, a, r in zip(("y", "dx", "dW", "db", "dmix"), (y, *grads), (y_ref, *grads_ref)):
        scale = r.abs().max().item() + 1e-6
        assert (a.double() - r).abs().max().item() <= 1e-4 * scale, name


# -------------------------------------------------------------- CUDA graphs
@pytest.mark.parametrize("det", [False, True])
def test_cuda_graph_capture_of_a_training_step(det, monkeypatch):
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

    for backend in _backends():
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

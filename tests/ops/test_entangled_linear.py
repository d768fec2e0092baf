"""entangled_linear (tangle_kernels/ops/entangled_linear.py): its GPU cases (the fused
Triton GEMM on a real CUDA device, against the float64 oracle); the CPU cases are in
tests/nn/test_nn_linear.py and tests/kernels/test_triton_backend.py (interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from linear_util import check_compiled_fused_linear, linear_oracle
from tol_util import DEV, gpu, gpu_lane  # noqa: F401  (gpu_lane: the GPU cases' fixture)

import tangle_kernels as tk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(512, 768, 3072), (77, 130, 333)])
@gpu
def test_fused_linear_vs_oracle_gpu(shape, dtype):
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


@gpu
def test_torch_compile_fused_linear_gpu():
    check_compiled_fused_linear(tk.Layout.prefix((96, 64), [[48, 96], [32, 64]]), DEV)


@pytest.mark.parametrize("mix_kind", ["soft", "one_hot"])
@gpu
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

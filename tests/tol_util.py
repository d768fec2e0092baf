"""Error bounds of the superpose tests (tests/ops/test_superpose.py,
tests/kernels/test_triton_backend.py), and the helpers of their GPU cases.

Every result is compared with the float64 padded-sum oracle evaluated on the SAME
(already rounded) inputs the kernel saw, so the only error left is the kernel's own
rounding. The allowance is derived from the unit roundoff ``u = eps / 2`` of the
dtype the kernel computes in and the length ``n`` of the sum behind each result,
applied to ``S``, the same sum taken over absolute values (oracle(|W|, |mix|, |G|)):

- out and dW (``W * T[cell]``, ``G * T[cell]``): ``T[cell]`` is a sum of at most K
  mixing weights, then one product: ``gamma_{K+1}(u_acc) * S`` (Higham, Thm 3.1 /
  Lemma 3.1, ``gamma_n = n u / (1 - n u)``), plus one rounding of the result to the
  output dtype (``u_out * |exact|``);
- d mix (``sum over box_k of G * W``, accumulated in float32 or wider): a reduction
  of up to ``n = numel`` products. The worst-case ``gamma_n`` is far too loose to see
  dropped terms at these sizes, so the probabilistic bound of Higham & Mary (SIAM J.
  Sci. Comput. 41(5), 2019, Thm 3.1) is used: ``lambda * sqrt(n) * u_acc * S`` with
  ``lambda = 6`` (it holds with probability >= 1 - 2n exp(-lambda^2 / 2) ~ 1 - 2e-4 at
  n = 4000), plus the final rounding ``u_acc * |exact|``.

With unit-scale random data, ``S`` is about ``0.64 n`` per candidate, so a kernel that
drops or doubles even one average product (``|g w| ~ 0.64``) is out of bounds.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import tangle_kernels as tk
from tangle_kernels import _ext, backends
from tangle_kernels.backends.reference import superpose_reference

LAMBDA = 6.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(n: int, u: float) -> float:
    assert n * u < 1
    return n * u / (1 - n * u)


def oracle64(weight, mix, layout, grad):
    """float64 (out, dW, d mix) of the padded-sum on the given (rounded) inputs."""
    w = weight.detach().cpu().double().requires_grad_(True)
    m = mix.detach().cpu().double().requires_grad_(True)
    out = superpose_reference(w, m, layout)
    gw, gm = torch.autograd.grad(out, (w, m), grad.detach().cpu().double())
    return out.detach(), gw, gm


def superpose_bounds(weight, mix, layout, grad, acc_dtype: torch.dtype):
    """(exact, bound) for (out, dW, d mix); ``acc_dtype``: the kernel's compute dtype
    (float32 for float32/16-bit weights, float64 for float64)."""
    exact = oracle64(weight, mix, layout, grad)
    mag = oracle64(weight.abs(), mix.abs(), layout, grad.abs())
    u_acc = unit_roundoff(acc_dtype)
    u_out = unit_roundoff(weight.dtype)
    n = max(1, int(math.prod(layout.shape)))
    bounds = []
    for i, (e, s) in enumerate(zip(exact, mag)):
        if i < 2:
            b = gamma(layout.K + 1, u_acc) * s + u_out * e.abs()
        else:
            b = LAMBDA * math.sqrt(n) * u_acc * s + u_acc * e.abs()
        # the smallest subnormal of the output dtype (an exact 0 vs a flushed tiny value)
        tiny = torch.finfo(weight.dtype if i < 2 else acc_dtype).tiny * torch.finfo(weight.dtype).eps
        bounds.append(b + tiny)
    return exact, bounds


def assert_superpose_within(got, weight, mix, layout, grad, acc_dtype, what=""):
    """``got`` = (out, dW, d mix) of a kernel on these inputs, within the bounds."""
    exact, bounds = superpose_bounds(weight, mix, layout, grad, acc_dtype)
    for name, a, e, b in zip(("out", "dW", "dmix"), got, exact, bounds):
        err = (a.detach().cpu().double() - e).abs()
        bad = err > b
        assert not bad.any(), (
            f"{what} {name}: {int(bad.sum())} of {bad.numel()} beyond the bound; worst err "
            f"{err[bad].max().item():.3g} vs bound {b[bad].min().item():.3g}"
        )


# ------------------------------------------------------------------ GPU lane helpers
# (the GPU cases of the op tests: tests/ops/test_superpose.py, test_entangled_linear.py,
# test_head_partition.py; scripts/gpu_lane.sh runs them with ``-m gpu``)

LANE = os.environ.get("TANGLE_GPU_LANE", "0") not in ("", "0")
DEV = "cuda"
LOW = (torch.float16, torch.bfloat16)
# The GPU kernel backends of superpose, from the registry (the automatic CUDA order
# without the device-agnostic fallback): cuda, triton.
GPU_BACKENDS = tuple(b for b in backends.AUTO_ORDER["cuda"]
                     if b in backends.IMPLS["superpose"] and b != backends.fallback("superpose"))


def gpu_backends() -> list[str]:
    """The GPU backends that can run here (the CUDA one only where it was built)."""
    return [b for b in GPU_BACKENDS if backends.why_unavailable("superpose", b, torch.device(DEV)) is None]


@pytest.fixture
def gpu_lane():
    """Skip without a CUDA device; under the GPU lane a missing CUDA extension fails."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if LANE and not _ext.has_cuda_ext():
        pytest.fail(f"GPU lane: the CUDA extension is not built ({_ext._C_ERROR})")
    yield


def gpu(fn):
    """Mark a test as a GPU case (the ``gpu`` mark, the :func:`gpu_lane` fixture)."""
    return pytest.mark.gpu(pytest.mark.usefixtures("gpu_lane")(fn))


@pytest.fixture
def pmode(request, monkeypatch):
    """Select the P mode through the public switch (TANGLE_DETERMINISTIC)."""
    monkeypatch.setenv("TANGLE_DETERMINISTIC", "1" if request.param == "deterministic" else "0")
    return request.param


SIZES = [1, 2, 3, 7, 13, 31, 64, 97, 128, 257]


def gpu_oracle(weight, mix, layout, grad):
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


def gpu_run(weight, mix, layout, grad, backend):
    w = weight.detach().clone().requires_grad_(True)
    m = mix.detach().clone().requires_grad_(True)
    out = tk.superpose(w, m, layout, backend=backend)
    gw, gm = torch.autograd.grad(out, (w, m), grad)
    return out.detach(), gw, gm


def gpu_check(got, exact, scale, dtype, what):
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


def gpu_inputs(layout, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(layout.shape, generator=g, device=DEV).to(dtype)
    mix = torch.rand(layout.K, generator=g, device=DEV)
    grad = torch.randn(layout.shape, generator=g, device=DEV).to(dtype)
    return w, mix, grad


LAYOUTS = random_layouts(50)

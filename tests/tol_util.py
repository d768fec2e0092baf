"""Error bounds of the superpose tests (tests/test_superpose.py, tests/test_triton_backend.py).

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

import torch

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

"""Shared helpers of the fused-linear tests (tests/kernels/test_triton_backend.py on CPU
under the interpreter or on a GPU, tests/ops/test_entangled_linear.py): the float64
padded-sum oracle and the torch.compile check."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tangle_kernels.backends.reference import superpose_reference
from tangle_kernels.ops.entangled_linear import bias_layout, entangled_linear


def linear_oracle(x, w, b, mix, lay):
    """``F.linear`` on the padded-sum superpositions, in float64, and its leaf inputs."""
    xs = [t.detach().double().requires_grad_(True) for t in (x, w, b, mix)]
    y = F.linear(xs[0], superpose_reference(xs[1], xs[3], lay), superpose_reference(xs[2], xs[3], bias_layout(lay)))
    return y, xs


def check_compiled_fused_linear(lay, device):
    """torch.compile(fullgraph=True) of a function using the fused linear (the
    tangle::entangled_linear_* custom ops) equals its eager run (the autograd.Function
    route), in value and in the W, b and mix gradients."""
    out_f, in_f = lay.shape
    bias_layout(lay)  # built outside the compiled region, as EntangledLinear does
    w = torch.randn(lay.shape, device=device, requires_grad=True)
    b = torch.randn(out_f, device=device, requires_grad=True)
    alpha = torch.randn(lay.K, device=device, requires_grad=True)
    x = torch.randn(8, in_f, device=device)

    def f(x, w, b, alpha):
        return entangled_linear(x, w, b, torch.softmax(alpha, 0), lay, backend="triton").square().sum()

    got = torch.compile(f, fullgraph=True)(x, w, b, alpha)
    g1 = torch.autograd.grad(got, (w, b, alpha))
    ref = f(x, w, b, alpha)
    g2 = torch.autograd.grad(ref, (w, b, alpha))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    for a, r in zip(g1, g2):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-3)

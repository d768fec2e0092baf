"""Shared helpers of the tests/test_nn_*.py files: the padded-sum oracle and the
checks every entangled module goes through (soft arch vs oracle, HardArch vs the
oracle's one-hot value and GDAS gradient pattern)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from tangle_kernels.nn import HardArch

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def place(t: torch.Tensor, shape: Sequence[int], index: Sequence[slice]) -> torch.Tensor:
    """``t`` zero-padded into a tensor of ``shape`` at ``index`` (slices per dim)."""
    pads = []
    for sl, size, n in zip(reversed(list(index)), reversed(list(shape)), reversed(t.shape)):
        lo = sl.start or 0
        pads += [lo, size - lo - n]
    return F.pad(t, pads)


def padded_sum(
    weight: torch.Tensor, terms: Sequence[tuple[torch.Tensor, Sequence]]
) -> torch.Tensor:
    """``sum_k coef_k * pad(weight[index_k])``: the seed code's padded-sum formulation.
    ``terms``: (coef, index) or (coef, [index, ...]) for a candidate owning several boxes."""
    out = torch.zeros_like(weight)
    for coef, idx in terms:
        idxs = idx if isinstance(idx, list) else [idx]
        for ix in idxs:
            out = out + coef * place(weight[tuple(ix)], weight.shape, ix)
    return out


def combos(choices: Mapping[str, Sequence], names: Sequence[str], arch):
    """``(values dict, coefficient)`` for every candidate of ``names`` (product order)."""
    for c in itertools.product(*(range(len(choices[n])) for n in names)):
        coef = None
        for n, i in zip(names, c):
            coef = arch[n][i] if coef is None else coef * arch[n][i]
        yield {n: choices[n][i] for n, i in zip(names, c)}, (1.0 if coef is None else coef)


def rand_arch(choices: Mapping[str, Sequence], dtype=torch.float32) -> dict:
    """Random positive, NOT normalised vectors (leaf tensors requiring grad): a mix that
    sums to 1 would hide a wrong outer product."""
    return {
        n: (torch.rand(len(v), dtype=dtype) + 0.3).requires_grad_(True) for n, v in choices.items()
    }


def onehot(choices: Mapping[str, Sequence], selection: Mapping, dtype=torch.float32):
    """(one-hot leaf vectors requiring grad, their HardArch)."""
    vecs, index = {}, {}
    for n, vals in choices.items():
        i = list(vals).index(selection[n])
        v = torch.zeros(len(vals), dtype=dtype)
        v[i] = 1
        vecs[n], index[n] = v.requires_grad_(True), i
    return vecs, HardArch(vecs, index)


def run(fn: Callable, leaves: Mapping[str, torch.Tensor], gout: torch.Tensor | None = None):
    """``(out, {name: grad})`` of ``fn()`` w.r.t. ``leaves`` (zeros where unused)."""
    out = fn()
    if gout is None:
        g = torch.Generator().manual_seed(1)
        gout = torch.randn(out.shape, generator=g, dtype=out.dtype)
    names = [n for n, t in leaves.items() if t.requires_grad]
    gs = torch.autograd.grad(out, [leaves[n] for n in names], gout, allow_unused=True)
    return out.detach(), {
        n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, gs)
    }


def leaves_of(module, x, arch) -> dict:
    d = {"x": x} if x.is_floating_point() else {}
    d.update({f"p.{n}": p for n, p in module.named_parameters()})
    d.update({f"a.{n}": v for n, v in arch.items()})
    return d


def check_soft(module, x, arch, oracle: Callable, dtype=torch.float32, tol=None):
    """module(x, arch) vs oracle(x, arch), forward and every gradient."""
    tol = tol or TOL[dtype]
    lv = leaves_of(module, x, arch)
    got, ggot = run(lambda: module(x, arch), lv)
    ref, gref = run(lambda: oracle(x, arch), lv)
    torch.testing.assert_close(got, ref, **tol, msg=lambda m: f"forward: {m}")
    for n in gref:
        torch.testing.assert_close(ggot[n], gref[n], **tol, msg=lambda m, n=n: f"grad {n}: {m}")
    return got


def check_hard(module, x, selection, oracle: Callable, dtype=torch.float32, tol=None):
    """HardArch: value = the oracle's under the one-hot arch; x/parameter gradients equal
    the oracle's; arch gradients equal the oracle's at the chosen entries and are zero
    elsewhere (GDAS straight-through). Returns the hard output."""
    tol = tol or TOL[dtype]
    vecs, hard = onehot(module.choices, selection, dtype)
    lv = leaves_of(module, x, vecs)
    got, ggot = run(lambda: module(x, hard), lv)
    ref, gref = run(lambda: oracle(x, vecs), lv)
    torch.testing.assert_close(got, ref, **tol, msg=lambda m: f"hard forward: {m}")
    for n in gref:
        exp = gref[n]
        if n.startswith("a."):
            name = n[2:]
            mask = torch.zeros_like(exp)
            mask[hard.index[name]] = 1
            exp = exp * mask
        torch.testing.assert_close(ggot[n], exp, **tol, msg=lambda m, n=n: f"hard grad {n}: {m}")
    return got

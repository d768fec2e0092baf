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
    elsewhere (GDAS straight-through), except the entries the module's sliced path also
    reaches (``straight_through_entries``: a DepthMixer's shallower depths), which equal
    the oracle's too. Returns the hard output."""
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
            st = getattr(module, "straight_through_entries", None)
            for i in (st(hard).get(name, ()) if st is not None else ()):
                mask[i] = 1
            exp = exp * mask
        torch.testing.assert_close(ggot[n], exp, **tol, msg=lambda m, n=n: f"hard grad {n}: {m}")
    return got


# ---------------------------------------------------------------- whole models (issue 25)
def _call(model, inputs):
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _out(y):
    """The first tensor of a model output (a tensor, a tuple, or a transformers ModelOutput)."""
    if isinstance(y, torch.Tensor):
        return y
    if hasattr(y, "to_tuple"):
        y = y.to_tuple()
    if isinstance(y, (tuple, list)):
        return _out(y[0])
    raise TypeError(f"no tensor in a model output of type {type(y).__name__}")


def _onehot_soft(choices, selection, dtype=torch.float32):
    return {n: torch.tensor([float(v == selection[n]) for v in vals], dtype=dtype) for n, vals in choices.items()}


def assert_no_tangle_classes(model) -> None:
    """The model pickles without any tangle_kernels class (it loads without the library)."""
    import pickle

    blob = pickle.dumps(model)
    assert b"tangle_kernels" not in blob, [
        f"{n}: {type(m).__module__}.{type(m).__name__}"
        for n, m in model.named_modules()
        if type(m).__module__.startswith("tangle_kernels")
    ]


def check_entangled_model(model, choices, dims, inputs, selections, *, fd=True, tol=1e-5, fd_entries=2):
    """The targets of issue 25 on one model (eval mode, no dropout):

    - entangle with the meta data-flow check (``example_inputs``);
    - no arch == the original model (the max choice), exactly up to float rounding;
    - for each selection: extract == the supernet under the one-hot arch (hard path
      and the soft path with a one-hot mix) within ``tol`` in float32; the extracted
      model holds no tangle_kernels class; the max selection's extract == the original;
    - float64: the alpha gradient of a soft arch == central finite differences.
    Returns the supernet."""
    import tangle_kernels.nn as tnn

    model = model.eval()
    with torch.no_grad():
        ref = _out(_call(model, inputs))
    sup = tnn.entangle(model, choices, dims, example_inputs=inputs).eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(_call(sup, inputs)), ref, rtol=tol, atol=tol)
    full = {n: max(v) for n, v in choices.items()}
    for sel in [*selections, full]:
        child = tnn.extract(sup, sel).eval()
        assert not any(isinstance(m, tnn.EntangledModule) for m in child.modules())
        assert_no_tangle_classes(child)
        with torch.no_grad():
            want = _out(_call(child, inputs))
            tnn.set_arch(sup, tnn.one_hot_arch(choices, sel))
            got = _out(_call(sup, inputs))
            torch.testing.assert_close(got, _padded(want, got.shape), rtol=tol, atol=tol)
            tnn.set_arch(sup, _onehot_soft(choices, sel))
            got = _out(_call(sup, inputs))
            torch.testing.assert_close(got, _padded(want, got.shape), rtol=tol, atol=tol)
        if sel == full:
            torch.testing.assert_close(want, ref, rtol=tol, atol=tol)
    tnn.set_arch(sup, None)
    if fd:
        check_alpha_fd(sup, choices, inputs, entries=fd_entries)
    return sup


def _padded(t, shape):
    """``t`` zero-padded at the end of every dimension to ``shape`` (a supernet's
    output is the sub-network's, zero-padded to the max width)."""
    return place(t, shape, [slice(0, n) for n in t.shape]) if tuple(t.shape) != tuple(shape) else t


def check_alpha_fd(sup, choices, inputs, *, entries=2, eps=1e-6):
    """float64: d loss / d alpha of a softmax arch == central finite differences (the
    first ``entries`` entries of every choice)."""
    import copy

    import tangle_kernels.nn as tnn

    net = copy.deepcopy(sup).double().eval()
    x = tuple(_dbl(v) for v in inputs) if isinstance(inputs, tuple) else (
        {k: _dbl(v) for k, v in inputs.items()} if isinstance(inputs, dict) else _dbl(inputs))
    g = torch.Generator().manual_seed(3)
    alpha = {n: torch.randn(len(v), dtype=torch.float64, generator=g).requires_grad_(True) for n, v in choices.items()}

    def loss(al):
        tnn.set_arch(net, {n: a.softmax(0) for n, a in al.items()})
        y = _out(_call(net, x))
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        return (y * w).sum()

    loss(alpha).backward()
    for n, a in alpha.items():
        for i in range(min(entries, a.numel())):
            with torch.no_grad():
                ap = {k: v.detach().clone() for k, v in alpha.items()}
                am = {k: v.detach().clone() for k, v in alpha.items()}
                ap[n][i] += eps
                am[n][i] -= eps
                fd = (loss(ap) - loss(am)) / (2 * eps)
            torch.testing.assert_close(
                a.grad[i], fd, rtol=1e-5, atol=1e-7, msg=lambda m, n=n, i=i: f"alpha[{n!r}][{i}]: {m}"
            )
    tnn.set_arch(net, None)


def _dbl(v):
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

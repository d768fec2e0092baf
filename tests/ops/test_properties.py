"""Property-based tests (hypothesis) over superpose and the layer ops (issue 24): random
layouts, dtypes, values (non-finite ones included) and malformed inputs give either a
clear error naming the argument, or the padded-sum reference's result (the NaN pattern
included). Backends from the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tangle_kernels as tk
from tangle_kernels import backends
from tangle_kernels.backends.reference import superpose_reference
from tangle_kernels.ops.entangled_linear import bias_layout

CPU = torch.device("cpu")
BACKENDS = [b for b in backends.backends_of("superpose")
            if backends.why_unavailable("superpose", b, CPU) is None]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECIAL = st.sampled_from([float("nan"), float("inf"), -float("inf")])


@st.composite
def layouts(draw, max_rank=3):
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=max_rank))
    boxes = []
    for _ in range(draw(st.integers(1, 4))):
        box = []
        for s in shape:
            lo = draw(st.integers(0, s - 1))
            box.append((lo, draw(st.integers(lo + 1, s))))
        boxes.append(box)
    return tk.Layout(shape, boxes)


def _with_specials(draw, t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    flat = t.view(-1)
    for _ in range(draw(st.integers(0, 2))):
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(SPECIAL)
    return t


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def _same(a, b, dtype, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN pattern"
    torch.testing.assert_close(a, b, equal_nan=True, msg=what, **_tol(dtype))


@SETTINGS
@given(lay=layouts(), data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]),
       backend=st.sampled_from(BACKENDS))
def test_superpose_equals_the_reference(lay, data, dtype, backend):
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = _with_specials(data.draw, torch.randn(lay.shape, generator=g, dtype=dtype))
    m = torch.rand(lay.K, generator=g, dtype=dtype)
    if data.draw(st.booleans()):
        m = _with_specials(data.draw, m)
    grad = torch.randn(lay.shape, generator=g, dtype=dtype)
    got, want = [], []
    for fn, out in ((lambda w, m: tk.superpose(w, m, lay, backend=backend), got),
                    (lambda w, m: superpose_reference(w, m, lay), want)):
        wr, mr = w.clone().requires_grad_(), m.clone().requires_grad_()
        y = fn(wr, mr)
        out += [y.detach(), *torch.autograd.grad(y, (wr, mr), grad)]
    for name, a, b in zip(("W_mix", "dW", "d mix"), got, want):
        _same(a, b, dtype, f"{backend} {name} {lay}")


@SETTINGS
@given(lay=layouts(max_rank=2), data=st.data(), backend=st.sampled_from(BACKENDS))
def test_entangled_linear_equals_its_composition(lay, data, backend):
    if len(lay.shape) != 2:
        lay = tk.Layout((*lay.shape, 1), [[*b, (0, 1)] for b in lay.boxes], lay.owners)
    fout, fin = lay.shape
    dt = torch.float32 if backend == "triton" else torch.float64  # the fused GEMM: float32 here
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(3, fin, generator=g, dtype=dt)
    w = torch.randn(lay.shape, generator=g, dtype=dt)
    b = torch.randn(fout, generator=g, dtype=dt) if data.draw(st.booleans()) else None
    m = torch.rand(lay.K, generator=g, dtype=dt)
    dy = torch.randn(3, fout, generator=g, dtype=dt)

    def run(fn):
        ts = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, m)]
        y = fn(*ts)
        leaves = [t for t in ts if t is not None]
        return [y.detach(), *torch.autograd.grad(y, leaves, dy)]

    got = run(lambda x, w, b, m: tk.entangled_linear(x, w, b, m, lay, backend=backend))
    want = run(lambda x, w, b, m: F.linear(x, superpose_reference(w, m, lay),
                                           None if b is None else superpose_reference(b, m, bias_layout(lay))))
    for a, r in zip(got, want):
        _same(a, r, dt, f"{backend} {lay}")


BAD_CALLS = {
    "mix length": (lambda w, m, lay: tk.superpose(w, torch.rand(lay.K + 1), lay), ValueError, "mix"),
    "mix 2-D": (lambda w, m, lay: tk.superpose(w, m.view(1, -1), lay), ValueError, "mix"),
    "mix int": (lambda w, m, lay: tk.superpose(w, torch.ones(lay.K, dtype=torch.int64), lay), TypeError, "mix"),
    "mix list": (lambda w, m, lay: tk.superpose(w, m.tolist(), lay), TypeError, "mix"),
    "weight int": (lambda w, m, lay: tk.superpose(w.long(), m, lay), TypeError, "weight"),
    "weight shape": (lambda w, m, lay: tk.superpose(torch.cat([w.reshape(-1), w.reshape(-1)[:1]]), m, lay),
                     ValueError, "weight"),
    "layout": (lambda w, m, lay: tk.superpose(w, m, lay.shape), TypeError, "layout"),
    "backend int": (lambda w, m, lay: tk.superpose(w, m, lay, backend=3), TypeError, "backend"),
    "backend name": (lambda w, m, lay: tk.superpose(w, m, lay, backend="gpu"), RuntimeError, "backend"),
}


@SETTINGS
@given(lay=layouts(), case=st.sampled_from(sorted(BAD_CALLS)))
def test_bad_inputs_give_one_clear_error(lay, case):
    fn, exc, word = BAD_CALLS[case]
    w, m = torch.randn(lay.shape), torch.rand(lay.K)
    with pytest.raises(exc) as info:
        fn(w, m, lay)
    msg = str(info.value)
    assert word in msg and "\n" not in msg.strip(), msg


@SETTINGS
@given(bounds=st.lists(st.one_of(st.floats(0.1, 6.0).filter(lambda v: not float(v).is_integer()),
                                 st.booleans(), st.text(max_size=2)), min_size=1, max_size=2))
def test_non_integer_bounds_are_refused(bounds):
    lo, hi = (0, bounds[0]) if len(bounds) == 1 else bounds
    with pytest.raises(TypeError, match="expected an integer"):
        tk.Layout((6,), [[(lo, hi)]])

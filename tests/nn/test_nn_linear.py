"""EntangledLinear (and the shared protocol: specs, set_arch, HardArch) against the
padded-sum oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nn_util import check_hard, check_soft, combos, padded_sum, rand_arch

import tangle_kernels.nn as tnn

CH = {"in": (3, 5, 8), "out": (2, 4, 7)}


def linear_oracle(m: tnn.EntangledLinear):
    """W_mix = sum_{i,o} a_i b_o pad(W[rows(o), :i]); b_mix = sum_o b_o pad(b[rows(o)])."""
    S, om = m.out_segments, m.out_spec.max

    def rows(o):
        return [slice(s * om, s * om + o) for s in range(S)]

    def fn(x, arch):
        wt, bt = [], []
        for v, c in combos(m.choices, m.weight_names, arch):
            i, o = m.in_spec.size(v), m.out_spec.size(v)
            wt.append((c, [(r, slice(0, i)) for r in rows(o)]))
        w = padded_sum(m.weight, wt)
        b = m.bias
        if b is not None and m.bias_names:
            for v, c in combos(m.choices, m.bias_names, arch):
                bt.append((c, [(r,) for r in rows(m.out_spec.size(v))]))
            b = padded_sum(m.bias, bt)
        return F.linear(x, w, b)

    return fn


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("segments", [1, 3])
def test_soft_and_hard_match_oracle(bias, segments):
    m = tnn.EntangledLinear("in", "out", CH, bias=bias, out_segments=segments)
    x = torch.randn(2, 3, 8, requires_grad=True)
    check_soft(m, x, rand_arch(m.choices), linear_oracle(m))
    for sel in ({"in": 5, "out": 4}, {"in": 8, "out": 7}, {"in": 3, "out": 2}):
        y = check_hard(m, x, sel, linear_oracle(m))
        # extract: the plain layer on the sliced input = the unpadded hard output
        e = m.extract(sel)
        assert type(e).__mro__[1] is torch.nn.Linear
        o = sel["out"]
        ref = y.reshape(2, 3, segments, 7)[..., :o].reshape(2, 3, segments * o)
        torch.testing.assert_close(e(x[..., : sel["in"]]).detach(), ref)


def test_product_spec_and_fixed_dims():
    ch = {"embed": (2, 4), "ratio": (2, 3)}
    m = tnn.EntangledLinear("embed", ("embed", "ratio"), ch)  # GPT MLP up-projection
    assert m.weight.shape == (12, 4) and m.weight_names == ("embed", "ratio")
    x = torch.randn(5, 4, requires_grad=True)
    check_soft(m, x, rand_arch(ch), linear_oracle(m))
    check_hard(m, x, {"embed": 2, "ratio": 3}, linear_oracle(m))
    m2 = tnn.EntangledLinear(6, "out", CH)  # only the output width is a choice
    x2 = torch.randn(4, 6, requires_grad=True)
    check_soft(m2, x2, rand_arch(m2.choices), linear_oracle(m2))


def test_gradcheck_fp64():
    m = tnn.EntangledLinear("in", "out", CH, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    a = rand_arch(m.choices, torch.float64)

    def fn(x, w, b, ai, ao):
        from tangle_kernels.ops.entangled_linear import entangled_linear
        from tangle_kernels.ops.superpose import superpose

        mix = (ai[:, None] * ao[None, :]).reshape(-1)
        y = entangled_linear(x, w, None, mix, m.weight_layout)
        return y + superpose(b, ao, m.bias_layout)

    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, w, b, a["in"], a["out"]), fast_mode=True)
    # and the module itself, differentiated w.r.t. its input and arch
    assert torch.autograd.gradcheck(
        lambda x, ai, ao: m(x, {"in": ai, "out": ao}), (x, a["in"], a["out"]), fast_mode=True
    )


def test_no_arch_is_plain_layer_and_set_arch():
    m = tnn.EntangledLinear("in", "out", CH)
    x = torch.randn(4, 8)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))
    arch = rand_arch(m.choices)
    want = m(x, arch)
    tnn.set_arch(m, arch)
    assert tnn.get_arch(m) is arch
    torch.testing.assert_close(m(x), want)
    tnn.set_arch(m, None)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))
    # the max-size one-hot equals the plain layer
    a = {"in": torch.tensor([0.0, 0, 1]), "out": torch.tensor([0.0, 0, 1])}
    torch.testing.assert_close(m(x, a), F.linear(x, m.weight, m.bias))


def test_compile_fullgraph():
    m = tnn.EntangledLinear("in", "out", CH, out_segments=3)
    arch = {n: torch.rand(len(v)) for n, v in m.choices.items()}
    x = torch.randn(2, 8)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cm(x, arch), m(x, arch))


def test_from_module_shares_parameters():
    lin = torch.nn.Linear(8, 21)
    m = tnn.EntangledLinear.from_module(
        lin, CH, in_features="in", out_features="out", out_segments=3
    )
    assert m.weight is lin.weight and m.bias is lin.bias
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), lin(x))


@pytest.mark.parametrize(
    "args, match",
    [
        (("in", "nope", CH), "out_features='nope': unknown choice 'nope'"),
        (("in", "out", {"in": (3,), "out": ()}), r"choices\['out'\]: empty"),
        (("in", "out", {"in": (3, 3), "out": (2,)}), "duplicate"),
        ((0, "out", CH), "in_features=0"),
        ((("in", "r"), "out", {**CH, "r": (0.5,)}), "in_features=.*not a positive integer"),
        ((("in", 0.5), "out", CH), "factor 0.5 is neither an int nor a choice name"),
        ((3.5, "out", CH), "in_features=3.5"),
    ],
)
def test_errors(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tnn.EntangledLinear(*args)


def test_from_module_width_above_max():
    with pytest.raises(ValueError, match="in_features='in': width 8 is above the max 6"):
        tnn.EntangledLinear.from_module(torch.nn.Linear(6, 7), CH, in_features="in")
    m = tnn.EntangledLinear("in", "out", CH)
    with pytest.raises(ValueError, match=r"arch\['out'\] must be a vector of length 3"):
        m(torch.randn(2, 8), {"in": torch.ones(3), "out": torch.ones(2)})
    with pytest.raises(KeyError, match="no weights for choice 'out'"):
        m(torch.randn(2, 8), {"in": torch.ones(3)})
    with pytest.raises(ValueError, match=r"selection\['in'\]=4 is not one of"):
        m.extract({"in": 4, "out": 2})


# ---------------------------------------------------------- the unfused eager node
def _lin_case(bias, seed=0, dtype=torch.float64):
    import tangle_kernels as tk

    g = torch.Generator().manual_seed(seed)
    lay = tk.Layout.grid((9, 6), {"e": [2, 4, 6], "r": [3, 9]}, lambda e, r: [(0, r), (0, e)])
    x = torch.randn(2, 3, 6, generator=g, dtype=dtype)
    w = torch.randn(9, 6, generator=g, dtype=dtype)
    b = torch.randn(9, generator=g, dtype=dtype) if bias else None
    mix = torch.rand(lay.K, generator=g, dtype=dtype)
    return lay, x, w, b, mix


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("needs", ["all", "x", "w", "mix", "w+mix", "b"])
def test_unfused_linear_is_one_node_and_matches_the_composition(backend, bias, needs):
    """entangled_linear's unfused eager path (one autograd node: superpose kernels of W
    and b + F.linear) equals F.linear(x, superpose(W), superpose(b)) of the reference
    backend in value and in every gradient that is asked for."""
    from tangle_kernels.ops.entangled_linear import bias_layout, entangled_linear

    if backend == "cpu":
        from tangle_kernels import _ext

        if not _ext.has_cpu_ext():
            pytest.skip("the C++ extension is not built")
    import tangle_kernels as tk

    lay, x, w, b, mix = _lin_case(bias)
    want = {"all": "xwbm", "x": "x", "w": "w", "mix": "m", "w+mix": "wm", "b": "b"}[needs]
    leaves = {"x": x, "w": w, "b": b, "m": mix}
    for k, v in leaves.items():
        if v is not None and k in want:
            v.requires_grad_(True)
    ins = [v for k, v in leaves.items() if v is not None and v.requires_grad]
    y = entangled_linear(x, w, b, mix, lay, backend=backend)
    if not ins:  # "b" without a bias: nothing needs a gradient, no node
        assert y.grad_fn is None
        return
    assert type(y.grad_fn).__name__ == "_UnfusedLinearFnBackward"
    ref = torch.nn.functional.linear(
        x, tk.superpose(w, mix, lay, backend="reference"),
        None if b is None else tk.superpose(b, mix, bias_layout(lay), backend="reference"))
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, ins, dy)
    exp = torch.autograd.grad(ref, ins, dy)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_unfused_linear_gradcheck(backend):
    from tangle_kernels.ops.entangled_linear import entangled_linear

    lay, x, w, b, mix = _lin_case(True)
    for t in (x, w, b, mix):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, m: entangled_linear(x, w, b, m, lay, backend=backend), (x, w, b, mix))


def test_unfused_linear_keeps_the_composition_where_it_must():
    """Under autocast, with the reference backend and without gradients the unfused
    path is the plain composition (no custom node)."""
    from tangle_kernels.ops.entangled_linear import entangled_linear

    lay, x, w, b, mix = _lin_case(True, dtype=torch.float32)
    w.requires_grad_(True)
    assert type(entangled_linear(x, w, b, mix, lay, backend="reference").grad_fn).__name__ != "_UnfusedLinearFnBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = entangled_linear(x, w, b, mix, lay, backend="torch")
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ != "_UnfusedLinearFnBackward"
    with torch.no_grad():
        assert entangled_linear(x, w, b, mix, lay, backend="torch").grad_fn is None

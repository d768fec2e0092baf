"""EntangledConv2d and EntangledBatchNorm2d against the padded-sum oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nn_util import check_hard, check_soft, combos, place, rand_arch

import tangle_kernels.nn as tnn


def ofa_kernels(m: tnn.EntangledConv2d) -> dict:
    """OFA kernel transform, written independently: crop the next larger kernel's
    centre, flatten, multiply by the matrix's transpose."""
    ks = sorted(m.kernel_values, reverse=True)
    out, cur = {ks[0]: m.weight}, m.weight
    for a, b in zip(ks[:-1], ks[1:]):
        lo = (a - b) // 2
        c = cur[:, :, lo : lo + b, lo : lo + b]
        cur = (c.reshape(-1, b * b) @ m.kernel_transform[f"{a}to{b}"].t()).reshape(c.shape)
        out[b] = cur
    return out


def conv_oracle(m: tnn.EntangledConv2d):
    """W_mix = sum_k mix_k pad(W_k[:o, :i/g]) (W_k: centred crop or OFA transform);
    b_mix = sum_o b_o pad(b[:o]); y = conv2d at the max size."""
    kmax = m.kernel_size[0]

    def fn(x, arch):
        kws = ofa_kernels(m) if m.kernel_transform is not None else None
        w = torch.zeros_like(m.weight)
        for v, c in combos(m.choices, m.weight_names, arch):
            i, o, g = m.in_spec.size(v), m.out_spec.size(v), m.groups_spec.size(v)
            k = v[m.kernel_names[0]] if m.kernel_names else kmax
            lo = (kmax - k) // 2
            src = kws[k] if kws is not None else m.weight[:, :, lo : lo + k, lo : lo + k]
            ix = (slice(0, o), slice(0, i // g), slice(lo, lo + k), slice(lo, lo + k))
            w = w + c * place(src[:o, : i // g], m.weight.shape, ix)
        b = m.bias
        if b is not None and m.bias_names:
            b = sum(
                c * place(m.bias[: m.out_spec.size(v)], b.shape, (slice(0, None),))
                for v, c in combos(m.choices, m.bias_names, arch)
            )
        return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)

    return fn


CASES = {
    "channels+kernel, stride 2": (
        dict(in_channels="i", out_channels="o", kernel_size="k", stride=2),
        {"i": (2, 3, 4), "o": (3, 5), "k": (1, 3, 5)},
    ),
    "fixed kernel, dilation 2, no bias": (
        dict(in_channels="i", out_channels="o", kernel_size=3, dilation=2, bias=False),
        {"i": (1, 3), "o": (2, 4)},
    ),
    "depthwise": (
        dict(in_channels="c", out_channels="c", kernel_size="k", groups="c"),
        {"c": (2, 4, 5), "k": (3, 5)},
    ),
    "group width 2": (
        dict(in_channels=("g", 2), out_channels=("g", 3), kernel_size=3, groups="g"),
        {"g": (1, 2, 3)},
    ),
    "ofa transform": (
        dict(in_channels="i", out_channels="o", kernel_size="k", kernel_transform=True),
        {"i": (2, 3), "o": (2, 4), "k": (3, 5, 7)},
    ),
    "ofa kernel only": (
        dict(in_channels=3, out_channels=2, kernel_size="k", stride=2, kernel_transform=True),
        {"k": (3, 7)},
    ),
}


def make(name, dtype=torch.float32):
    kw, ch = CASES[name]
    m = tnn.EntangledConv2d(choices=ch, dtype=dtype, **kw)
    if m.kernel_transform is not None:  # move away from the identity
        with torch.no_grad():
            for p in m.kernel_transform.values():
                p.add_(0.2 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("name", list(CASES))
def test_conv_soft_hard_extract(name):
    m = make(name)
    x = torch.randn(2, m.in_channels, 7, 6, requires_grad=True)
    check_soft(m, x, rand_arch(m.choices), conv_oracle(m))
    vals = (
        [v[0] for v in m.choices.values()],
        [v[-1] for v in m.choices.values()],
        [v[len(v) // 2] for v in m.choices.values()],
    )
    for vv in vals:
        sel = dict(zip(m.choices, vv))
        y = check_hard(m, x, sel, conv_oracle(m))
        e = m.extract(sel)
        assert isinstance(e, torch.nn.Conv2d)
        o = e.out_channels
        assert torch.all(y[:, o:] == 0)
        torch.testing.assert_close(e(x[:, : e.in_channels]).detach(), y[:, :o])


def test_conv_gradcheck_fp64():
    m = make("channels+kernel, stride 2", torch.float64)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    a = rand_arch(m.choices, torch.float64)
    names = list(a)
    assert torch.autograd.gradcheck(
        lambda x, *vs: m(x, dict(zip(names, vs))), (x, *a.values()), fast_mode=True
    )
    mt = make("ofa transform", torch.float64)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    a = rand_arch(mt.choices, torch.float64)
    names = list(a)
    # the transform matrix is differentiated too (functional_call substitutes it)
    assert torch.autograd.gradcheck(
        lambda x, t, *vs: torch.func.functional_call(
            mt, {"kernel_transform.5to3": t}, (x, dict(zip(names, vs)))
        ),
        (x, mt.kernel_transform["5to3"].detach().clone().requires_grad_(True), *a.values()),
        fast_mode=True,
    )


@pytest.mark.parametrize("name", ["channels+kernel, stride 2", "ofa transform", "depthwise"])
def test_conv_compile_fullgraph(name):
    m = make(name)
    arch = {n: torch.rand(len(v)) for n, v in m.choices.items()}
    x = torch.randn(1, m.in_channels, 6, 6)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cm(x, arch), m(x, arch))


def test_conv_no_arch_is_plain_conv():
    m = make("channels+kernel, stride 2")
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, 2, 2))


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            dict(in_channels=4, out_channels=4, kernel_size="k", choices={"k": (3, 4)}),
            "kernel_size='k': kernel size 4 is even",
        ),
        (dict(in_channels=4, out_channels=6, kernel_size=3, groups=4), "4 groups do not divide"),
        (
            dict(in_channels="c", out_channels="c", kernel_size=3, groups=2, choices={"c": (2, 4)}),
            "group width must be the same",
        ),
        (
            dict(in_channels=4, out_channels=4, kernel_size="k", padding=0, choices={"k": (3, 5)}),
            "padding=0: with a kernel-size choice",
        ),
        (
            dict(in_channels="i", out_channels=4, kernel_size=3, choices={"x": (1,)}),
            "in_channels='i': unknown choice 'i'",
        ),
        (
            dict(in_channels=4, out_channels=4, kernel_size=3, kernel_transform=True),
            "kernel_transform=True needs a kernel-size choice",
        ),
    ],
)
def test_conv_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        tnn.EntangledConv2d(**kw)


def test_conv_from_module_errors_and_sharing():
    conv = torch.nn.Conv2d(4, 6, 5, padding=2)
    with pytest.raises(ValueError, match="kernel size 7 is larger than the existing layer's 5x5"):
        tnn.EntangledConv2d.from_module(conv, {"k": (3, 7)}, kernel_size="k")
    with pytest.raises(ValueError, match="out_channels='o': width 8 is above the max 6"):
        tnn.EntangledConv2d.from_module(conv, {"o": (2, 8)}, out_channels="o")
    m = tnn.EntangledConv2d.from_module(conv, {"k": (3, 5)}, kernel_size="k")
    assert m.weight is conv.weight
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(m(x), conv(x))


# ----------------------------------------------------------------------- BatchNorm
def bn_oracle(m: tnn.EntangledBatchNorm2d):
    def fn(x, arch):
        terms = list(combos(m.choices, m.names, arch))
        w = sum(
            c * place(m.weight[: m.spec.size(v)], m.weight.shape, (slice(0, None),))
            for v, c in terms
        )
        b = sum(
            c * place(m.bias[: m.spec.size(v)], m.bias.shape, (slice(0, None),)) for v, c in terms
        )
        return F.batch_norm(
            x, m.running_mean.clone(), m.running_var.clone(), w, b, m.training, 0.0, m.eps
        )

    return fn


@pytest.mark.parametrize("training", [True, False])
def test_bn_soft_hard_extract(training):
    ch = {"c": (2, 3, 5)}
    m = tnn.EntangledBatchNorm2d("c", ch)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2)
    m.train(training)
    x = torch.randn(4, 5, 3, 3, requires_grad=True)
    m.momentum = 0.0  # keep the running stats fixed while comparing
    check_soft(m, x, rand_arch(ch), bn_oracle(m))
    y = check_hard(m, x, {"c": 3}, bn_oracle(m))
    assert torch.all(y[:, 3:] == 0)
    m.momentum = 0.1
    e = m.extract({"c": 3})
    assert isinstance(e, torch.nn.BatchNorm2d) and e.training == training
    torch.testing.assert_close(e(x[:, :3]).detach(), y[:, :3])


def test_bn_running_stats():
    ch = {"c": (2, 4)}
    m = tnn.EntangledBatchNorm2d("c", ch)
    ref = torch.nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3)
    m(x, rand_arch(ch))  # soft: max-width BN updates every channel
    ref(x)
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)
    before = m.running_mean.clone()
    m(x, tnn.one_hot_arch(ch, {"c": 2}))  # hard: only the first 2 channels move
    assert torch.equal(m.running_mean[2:], before[2:])
    assert not torch.equal(m.running_mean[:2], before[:2])
    assert int(m.num_batches_tracked) == 2


def test_bn_compile_and_errors():
    m = tnn.EntangledBatchNorm2d("c", {"c": (2, 4)}).eval()
    arch = {"c": torch.rand(2)}
    x = torch.randn(2, 4, 3, 3)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cm(x, arch), m(x, arch))
    with pytest.raises(ValueError, match="num_features='d': unknown choice 'd'"):
        tnn.EntangledBatchNorm2d("d", {"c": (2, 4)})
    with pytest.raises(ValueError, match="num_features='c': width 4 is above the max 3"):
        tnn.EntangledBatchNorm2d.from_module(
            torch.nn.BatchNorm2d(3), {"c": (2, 4)}, num_features="c"
        )


# ------------------------------------------------------ entangled_conv2d (one node)
def _conv_case(bias_kind, groups, dtype=torch.float64, seed=0):
    import tangle_kernels as tk

    g = torch.Generator().manual_seed(seed)
    cin, cout = 6, 6
    lay = tk.Layout.conv((cout, cin // groups, 5, 5), [2, 4, 6], [cin // groups] if groups > 1 else [2, 6], [3, 5]) \
        if groups == 1 else tk.Layout.grid((cout, 1, 5, 5), {"o": [2, 4, 6], "k": [3, 5]},
                                          lambda o, k: [(0, o), (0, 1), ((5 - k) // 2, (5 + k) // 2), ((5 - k) // 2, (5 + k) // 2)])
    x = torch.randn(2, cin, 7, 8, generator=g, dtype=dtype)
    w = torch.randn(*lay.shape, generator=g, dtype=dtype)
    mix = torch.rand(lay.K, generator=g, dtype=dtype)
    b = bmix = blay = None
    if bias_kind != "none":
        b = torch.randn(cout, generator=g, dtype=dtype)
    if bias_kind == "mixed":
        blay = tk.Layout.prefix((cout,), [[2, 4, 6]])
        bmix = torch.rand(blay.K, generator=g, dtype=dtype)
    return lay, x, w, b, mix, bmix, blay


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("bias_kind", ["none", "fixed", "mixed"])
@pytest.mark.parametrize("groups,stride,dilation", [(1, 1, 1), (1, 2, 1), (6, 1, 2)])
@pytest.mark.parametrize("needs", ["all", "x", "w+mix", "b+bmix"])
def test_entangled_conv2d_matches_the_composition(backend, bias_kind, groups, stride, dilation, needs):
    """One autograd node (W_mix recomputed in backward) == F.conv2d on the reference
    superposes, in value and in every gradient asked for."""
    import tangle_kernels as tk
    from tangle_kernels import _ext

    if backend == "cpu" and not _ext.has_cpu_ext():
        pytest.skip("the C++ extension is not built")
    lay, x, w, b, mix, bmix, blay = _conv_case(bias_kind, groups)
    want = {"all": "xwbmn", "x": "x", "w+mix": "wm", "b+bmix": "bn"}[needs]
    leaves = {"x": x, "w": w, "b": b, "m": mix, "n": bmix}
    for k, v in leaves.items():
        if v is not None and k in want:
            v.requires_grad_(True)
    ins = [v for v in leaves.values() if v is not None and v.requires_grad]
    pad = dilation * 2
    kw = dict(stride=stride, padding=pad, dilation=dilation, groups=groups)
    y = tk.entangled_conv2d(x, w, b, mix, lay, bias_mix=bmix, bias_layout=blay, backend=backend, **kw)
    if not ins:
        assert y.grad_fn is None
        return
    assert type(y.grad_fn).__name__ == "_ConvFnBackward"
    wr = tk.superpose(w, mix, lay, backend="reference")
    br = b if blay is None else tk.superpose(b, bmix, blay, backend="reference")
    ref = torch.nn.functional.conv2d(x, wr, br, stride, pad, dilation, groups)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, ins, dy), torch.autograd.grad(ref, ins, dy)):
        torch.testing.assert_close(a, e)


def test_entangled_conv2d_gradcheck_and_errors():
    import tangle_kernels as tk

    lay, x, w, b, mix, bmix, blay = _conv_case("mixed", 1)
    for t in (x, w, b, mix, bmix):
        t.requires_grad_(True)
    f = lambda x, w, b, m, n: tk.entangled_conv2d(x, w, b, m, lay, bias_mix=n, bias_layout=blay,  # noqa: E731
                                                  padding=2, backend="cpu")
    assert torch.autograd.gradcheck(f, (x, w, b, mix, bmix))
    with pytest.raises(ValueError, match="both or neither"):
        tk.entangled_conv2d(x, w, b, mix, lay, bias_mix=bmix)
    with pytest.raises(ValueError, match="pair of ints"):
        tk.entangled_conv2d(x, w, b, mix, lay, padding="same")
    with pytest.raises(ValueError, match="4-D"):
        tk.entangled_conv2d(x, w[0], b, mix, lay)

"""DepthMixer and OpMixer: weighted sums of activations, against plain oracles."""

from __future__ import annotations

import pytest
import torch
from nn_util import check_hard, check_soft, rand_arch

import tangle_kernels.nn as tnn


class Block(torch.nn.Module):
    """A block built from an entangled layer, taking the arch."""

    def __init__(self, ch):
        super().__init__()
        self.fc = tnn.EntangledLinear(4, "w", ch)
        self.out = tnn.EntangledLinear("w", 4, ch)

    def forward(self, x, arch=None):
        return self.out(torch.tanh(self.fc(x, arch)), arch) + x


def depth_oracle(m: tnn.DepthMixer):
    """sum_i a_i * (blocks[:d_i] applied to x), each depth run separately."""

    def fn(x, arch):
        y = 0
        for i, d in enumerate(m.choices[m.depth]):
            h = x
            for b in list(m.blocks)[:d]:
                h = b(h, arch) if tnn.accepts_arch(b) else b(h)
            y = y + arch[m.depth][i] * h
        return y

    return fn


def test_depth_mixer():
    ch = {"depth": (0, 1, 3)}
    m = tnn.DepthMixer([torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4)], "depth", ch)
    x = torch.randn(3, 4, requires_grad=True)
    check_soft(m, x, rand_arch(ch), depth_oracle(m))
    for d in (0, 1, 3):
        y = check_hard(m, x, {"depth": d}, depth_oracle(m))
        torch.testing.assert_close(tnn.extract(m, {"depth": d})(x).detach(), y)
    torch.testing.assert_close(m(x), depth_oracle(m)(x, {"depth": torch.tensor([0.0, 0, 1])}))
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    arch = {"depth": torch.rand(3)}
    torch.testing.assert_close(cm(x, arch), m(x, arch))


def test_depth_mixer_passes_arch_to_entangled_blocks():
    ch = {"w": (2, 4)}
    m = tnn.DepthMixer([Block(ch), Block(ch)], "n", {"n": (1, 2)})
    full = {"w": (2, 4), "n": (1, 2)}
    x = torch.randn(2, 4, requires_grad=True)
    arch = rand_arch(full)

    def oracle(x, a):
        return depth_oracle(m)(x, a)

    check_soft(m, x, arch, oracle)
    vecs_sel = {"w": 2, "n": 2}
    y = tnn.one_hot_arch(full, vecs_sel)
    e = tnn.extract(m, vecs_sel)
    assert isinstance(e[0].fc, torch.nn.Linear) and e[0].fc.out_features == 2
    torch.testing.assert_close(e(x).detach(), m(x, y).detach())
    with pytest.raises(ValueError, match="depth 3 is not an int in"):
        tnn.DepthMixer([Block(ch)], "n", {"n": (1, 3)})


def op_oracle(m: tnn.OpMixer):
    def fn(x, arch):
        return sum(arch[m.choice][i] * op(x) for i, op in enumerate(m.ops))

    return fn


def test_op_mixer():
    ops = {"lin": torch.nn.Linear(4, 4), "tanh": torch.nn.Tanh(), "id": torch.nn.Identity()}
    m = tnn.OpMixer(ops, "op")
    assert m.choices == {"op": ("lin", "tanh", "id")}
    x = torch.randn(3, 4, requires_grad=True)
    check_soft(m, x, rand_arch(m.choices), op_oracle(m))
    for op in ("lin", "tanh", "id"):
        y = check_hard(m, x, {"op": op}, op_oracle(m))
        torch.testing.assert_close(tnn.extract(m, {"op": op})(x).detach(), y)
    # HardArch runs only the chosen op
    calls = []
    m.ops[0].register_forward_hook(lambda *a: calls.append(1))
    m(x, tnn.one_hot_arch(m.choices, {"op": "tanh"}))
    assert not calls
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    arch = {"op": torch.rand(3)}
    torch.testing.assert_close(cm(x, arch), m(x, arch))
    with pytest.raises(ValueError, match="no arch given"):
        m(x)
    with pytest.raises(ValueError, match=r"choices\['op'\]: 2 values for 3 ops"):
        tnn.OpMixer(list(ops.values()), "op", {"op": (1, 2)})


@pytest.mark.parametrize("chosen", [0, 1, 2])
def test_depth_straight_through_reaches_every_computed_depth(chosen):
    """GDAS's straight-through sample on the sliced path: under a final LayerNorm (scale
    invariant, so the chosen depth's own gradient is ~0) every depth up to the chosen one
    gets the soft path's gradient, deeper ones none; the value is the chosen depth's."""
    from tangle_kernels.nn.arch import HardArch, hard_as_soft

    torch.manual_seed(chosen)
    ch = {"depth": (1, 2, 3)}
    blocks = [torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()) for _ in range(3)]
    m = torch.nn.Sequential()
    mixer = tnn.DepthMixer(blocks, "depth", ch).double()
    ln = torch.nn.LayerNorm(6).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    target = torch.randn(4, 6, dtype=torch.float64)
    alpha = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def sample():
        soft = torch.softmax(alpha, 0)
        hard = torch.nn.functional.one_hot(torch.tensor(chosen), 3).double()
        return HardArch({"depth": hard + (soft - soft.detach())}, {"depth": chosen})

    def loss(arch):
        return ((ln(mixer(x, arch)) - target) ** 2).sum()

    arch = sample()
    w = arch["depth"]
    w.retain_grad()
    loss(arch).backward()
    g_sliced = w.grad.clone()
    # the value: exactly the sub-network of the chosen depth
    h = x
    for b in blocks[: ch["depth"][chosen]]:
        h = b(h)
    torch.testing.assert_close(mixer(x, arch), h, rtol=0, atol=0)
    # the gradient: the soft path's (every depth run) for the depths <= chosen, 0 beyond
    soft_w = w.detach().clone().requires_grad_()
    loss({"depth": soft_w}).backward()
    torch.testing.assert_close(g_sliced[: chosen + 1], soft_w.grad[: chosen + 1], rtol=1e-10, atol=1e-12)
    assert (g_sliced[chosen + 1:] == 0).all()
    if chosen > 0:  # the shallower depths' signal survives the LayerNorm
        assert g_sliced[:chosen].abs().max() > 1e-6 * g_sliced.abs().max().clamp_min(1.0)
    # hard_as_soft with the model keeps exactly those entries: the same alpha gradients
    a1 = torch.autograd.grad(loss(sample()), alpha)[0]
    a2 = torch.autograd.grad(loss(hard_as_soft(sample(), mixer)), alpha)[0]
    torch.testing.assert_close(a1, a2, rtol=1e-10, atol=1e-12)
    del m


def test_depth_hard_without_gradient_runs_the_plain_stack():
    """SPOS / a derived architecture (no gradient on the one-hot): the first d blocks."""
    from tangle_kernels.nn.arch import one_hot_arch

    blocks = [torch.nn.Linear(3, 3) for _ in range(3)]
    mixer = tnn.DepthMixer(blocks, "depth", {"depth": (1, 3)})
    x = torch.randn(2, 3)
    y = mixer(x, one_hot_arch(mixer.choices, {"depth": 1}))
    torch.testing.assert_close(y, blocks[0](x), rtol=0, atol=0)


def test_set_arch_refuses_what_is_not_an_arch():
    """set_arch with a list, a dict of lists or of 2-D tensors: a clear error naming the
    choice (it used to fail later with "'list' object has no attribute 'dim'")."""
    m = tnn.DepthMixer([torch.nn.Linear(3, 3)], "depth", {"depth": (0, 1)})
    with pytest.raises(TypeError, match="expected a mapping"):
        tnn.set_arch(m, [0.5, 0.5])
    with pytest.raises(TypeError, match=r"arch\['depth'\]: expected a 1-D tensor"):
        tnn.set_arch(m, {"depth": [0.5, 0.5]})
    with pytest.raises(ValueError, match=r"arch\['depth'\]: expected a non-empty 1-D"):
        tnn.set_arch(m, {"depth": torch.ones(2, 2)})
    tnn.set_arch(m, {"depth": torch.tensor([0.5, 0.5])})
    tnn.set_arch(m, None)

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

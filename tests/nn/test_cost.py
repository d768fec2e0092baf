"""CostModel: exact parameters and MACs of any architecture, counted from the extracted
plain modules, and their expectation under the architecture distribution, differentiable
in the probabilities."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from tangle_kernels.nn.cost import CostError, CostModel
from tangle_kernels.spaces import make_space
from tangle_kernels.spaces._vision import count_macs, count_params

SPACES = ["nanogpt", "conv-macro", "entangled-cell", "nb201", "darts", "autoformer", "mobilenetv3"]


def _built(name):
    sp = make_space(name) if name == "nanogpt" else make_space(name, preset="tiny")
    data = sp.make_data("synthetic")
    torch.manual_seed(0)
    model = sp.build_supernet(data)
    x, _ = data.batch("val", 2, torch.Generator().manual_seed(0))
    return sp, model, x


@pytest.mark.parametrize("name", SPACES)
def test_exact_costs_equal_the_extracted_model(name):
    sp, model, x = _built(name)
    cm = CostModel(model, sp.choices, example=x)
    rng = random.Random(name)
    sels = [{n: v[0] for n, v in sp.choices.items()}, {n: v[-1] for n, v in sp.choices.items()}]
    sels += [{n: rng.choice(v) for n, v in sp.choices.items()} for _ in range(4)]
    for sel in sels:
        plain = sp.extract(model, sel)
        assert cm.params(sel) == count_params(plain), sel
        if name != "nanogpt":  # the vision spaces' MAC convention: count_macs' hooks
            assert cm.macs(sel) == count_macs(plain, x), sel
            assert cm.macs(sel) == sp.arch_macs(sel), sel
            assert cm.params(sel) == sp.arch_params(sel), sel


def _probs(choices, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.softmax(torch.randn(len(v), generator=g, dtype=dtype), 0) for n, v in choices.items()}


@pytest.mark.parametrize("name,kind", [("nanogpt", "params"), ("nanogpt", "macs"),
                                       ("autoformer", "params"), ("autoformer", "macs"),
                                       ("conv-macro", "macs")])
def test_expected_cost_is_the_enumerated_expectation(name, kind):
    sp, model, x = _built(name)
    cm = CostModel(model, sp.choices, example=x)
    probs = _probs(sp.choices, 1)
    brute = 0.0
    names = list(sp.choices)
    for combo in itertools.product(*[range(len(sp.choices[n])) for n in names]):
        p = math.prod(float(probs[n][i]) for n, i in zip(names, combo))
        brute += p * cm.cost({n: sp.choices[n][i] for n, i in zip(names, combo)}, kind)
    got = cm.expected(probs, kind)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert float(got) == pytest.approx(brute, rel=1e-12)
    # a one-hot distribution gives the architecture's exact cost
    sel = {n: v[-1] for n, v in sp.choices.items()}
    onehot = {n: torch.nn.functional.one_hot(torch.tensor(len(v) - 1), len(v)).double()
              for n, v in sp.choices.items()}
    assert float(cm.expected(onehot, kind)) == cm.cost(sel, kind)


def test_expected_cost_gradient_equals_finite_differences():
    sp, model, x = _built("nanogpt")
    cm = CostModel(model, sp.choices, example=x)
    g = torch.Generator().manual_seed(3)
    logits = {n: torch.randn(len(v), generator=g, dtype=torch.float64, requires_grad=True)
              for n, v in sp.choices.items()}

    def f(*ls):
        return cm.expected({n: torch.softmax(a, 0) for n, a in zip(sp.choices, ls)}, "params")

    assert torch.autograd.gradcheck(f, tuple(logits.values()), eps=1e-6, atol=1e-4, rtol=1e-6)
    # the depth matters: more probability on deeper nets costs more parameters
    base = {n: torch.softmax(a.detach(), 0) for n, a in logits.items()}
    deeper = dict(base, layers=torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    shallow = dict(base, layers=torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert float(cm.expected(deeper)) > float(cm.expected(shallow))


def test_bad_queries_are_refused():
    sp, model, x = _built("nanogpt")
    cm = CostModel(model, sp.choices)
    with pytest.raises(CostError, match="example input"):
        cm.macs({n: v[0] for n, v in sp.choices.items()})
    with pytest.raises(CostError, match="no value for choice"):
        cm.params({"embed": 32})
    with pytest.raises(CostError, match="is not one of"):
        cm.params({**{n: v[0] for n, v in sp.choices.items()}, "embed": 33})
    probs = _probs(sp.choices, 0)
    with pytest.raises(CostError, match="not finite"):
        cm.expected({**probs, "embed": torch.tensor([float("nan"), 0.5, 0.5], dtype=torch.float64)})
    with pytest.raises(CostError, match="length"):
        cm.expected({**probs, "embed": torch.ones(2, dtype=torch.float64)})
    with pytest.raises(CostError, match="'params', 'macs' or 'latency'"):
        cm.expected(probs, "flops")
    with pytest.raises(CostError, match="latency needs a measured table"):
        cm.expected(probs, "latency")
    with pytest.raises(CostError, match="not in the choices given"):
        CostModel(model, {n: v for n, v in sp.choices.items() if n != "heads"})
    lo, hi = cm.bounds()
    assert lo == cm.params({n: v[0] for n, v in sp.choices.items()})
    assert hi == cm.params({n: v[-1] for n, v in sp.choices.items()})

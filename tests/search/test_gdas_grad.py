"""GDAS's architecture gradient (``gdas_grad``): ``sliced`` (the chosen candidate's
sliced forward: only its entry gets a gradient) or ``superposed`` (the same one-hot
values on the superposed path: every candidate's entry gets the gradient of adding a
little of it). The forward value is the same either way."""

from __future__ import annotations

import pytest
import torch

from tangle_kernels.nn import set_arch
from tangle_kernels.search import SearchConfig
from tangle_kernels.search.config import SearchError
from tangle_kernels.search.samplers import make_sampler
from tangle_kernels.spaces import make_space


def _grads(sp, data, model, mode, seed=0):
    s = make_sampler("gdas", sp.choices, total_steps=10, gdas_grad=mode,
                     generator=torch.Generator().manual_seed(seed))
    arch = s.sample(torch.Generator().manual_seed(seed), 0)
    set_arch(model, s.for_arch_step(arch))
    loss = sp.loss(model, data.batch("val", 4, torch.Generator().manual_seed(1)))
    loss.backward(inputs=s.parameters())
    set_arch(model, None)
    return arch, float(loss.detach()), {n: a.grad.clone() for n, a in s.alphas.items()}


def test_superposed_gdas_has_the_same_forward_and_a_gradient_for_every_candidate():
    torch.manual_seed(0)
    sp = make_space("nanogpt", preset="tiny")
    data = sp.make_data("synthetic")
    model = sp.build_supernet(data).double()
    arch, l_sliced, g_sliced = _grads(sp, data, model, "sliced")
    arch2, l_sup, g_sup = _grads(sp, data, model, "superposed")
    assert arch.index == arch2.index
    assert l_sup == pytest.approx(l_sliced, rel=1e-10, abs=1e-12)  # one-hot values: same model
    # the softmax's Jacobian spreads any one entry's gradient to all: compare what the
    # one-hot entries received instead (the gradient w.r.t. the sample, before softmax)
    s = make_sampler("gdas", sp.choices, total_steps=10, gdas_grad="superposed",
                     generator=torch.Generator().manual_seed(0))
    a = s.sample(torch.Generator().manual_seed(0), 0)
    plain = {n: v.detach().clone().requires_grad_(True) for n, v in a.items()}
    set_arch(model, plain)
    sp.loss(model, data.batch("val", 4, torch.Generator().manual_seed(1))).backward()
    set_arch(model, None)
    e = plain["embed"].grad
    others = [i for i in range(len(e)) if i != a.index["embed"]]
    assert all(float(e[i].abs()) > 0 for i in others)  # every embed candidate is priced
    assert not torch.allclose(g_sup["embed"], g_sliced["embed"])


def test_gdas_grad_is_validated_and_only_changes_the_arch_step():
    with pytest.raises(SearchError, match="gdas_grad"):
        SearchConfig(sampler="gdas", gdas_grad="both").check()
    s = make_sampler("gdas", {"a": [1, 2]}, gdas_grad="superposed")
    arch = s.sample(torch.Generator().manual_seed(0), 0)
    assert type(s.for_arch_step(arch)) is dict  # the superposed path
    assert make_sampler("gdas", {"a": [1, 2]}, gdas_grad="sliced").for_arch_step(arch) is arch
    assert SearchConfig().gdas_grad == "superposed"  # chosen on the tuning corpora
    with pytest.raises(ValueError, match="gdas_grad"):
        make_sampler("gdas", {"a": [1, 2]}, gdas_grad="x")

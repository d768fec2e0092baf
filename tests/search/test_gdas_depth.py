"""GDAS on the default nanoGPT space: the depth alphas get a gradient and move.

The straight-through one-hot sample used to reach the depth only through the chosen
depth's output, whose scale the final LayerNorm erases: the depth's gradient was ~0 and
its alphas stayed at their initial values (the depth was decided by the init). The
DepthMixer's sliced path now passes the gradient of every depth it computes."""

from __future__ import annotations

import torch

from tangle_kernels.nn import set_arch
from tangle_kernels.search.samplers import make_sampler
from tangle_kernels.spaces import make_space


def test_gdas_depth_alphas_move_on_the_default_space():
    torch.manual_seed(0)
    sp = make_space("nanogpt")  # the default space: embed 32/48/64, layers 1/2/3
    data = sp.make_data("synthetic")
    model = sp.build_supernet(data)
    # LayerNorm's eps is what left the old straight-through depth gradient non-zero (a
    # bias of order eps / var, not a signal of the depth): without it that gradient was
    # rounding noise; the gradients of the computed shallower depths do not depend on it
    model.ln_f.eps = 0.0
    sampler = make_sampler("gdas", sp.choices, tau_max=10.0, tau_min=0.1, total_steps=8)
    init = sampler.state_dict()
    opt = torch.optim.Adam(sampler.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    grads = {n: 0.0 for n in sp.choices}
    deeper = 0
    for step in range(8):
        arch = sampler.sample(g, step)
        deeper += arch.index["layers"] > 0
        set_arch(model, arch)
        loss = sp.loss(model, data.batch("val", 4, g))
        opt.zero_grad()
        loss.backward(inputs=sampler.parameters())
        for n, a in sampler.alphas.items():
            grads[n] += float(a.grad.abs().max())
        opt.step()
    assert deeper >= 2  # samples where a shallower depth was computed
    set_arch(model, None)
    moved = {n: float((a.detach() - init[n]).abs().max()) for n, a in sampler.alphas.items()}
    others = [moved[n] for n in sp.choices if n != "layers"]
    # a real gradient, not rounding noise, and a step of the same order as the others'
    assert grads["layers"] > 1e-2 * max(grads[n] for n in sp.choices if n != "layers"), grads
    assert moved["layers"] > 0.1 * min(others), moved

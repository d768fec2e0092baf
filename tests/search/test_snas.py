"""SNAS (tangle_kernels/search/samplers/snas.py), the sampler added in one file: a soft
Gumbel-softmax relaxation at the temperature of its one option, ``snas_tau``; the
registry gives it its CLI flag, config field, validation and a search end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tangle_kernels.search import SearchConfig, SearchError
from tangle_kernels.search.cli import _config, build_parser
from tangle_kernels.search.samplers import SAMPLERS, SNASSampler, make_sampler

CHOICES = {"embed": [16, 24, 32], "heads": [2, 4]}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_snas_sample_is_the_soft_gumbel_softmax_at_its_temperature():
    s = make_sampler("snas", CHOICES, generator=_gen(), tau=0.5)
    assert SAMPLERS["snas"] is SNASSampler and s.tau == 0.5
    with torch.no_grad():
        s.alphas["embed"].copy_(torch.tensor([1.0, -0.5, 0.2]))
    arch = s.sample(_gen(7))
    # the same Gumbel draw by hand: U from the generator, g = -log(-log U)
    g = _gen(7)
    for n, a in s.alphas.items():
        u = torch.rand(a.shape, generator=g).clamp(torch.finfo(a.dtype).tiny, 1 - 1e-7)
        want = F.softmax((a.detach() - torch.log(-torch.log(u))) / 0.5, dim=0)
        torch.testing.assert_close(arch[n].detach(), want)
        assert (arch[n] > 0).all() and float(arch[n].detach().sum()) == pytest.approx(1.0, abs=1e-6)
    # soft: not one-hot; differentiable in the alphas
    assert float(arch["embed"].detach().max()) < 1.0
    arch["embed"][0].backward()
    assert s.alphas["embed"].grad is not None and s.alphas["embed"].grad.abs().sum() > 0
    torch.testing.assert_close(s.probs()["embed"], F.softmax(s.alphas["embed"].detach(), 0))


def test_snas_low_temperature_approaches_one_hot():
    hot = make_sampler("snas", CHOICES, generator=_gen(), tau=1e-3).sample(_gen(1))
    warm = make_sampler("snas", CHOICES, generator=_gen(), tau=10.0).sample(_gen(1))
    assert float(hot["embed"].detach().max()) > 0.99
    assert float(warm["embed"].detach().max()) < 0.6


def test_snas_option_from_the_registry_flag_config_and_checks(tmp_path):
    from tangle_kernels.spaces.nanogpt import NanoGPTSpace

    space = NanoGPTSpace(preset="tiny", hparams={"block_size": 16})
    args = build_parser().parse_args(["--sampler", "snas", "--snas-tau", "0.25"])
    cfg = _config(space, args)
    assert cfg.sampler == "snas" and cfg.snas_tau == 0.25
    with pytest.raises(SearchError, match="snas_tau"):
        SearchConfig(sampler="snas", snas_tau=0.0).check()
    with pytest.raises(SearchError, match="unrolled"):
        SearchConfig(sampler="snas", unrolled=True).check()
    from tangle_kernels.search import Search

    cfg = SearchConfig(sampler="snas", snas_tau=0.5, steps=3, batch_size=2, eval_batches=1,
                       checkpoint_every=0)
    res = Search(space, space.make_data("synthetic"), cfg, out=tmp_path, progress=False,
                 log=lambda m: None).run()
    assert res["sampler"] == "snas" and set(res["decided"]["choices"]) == set(space.choices)
    assert res["config"]["snas_tau"] == 0.5

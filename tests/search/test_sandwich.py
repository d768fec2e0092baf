"""The sandwich rule for one-hot samplers (``sandwich=max|max-min``): the weight step
also trains the sampled architecture with its sizes at their extremes, so the widest
slices of the shared weights get gradient every step and not only when drawn."""

from __future__ import annotations

import json

import pytest
import torch

from tangle_kernels.search import Search, SearchConfig
from tangle_kernels.search.config import SearchError
from tangle_kernels.search.loop import sandwich_arch
from tangle_kernels.search.samplers import make_sampler
from tangle_kernels.spaces import make_space


def test_sandwich_arch_puts_every_numeric_choice_at_its_extreme():
    choices = {"embed": [8, 16, 32], "act": ["relu", "gelu"], "layers": [2, 1]}
    s = make_sampler("spos", choices)
    arch = s.sample(torch.Generator().manual_seed(0))
    big = sandwich_arch(arch, choices, "max")
    small = sandwich_arch(arch, choices, "min")
    assert big.index["embed"] == 2 and big.index["layers"] == 0  # the value, not the position
    assert small.index["embed"] == 0 and small.index["layers"] == 1
    assert big.index["act"] == small.index["act"] == arch.index["act"]  # not a size: kept
    for a in (big, small):
        for n, v in a.items():
            assert float(v.sum()) == 1.0 and float(v[a.index[n]]) == 1.0


def test_sandwich_is_refused_where_it_means_nothing():
    with pytest.raises(SearchError, match="one of none, max, max-min"):
        SearchConfig(sampler="gdas", sandwich="both").check()
    with pytest.raises(SearchError, match="trains a mixture of every candidate"):
        SearchConfig(sampler="drnas", sandwich="max").check()
    SearchConfig(sampler="gdas", sandwich="max").check()
    SearchConfig(sampler="spos", sandwich="max-min").check()


def _smallest_always(search):
    """Make the sampler draw the smallest architecture every step."""
    s = search.sampler
    orig = s.sample

    def sample(generator=None, step=0):
        return sandwich_arch(orig(generator, step), s.choices, "min")
    s.sample = sample


@pytest.mark.parametrize("sandwich", ["none", "max", "max-min"])
def test_the_widest_slices_are_trained_only_with_the_sandwich(tmp_path, sandwich):
    sp = make_space("nanogpt", preset="tiny")
    data = sp.make_data("synthetic")
    cfg = SearchConfig(sampler="spos", steps=2, batch_size=4, eval_batches=1,
                       checkpoint_every=0, sandwich=sandwich)
    s = Search(sp, data, cfg, out=str(tmp_path), progress=False, log=lambda m: None)
    s.setup()
    _smallest_always(s)
    w0 = s.model.wte.weight.detach().clone()
    s.train_step(0)
    w1 = s.model.wte.weight.detach()
    e_min = min(sp.choices["embed"])
    assert not torch.equal(w1[:, :e_min], w0[:, :e_min])  # the drawn slice: trained
    wide_moved = not torch.equal(w1[:, e_min:], w0[:, e_min:])
    assert wide_moved == (sandwich != "none")


def test_a_sandwiched_gdas_search_records_each_end(tmp_path):
    sp = make_space("nanogpt", preset="tiny")
    data = sp.make_data("synthetic")
    cfg = SearchConfig(sampler="gdas", steps=3, batch_size=4, eval_batches=1,
                       checkpoint_every=0, sandwich="max-min")
    res = Search(sp, data, cfg, out=str(tmp_path), progress=False, log=lambda m: None).run()
    assert res["arch"]
    recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    train = [r for r in recs if r.get("kind") == "train"]
    assert len(train) == 3
    assert all("train_loss_max" in r and "train_loss_min" in r for r in train)

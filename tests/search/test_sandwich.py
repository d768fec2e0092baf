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


def test_sandwich_is_refused_where_it_means_nothing(tmp_path):
    with pytest.raises(SearchError, match="one of none, max, max-min"):
        SearchConfig(sampler="gdas", sandwich="both").check()
    with pytest.raises(SearchError, match="trains a mixture of every candidate"):
        SearchConfig(sampler="drnas", sandwich="max").check()
    SearchConfig(sampler="gdas", sandwich="max").check()
    SearchConfig(sampler="spos", sandwich="max-min").check()
    # a space whose choices are not sizes: its ends are the sampled architecture itself,
    # so the step would train it twice; refused before the output folder is taken
    from types import SimpleNamespace

    from tangle_kernels.nn.arch import end_index, is_sized

    assert not is_sized([True, False]) and not is_sized(["a"]) and is_sized([2, 0.5])
    assert end_index([4, 8, 2], "max") == 1 and end_index([4, 8, 2], "min") == 2
    assert end_index(["relu", "gelu"], "max") is None
    sp = make_space("nanogpt", preset="tiny")
    flat = SimpleNamespace(name="flags", choices={"act": ["relu", "gelu"], "bias": [True, False]})
    out = tmp_path / "run"
    with pytest.raises(SearchError, match="no sized choice"):
        Search(flat, sp.make_data("synthetic"), SearchConfig(sampler="spos", sandwich="max"),
               out=str(out), progress=False, log=lambda m: None).setup()
    assert not out.exists()


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

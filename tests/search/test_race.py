"""Final selection by a race (``select=race``): the contenders (the selection first,
distinct, from the tempered distribution, within the budget), the winner is the best
from-scratch contender, the retraining is the winner's, and bad settings are refused."""

from __future__ import annotations

import json
import math

import pytest

from tangle_kernels.search import Search, SearchConfig, SearchError
from tangle_kernels.search.race import contenders, most_probable, race_verdict
from tangle_kernels.search.report import train_from_scratch
from tangle_kernels.search.common import derive_seed
from tangle_kernels.spaces import make_space

CHOICES = {"a": [1, 2, 3], "b": [10, 20]}


@pytest.mark.parametrize("pick", ["top", "draw"])
def test_contenders_start_with_the_selection_and_are_distinct(pick):
    probs = {"a": [0.2, 0.5, 0.3], "b": [0.6, 0.4]}
    first = {"a": 2, "b": 10}
    got = contenders(first, CHOICES, probs, 4, pick=pick, seed=3)
    assert got[0] == first and len(got) == 4
    assert len({tuple(sorted(s.items())) for s in got}) == 4
    # the space holds 6: asking for more gives all of them, once each
    assert len(contenders(first, CHOICES, probs, 50, pick=pick)) == 6
    # reproducible from the seed
    assert got == contenders(first, CHOICES, probs, 4, pick=pick, seed=3)


def test_top_contenders_are_the_most_probable_in_order():
    import itertools
    import random

    rng = random.Random(0)
    choices = {"a": [1, 2, 3], "b": [10, 20], "c": [5, 6, 7, 8]}
    for _ in range(50):
        probs = {n: [rng.random() + 1e-3 for _ in v] for n, v in choices.items()}
        probs = {n: [x / sum(p) for x in p] for n, p in probs.items()}
        joint = sorted((math.prod(probs[n][choices[n].index(v)] for n, v in zip(choices, t)),
                        dict(zip(choices, t))) for t in itertools.product(*choices.values()))
        want = [sel for _, sel in joint[::-1]]
        got = list(most_probable(choices, probs))
        assert len(got) == 24
        p_of = lambda s: math.prod(probs[n][choices[n].index(s[n])] for n in s)  # noqa: E731
        # the same probabilities in the same order (exact ties may swap)
        assert [round(p_of(g), 12) for g in got] == [round(p_of(w), 12) for w in want]
        first = want[0]
        assert contenders(first, choices, probs, 5) == want[:5]


def test_top_contenders_in_a_huge_space_take_only_what_they_need():
    choices = {f"c{i}": [0, 1, 2, 3] for i in range(40)}  # 4^40 selections
    probs = {n: [0.4, 0.3, 0.2, 0.1] for n in choices}
    first = {n: 0 for n in choices}
    got = contenders(first, choices, probs, 4)
    assert got[0] == first and len(got) == 4
    # the runners-up differ from the argmax in exactly one choice, by one rank
    for sel in got[1:]:
        diff = [n for n in choices if sel[n] != 0]
        assert len(diff) == 1 and sel[diff[0]] == 1
    # a budget that rejects most of the space still finds fitting ones
    fits = lambda s: sum(s.values()) % 2 == 1 or s == first  # noqa: E731
    got = contenders(first, choices, probs, 3, fits=fits)
    assert len(got) == 3 and all(fits(s) for s in got)


def test_top_contenders_with_zero_or_nan_probabilities():
    probs = {"a": [0.0, float("nan"), 1.0], "b": [0.5, 0.5]}
    got = contenders({"a": 3, "b": 10}, CHOICES, probs, 6)
    assert len(got) == 6 and got[:2] == [{"a": 3, "b": 10}, {"a": 3, "b": 20}]


def test_contenders_follow_the_tempered_distribution():
    probs = {"a": [0.98, 0.01, 0.01], "b": [0.5, 0.5]}
    first = {"a": 1, "b": 10}
    cold = contenders(first, CHOICES, probs, 2, pick="draw", temperature=1.0, seed=0)
    assert cold[1] == {"a": 1, "b": 20}  # the only likely other one
    # a high temperature reaches the unlikely values
    hot = [s["a"] for seed in range(20)
           for s in contenders(first, CHOICES, probs, 3, pick="draw", temperature=50.0,
                               seed=seed)[1:]]
    assert {2, 3} & set(hot)


@pytest.mark.parametrize("pick", ["top", "draw"])
def test_contenders_respect_the_budget(pick):
    probs = {"a": [1 / 3] * 3, "b": [0.5, 0.5]}
    fits = lambda s: s["a"] * s["b"] <= 40  # noqa: E731
    got = contenders({"a": 1, "b": 10}, CHOICES, probs, 6, pick=pick, fits=fits, seed=1)
    assert all(fits(s) for s in got)
    assert len(got) == 5  # all but (3, 20) fit: asking for 6 gives the 5 there are
    assert len(contenders({"a": 1, "b": 10}, CHOICES, probs, 3, pick=pick, fits=fits)) == 3


def test_race_verdict_names_the_contenders_within_the_noise():
    vals = [2.10, 2.08, 2.095, 2.20, float("nan")]
    # winner 1 (2.08): 2.095 is within 0.023, 2.10 too; 2.20 and NaN are not
    assert race_verdict(vals, 1, 0.023) == ("coin toss", [0, 2])
    assert race_verdict(vals, 1, 0.01) == ("ahead", [])
    assert race_verdict(vals, 1, 0.0) == (None, [])  # unknown noise: no verdict
    assert race_verdict([2.0], 0, 0.05) == (None, [])


def _space():
    return make_space("nanogpt", preset="tiny", hparams={"block_size": 16})


def test_race_selects_the_best_contender_and_reuses_its_training(tmp_path):
    sp = _space()
    data = sp.make_data("synthetic")
    cfg = SearchConfig(steps=4, batch_size=4, eval_batches=2, select="race", race_archs=3,
                       retrain_steps=3, checkpoint_every=0)
    s = Search(sp, data, cfg, out=str(tmp_path / "r"), progress=False, log=lambda m: None)
    res = s.run()
    race = res["race"]
    assert len(race["contenders"]) == 3
    losses = [e["loss"] for e in race["contenders"]]
    assert race["winner"] == min(range(3), key=losses.__getitem__)
    assert res["arch"] == race["contenders"][race["winner"]]["arch"]
    assert race["argmax_won"] == (race["winner"] == 0)
    assert race["pick"] == "top"  # the default: the most probable architectures
    srt = sorted(losses)
    assert math.isclose(race["margin"], srt[1] - srt[0], rel_tol=1e-9)
    # SearchConfig's race_noise is 0 (unknown): no verdict
    assert race["noise"] == 0.0 and race["verdict"] is None and race["tied"] == []
    # the retraining is the winner's race training (same budget): reproduce it
    again = train_from_scratch(sp, data, res["arch"], cfg, steps=3, eval_set=s.eval_set,
                               seed=derive_seed(cfg.seed, race["winner"], "race"))
    assert res["scratch"]["val"]["loss"] == pytest.approx(again["val"]["loss"], abs=1e-6)
    assert res["scratch"]["val"]["loss"] == pytest.approx(losses[race["winner"]], abs=1e-6)
    with open(tmp_path / "r" / "arch.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["race"]["winner"] == race["winner"]
    assert saved["arch"] == res["arch"]


def test_race_settings_are_checked():
    with pytest.raises(SearchError, match="select="):
        SearchConfig(select="best").check()
    with pytest.raises(SearchError, match="race_steps=N or --retrain-steps"):
        SearchConfig(select="race").check()
    with pytest.raises(SearchError, match="has none"):
        SearchConfig(select="race", sampler="spos", retrain_steps=2).check()
    with pytest.raises(SearchError, match="race_temperature"):
        SearchConfig(select="race", race_temperature=0.0, retrain_steps=2).check()
    with pytest.raises(SearchError, match="race_archs"):
        SearchConfig(select="race", race_archs=0, retrain_steps=2).check()
    SearchConfig(select="race", race_steps=5).check()
    with pytest.raises(SearchError, match="race_noise"):
        SearchConfig(select="race", race_steps=5, race_noise=-0.1).check()
    with pytest.raises(SearchError, match="race_noise"):
        SearchConfig(race_noise=float("nan")).check()
    with pytest.raises(SearchError, match="race_pick='best'"):
        SearchConfig(select="race", race_steps=5, race_pick="best").check()
    assert SearchConfig().race_pick == "top"


def test_the_nanogpt_default_races_and_spos_keeps_its_own_selection():
    from tangle_kernels.search import build_config

    sp = make_space("nanogpt")
    cfg = build_config(sp, {})
    # the race runs at the retraining's budget (race_steps 0), whose training it reuses
    assert cfg.select == "race" and cfg.retrain_steps == 400 and cfg.race_steps == 0
    assert cfg.race_noise > 0
    assert build_config(sp, {"retrain_steps": 20}).select == "race"
    # no training from scratch at all: the argmax (a race was not asked for)
    assert build_config(sp, {"retrain_steps": 0}).select == "argmax"
    with pytest.raises(SearchError, match="race_steps=N or --retrain-steps"):
        build_config(sp, {"retrain_steps": 0}, {"select": "race"})
    # the space's default is a race; SPOS has no trained distribution: its own stage
    assert build_config(sp, {"sampler": "spos"}).select == "argmax"
    assert build_config(sp, {"optimizer": "gdas"}).select == "race"
    # asked for explicitly, a race under SPOS is refused (never silently dropped)
    with pytest.raises(SearchError, match="has none"):
        build_config(sp, {"sampler": "spos"}, {"select": "race"})
    assert build_config(sp, {}, {"select": "argmax"}).select == "argmax"

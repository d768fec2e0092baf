"""Search under a budget: every derived architecture within its limits (random budgets
and spaces), the most probable one that fits, a clear error when none fits, and the
Lagrangian's term and multipliers."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from tangle_kernels.nn.cost import CostModel
from tangle_kernels.search.budget import Budget, BudgetError, Lagrangian, constrained_argmax
from tangle_kernels.spaces import make_space

SPACES = ["nanogpt", "conv-macro", "autoformer", "mobilenetv3", "nb201"]


def _cm(name):
    sp = make_space(name) if name == "nanogpt" else make_space(name, preset="tiny")
    data = sp.make_data("synthetic")
    torch.manual_seed(0)
    model = sp.build_supernet(data)
    x, _ = data.batch("val", 2, torch.Generator().manual_seed(0))
    return sp, CostModel(model, sp.choices, example=x)


def _rand_probs(choices, rng):
    out = {}
    for n, v in choices.items():
        w = [rng.random() + 1e-3 for _ in v]
        out[n] = [x / sum(w) for x in w]
    return out


@pytest.mark.parametrize("name", SPACES)
def test_derived_architecture_is_within_random_budgets(name):
    sp, cm = _cm(name)
    rng = random.Random(name)
    lo_p, hi_p = cm.bounds("params") if sp.num_architectures() <= 20000 else (None, None)
    for trial in range(6):
        probs = _rand_probs(sp.choices, rng)
        sel = {n: rng.choice(v) for n, v in sp.choices.items()}  # a budget some arch meets
        limits = {"params": cm.params(sel) * rng.uniform(1.0, 1.3)}
        if trial % 2:
            limits["macs"] = cm.macs(sel) * rng.uniform(1.0, 1.3)
        budget = Budget(limits)
        for kw in ({}, {"exact_limit": 0, "beam": 64}):  # exact, and the beam search
            got = constrained_argmax(cm, probs, budget, **kw)
            assert cm.params(got) <= limits["params"], (got, limits)
            if "macs" in limits:
                assert cm.macs(got) <= limits["macs"], (got, limits)
    if lo_p is not None:
        with pytest.raises(BudgetError, match="smallest architecture has"):
            constrained_argmax(cm, probs, Budget({"params": lo_p - 1}))
        with pytest.raises(BudgetError, match="smallest architecture has"):
            constrained_argmax(cm, probs, Budget({"params": lo_p - 1}), exact_limit=0)


def test_the_most_probable_architecture_that_fits():
    sp, cm = _cm("nanogpt")
    rng = random.Random(1)
    names = list(sp.choices)
    for _ in range(10):
        probs = _rand_probs(sp.choices, rng)
        limit = rng.uniform(*cm.bounds("params"))
        best, best_lp = None, -math.inf
        for combo in itertools.product(*sp.choices.values()):
            s = dict(zip(names, combo))
            if cm.params(s) <= limit:
                lp = sum(math.log(probs[n][sp.choices[n].index(s[n])]) for n in names)
                if lp > best_lp:
                    best, best_lp = s, lp
        got = constrained_argmax(cm, probs, Budget({"params": limit}))
        assert got == best
        assert constrained_argmax(cm, probs, Budget({"params": limit}), exact_limit=0, beam=4096) == best
    # no limit: the plain argmax of each choice
    probs = _rand_probs(sp.choices, rng)
    got = constrained_argmax(cm, probs, Budget())
    assert got == {n: sp.choices[n][max(range(len(p)), key=p.__getitem__)] for n, p in probs.items()}


def test_bad_budgets_and_probabilities_are_refused():
    sp, cm = _cm("nanogpt")
    for bad in (0, -5, float("inf"), float("nan"), "1e6", True):
        with pytest.raises(BudgetError, match="positive finite"):
            Budget({"params": bad})
    with pytest.raises(BudgetError, match="unknown cost"):
        Budget({"energy": 3.0})
    probs = {n: [1.0 / len(v)] * len(v) for n, v in sp.choices.items()}
    probs["embed"] = [float("nan"), 0.5, 0.5]
    with pytest.raises(BudgetError, match="finite non-negative"):
        constrained_argmax(cm, probs, Budget({"params": 1e9}))


def test_lagrangian_pushes_the_expected_cost_under_the_limit():
    sp, cm = _cm("nanogpt")
    lo, hi = cm.bounds("params")
    budget = Budget({"params": lo + 0.25 * (hi - lo)})
    lag = Lagrangian(cm, budget, rate=2.0)
    alphas = {n: torch.zeros(len(v), dtype=torch.float64, requires_grad=True) for n, v in sp.choices.items()}
    opt = torch.optim.Adam(alphas.values(), lr=0.1)

    def probs():
        return {n: torch.softmax(a, 0) for n, a in alphas.items()}

    # no loss but the constraint: the multiplier grows while the expectation is over the
    # limit and the alphas move towards cheaper architectures until it fits
    start = float(cm.expected(probs()).detach())
    assert start > budget.limits["params"]
    assert float(lag.term(probs()).detach()) == 0.0  # lambda starts at 0
    for _ in range(200):
        opt.zero_grad()
        t = lag.term(probs())
        if t.requires_grad:
            t.backward()
            opt.step()
        rec = lag.update(probs())
    assert rec["expected_params"] <= budget.limits["params"] * 1.02
    assert rec["lambda_params"] >= 0.0
    state = lag.state_dict()
    lag2 = Lagrangian(cm, budget)
    lag2.load_state_dict(state)
    assert lag2.lam == lag.lam
    with pytest.raises(BudgetError, match="do not match"):
        lag2.load_state_dict({"macs": 1.0})
    # a slack budget: the multiplier stays 0, the term is 0
    slack = Lagrangian(cm, Budget({"params": hi * 2}))
    for _ in range(3):
        slack.update(probs())
    assert slack.lam == {"params": 0.0}


# ------------------------------------------------------------------ the search driver
from tangle_kernels.search.engine import Search, SearchConfig  # noqa: E402
from tangle_kernels.search.samplers import SAMPLERS  # noqa: E402


def _run(sp, data, tmp_path, **kw):
    cfg = SearchConfig(steps=kw.pop("steps", 3), batch_size=4, eval_batches=1, checkpoint_every=0,
                       spos_budget=4, spos_population=2, spos_eval_batches=1, **kw)
    res = Search(sp, data, cfg, out=str(tmp_path), progress=False, log=lambda m: None).run()
    import json

    return res, json.loads((tmp_path / "arch.json").read_text())


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_search_derives_within_the_budget(sampler, tmp_path):
    sp = make_space("nanogpt", preset="tiny")
    data = sp.make_data("synthetic")
    cm = CostModel(sp.build_supernet(data), sp.choices)
    lo, hi = cm.bounds("params")
    limit = lo + 0.3 * (hi - lo)
    res, doc = _run(sp, data, tmp_path, sampler=sampler, max_params=limit,
                    budget_mode="lagrange")
    assert doc["budget"] == {"max_params": limit}
    assert doc["costs"]["params"] == cm.params(doc["arch"]) == res["params"] <= limit
    assert doc["budget_margin"]["params"] == pytest.approx(1 - doc["costs"]["params"] / limit)
    if SAMPLERS[sampler].trains_arch:  # the multiplier is recorded in the metrics
        import json

        recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        trains = [r for r in recs if r.get("kind") == "train"]
        assert all("lambda_params" in r and "expected_params" in r for r in trains)
        assert doc["budget_multipliers"]["params"] == trains[-1]["lambda_params"]
    if sampler == "spos":  # every evaluation of the selection on an architecture that fits
        import itertools

        n_fit = sum(cm.params(dict(zip(sp.choices, v))) <= limit
                    for v in itertools.product(*sp.choices.values()))
        assert 1 <= n_fit and doc["decided"]["spos"]["scored"] == min(4, n_fit)


def test_search_budget_on_macs_of_a_vision_space_and_resume(tmp_path):
    sp = make_space("conv-macro", preset="tiny")
    data = sp.make_data("synthetic")
    model = sp.build_supernet(data)
    x, _ = data.batch("val", 2, torch.Generator().manual_seed(0))
    cm = CostModel(model, sp.choices, example=x)
    sel = {n: v[0] for n, v in sp.choices.items()}
    limit = cm.macs(sel) * 1.05
    res, doc = _run(sp, data, tmp_path / "a", sampler="drnas", max_macs=limit, steps=4,
                    budget_mode="lagrange")
    assert doc["costs"]["macs"] <= limit and doc["costs"]["macs"] == sp.arch_macs(doc["arch"])
    # interrupted after 2 steps and resumed: the same alphas, multipliers and architecture
    cfg = SearchConfig(sampler="drnas", steps=4, batch_size=4, eval_batches=1, checkpoint_every=0,
                       max_macs=limit, budget_mode="lagrange")
    s = Search(sp, data, cfg, out=str(tmp_path / "b"), progress=False, log=lambda m: None,
               on_step=lambda search, step: search.request_stop() if step == 1 else None)
    with pytest.raises(KeyboardInterrupt):
        s.run()
    Search(sp, data, cfg, out=str(tmp_path / "b"), resume=True, progress=False,
           log=lambda m: None).run()
    import json

    doc2 = json.loads((tmp_path / "b" / "arch.json").read_text())
    assert doc2["arch"] == doc["arch"] and doc2["alphas"] == doc["alphas"]
    assert doc2["budget_multipliers"] == doc["budget_multipliers"]


def test_a_budget_nothing_fits_is_refused_before_training(tmp_path):
    from tangle_kernels.search.config import SearchError

    sp = make_space("nanogpt", preset="tiny")
    data = sp.make_data("synthetic")
    cfg = SearchConfig(steps=50, batch_size=4, eval_batches=1, max_params=10)
    s = Search(sp, data, cfg, out=str(tmp_path), progress=False, log=lambda m: None)
    with pytest.raises(SearchError, match="budget: no architecture of the space fits --max-params 10"):
        s.run()
    assert not (tmp_path / "metrics.jsonl").exists() or "train" not in (tmp_path / "metrics.jsonl").read_text()
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(SearchError, match="must be positive and finite"):
            SearchConfig(max_params=bad).check()


def test_cli_budget_flags(tmp_path, capsys):
    from cli_util import assert_one_error, run_cli

    rc, _, err = run_cli(["--space", "nanogpt", "--preset", "tiny", "--data", "synthetic",
                          "--steps", "2", "--batch-size", "4", "--max-params", "10",
                          "--out", str(tmp_path / "r"), "--no-progress"], capsys)
    assert_one_error(rc, err, "budget: no architecture of the space fits --max-params 10")


def test_budget_mode_derive_searches_unconstrained_and_derives_within(tmp_path):
    """``budget_mode=derive``: no multiplier, the alphas train exactly as without a
    budget (same seed: the same final distribution), the derivation and the race keep
    to the limit."""
    import json

    sp = make_space("nanogpt", preset="tiny")
    data = sp.make_data("synthetic")
    cm = CostModel(sp.build_supernet(data), sp.choices)
    lo, hi = cm.bounds("params")
    limit = lo + 0.3 * (hi - lo)
    free, _ = _run(sp, data, tmp_path / "free", steps=4)
    res, doc = _run(sp, data, tmp_path / "derive", steps=4, max_params=limit,
                    budget_mode="derive", select="race", race_archs=3, race_steps=2)
    assert res["probs"] == free["probs"]
    assert "budget_multipliers" not in doc
    assert doc["costs"]["params"] == cm.params(doc["arch"]) <= limit
    assert all(cm.params(c["arch"]) <= limit for c in doc["race"]["contenders"])
    lag, ldoc = _run(sp, data, tmp_path / "lag", steps=4, max_params=limit,
                     budget_mode="lagrange")
    dflt, ddoc = _run(sp, data, tmp_path / "dflt", steps=4, max_params=limit)
    assert "budget_multipliers" not in ddoc and dflt["probs"] == free["probs"]  # the default
    assert "budget_multipliers" in ldoc and lag["probs"] != free["probs"]
    with pytest.raises(Exception, match="budget_mode"):
        SearchConfig(budget_mode="penalty").check()

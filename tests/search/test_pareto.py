"""The cost / quality front of one supernet (``--pareto``, ``tangle-search pareto``):
every point within its budgets and the most probable architecture that fits them, the
front flags exactly the non-dominated points, a finished run read from its folder gives
the same front, and an extracted point is the plain model of the supernet."""

from __future__ import annotations

import json

import pytest
import torch

from tangle_kernels.nn.cost import CostModel
from tangle_kernels.search import Search, SearchConfig
from tangle_kernels.search.budget import Budget, BudgetError, constrained_argmax
from tangle_kernels.search.cli import main as cli_main
from tangle_kernels.search.pareto import LoadedRun, extract_point, front, write_front
from tangle_kernels.spaces import make_space


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pareto") / "run"
    sp = make_space("nanogpt", preset="tiny", hparams={"block_size": 16})
    data = sp.make_data("synthetic")
    cfg = SearchConfig(steps=4, batch_size=4, eval_batches=2, arch_lr=0.05)
    s = Search(sp, data, cfg, out=str(out), progress=False, log=lambda m: None,
               meta={"data_arg": "synthetic"})
    s.run()
    return s, out


def test_points_fit_their_budgets_and_the_front_is_the_non_dominated_set(run):
    s, out = run
    rec = write_front(s, str(out))
    cm = CostModel(s.model, s.space.choices)
    probs = {n: p.tolist() for n, p in s.sampler.probs().items()}
    pts = rec["points"]
    assert pts and rec["budgets"][-1] is None
    assert [p["params"] for p in pts] == sorted(p["params"] for p in pts)
    for p in pts:
        assert p["params"] == cm.params(p["arch"])
        for b in p["budgets"]:
            lim = Budget({"params": b}) if b is not None else Budget({})
            assert constrained_argmax(cm, probs, lim) == p["arch"]
            assert b is None or p["params"] <= b
        sup = float(s.evaluate_selection(p["arch"])["loss"])
        assert p["loss"] == pytest.approx(sup, abs=1e-6)
    for p in pts:  # the definition: no other point is at most as costly and better
        dominated = any(q is not p and q["params"] <= p["params"] and q["loss"] < p["loss"]
                        for q in pts)
        assert p["front"] == (not dominated)
    saved = json.loads((out / "pareto.json").read_text())
    assert [p["arch"] for p in saved["points"]] == [p["arch"] for p in pts]


def test_front_refuses_bad_budgets_and_skips_budgets_nothing_fits():
    class CM:
        choices = {"w": [1, 2, 3]}

        def cost(self, sel, kind):
            return 10 * sel["w"]

        params = lambda self, sel: self.cost(sel, "params")  # noqa: E731

    cm = CM()
    probs = {"w": [0.2, 0.3, 0.5]}
    losses = {1: 3.0, 2: 2.0, 3: 2.5}
    pts = front(cm, probs, lambda s: losses[s["w"]], [5, 15, 25, None])
    assert [p["arch"]["w"] for p in pts] == [1, 2, 3]  # 5 fits nothing: no point
    assert [p["front"] for p in pts] == [True, True, False]
    with pytest.raises(BudgetError, match="positive and finite"):
        front(cm, probs, lambda s: 0.0, [float("nan")])
    with pytest.raises(BudgetError, match="kind"):
        front(cm, probs, lambda s: 0.0, [10], kind="latency")


def test_a_finished_run_gives_the_same_front_and_extracts_its_points(run, tmp_path):
    s, out = run
    live = write_front(s, str(out))
    loaded = LoadedRun(str(out))
    again = write_front(loaded, str(out))
    assert [(p["arch"], round(p["loss"], 6)) for p in again["points"]] == \
        [(p["arch"], round(p["loss"], 6)) for p in live["points"]]
    pt, js = extract_point(loaded, again, 0, str(tmp_path))
    want = s.space.extract(s.model, again["points"][0]["arch"]).state_dict()
    got = torch.load(pt, weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    rec = json.loads(open(js).read())
    assert rec["arch"] == again["points"][0]["arch"] and rec["space"] == "nanogpt"
    # the CLI: the front of the folder, an extracted point, a point that is not there
    assert cli_main(["pareto", str(out), "--budgets", "9000", "--extract", "0"]) == 0
    assert (out / "pareto-0.pt").exists()
    assert cli_main(["pareto", str(out), "--extract", "99"]) == 2
    assert cli_main(["pareto", str(tmp_path / "nothing")]) == 2

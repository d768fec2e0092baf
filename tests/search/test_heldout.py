"""The held-out protocol of the search-quality benchmark: the corpora are cut from
their source by offset and checked by hash (never copied into the repository), the
split is fixed, and the report's pieces (setting labels, the decision report's
calibration, the rank correlation of the diagnosis) compute what they say."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.quality import corpora  # noqa: E402
from benchmarks.quality.diagnose import spearman  # noqa: E402
from benchmarks.quality.heldout import (  # noqa: E402
    conditional_agreement,
    in_budget,
    random_k,
    setting_label,
)


def test_the_protocol_has_five_corpora_and_a_fixed_split():
    names = corpora.DEFAULT
    assert len(names) >= 5
    tuning, held = corpora.by_split("tuning"), corpora.by_split("held-out")
    assert set(tuning) | set(held) == set(names) and not set(tuning) & set(held)
    assert len(tuning) >= 2 and len(held) >= 3
    pieces = [corpora.CORPORA[n] for n in names if corpora.CORPORA[n].source != "embedded"]
    spans = sorted((c.offset, c.offset + c.length) for c in pieces)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "pieces overlap"
    for c in pieces:
        assert 30_000 <= c.length <= 34_000 and len(c.sha256) == 64


def test_materialize_cuts_checks_and_refuses_another_file(tmp_path, monkeypatch):
    src = tmp_path / "shared"
    src.mkdir()
    text = "".join(f"LINE {i}: é\n" for i in range(500))
    (src / "t.txt").write_text(text, encoding="utf-8")
    piece = text[100:400]
    c = corpora.Corpus("toy", "tuning", "t.txt", 100, 300,
                       hashlib.sha256(piece.encode()).hexdigest())
    monkeypatch.setenv("TANGLE_SHARED_DATA", str(src))
    monkeypatch.setenv("TANGLE_CORPUS_CACHE", str(tmp_path / "cache"))
    path = corpora.materialize(c)
    assert open(path, encoding="utf-8").read() == piece
    assert not str(path).startswith(ROOT)
    assert corpora.materialize(c) == path  # cached
    bad = corpora.Corpus("toy2", "tuning", "t.txt", 101, 300, c.sha256)
    with pytest.raises(SystemExit, match="another version"):
        corpora.materialize(bad)
    with open(path, "a", encoding="utf-8") as f:  # a cached piece that changed
        f.write("x")
    with pytest.raises(SystemExit, match="delete it"):
        corpora.materialize(c)
    monkeypatch.setenv("TANGLE_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="is not there"):
        corpora.materialize(corpora.Corpus("toy3", "tuning", "t.txt", 0, 5, "0" * 64))
    with pytest.raises(SystemExit, match="one of"):
        corpora.get("hamlet")


def test_the_real_pieces_match_their_hashes_where_the_source_is(tmp_path, monkeypatch):
    monkeypatch.setenv("TANGLE_CORPUS_CACHE", str(tmp_path / "cache"))
    src = os.path.join(corpora.shared_data_dir(), "tinyshakespeare.txt")
    checked = 0
    for c in corpora.CORPORA.values():
        if c.source == "embedded":
            assert corpora.materialize(c) is None
        elif os.path.exists(src):
            assert os.path.getsize(corpora.materialize(c)) >= c.length
            checked += 1
    assert checked in (0, len(corpora.CORPORA) - 1)


def test_setting_label_names_what_differs_from_the_defaults():
    dflt = {"steps": 200, "select": "argmax", "lr": 1e-3}
    base = {"steps": 400}
    assert setting_label({"steps": 400}, base, dflt) == "default"
    assert setting_label({"steps": 250, "select": "race"}, base, dflt) == \
        "select=race steps=250"
    assert setting_label({}, base, dflt) == "steps=200"


def test_conditional_agreement_holds_the_other_choices_fixed():
    def rec(a, b, loss):
        return {"arch": {"a": a, "b": b}, "val_loss": loss}

    ref = {str(i): r for i, r in enumerate(
        [rec(1, 1, 2.0), rec(2, 1, 1.0), rec(1, 2, 0.5), rec(2, 2, 3.0)])}
    row = {"arch": {"a": 1, "b": 2}, "decision": {"choices": {
        "a": {"chosen": 1, "verdict": "decided"}, "b": {"chosen": 2, "verdict": "leaning"}}}}
    got = conditional_agreement(row, ref)
    # with b=2 fixed, a=1 (0.5) beats a=2 (3.0); with a=1 fixed, b=2 (0.5) beats b=1 (2.0)
    # records written before the rename say "decided": read as "confident"
    assert got == {"a": (True, "confident"), "b": (True, "leaning")}
    row["arch"] = {"a": 2, "b": 2}
    row["decision"]["choices"]["a"]["chosen"] = 2
    got = conditional_agreement(row, ref)
    # with b=2 fixed a=1 is better (0.5 < 3.0); with a=2 fixed b=1 is better (1.0 < 3.0)
    assert got == {"a": (False, "confident"), "b": (False, "leaning")}


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 1, 1]) == 0.0
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)


def test_a_budgeted_run_is_ranked_among_the_architectures_within_its_budget():
    ref = {str(i): {"arch": {"a": i}, "params": 10 * i, "val_loss": 3.0 - 0.1 * i}
           for i in range(10)}
    assert in_budget(ref, {}) is ref and in_budget(ref, {"steps": 3}) is ref
    fit = in_budget(ref, {"max_params": 45})
    assert sorted(r["params"] for r in fit.values()) == [0, 10, 20, 30, 40]


def test_a_gdas_run_recorded_before_gdas_grad_had_the_sliced_gradient():
    from benchmarks.quality.bench import GDAS_GRAD_BEFORE, method_settings

    assert method_settings("gdas", {"steps": 3})["gdas_grad"] == GDAS_GRAD_BEFORE == "sliced"
    assert method_settings("gdas", {"gdas_grad": "superposed"})["gdas_grad"] == "superposed"
    assert "gdas_grad" not in method_settings("drnas", {"steps": 3})
    dflt = {"gdas_grad": "superposed"}
    assert setting_label(method_settings("gdas", {}), {}, dflt) == "gdas_grad=sliced"
    assert setting_label(method_settings("gdas", {"gdas_grad": "superposed"}), {}, dflt) == \
        "default"


def test_a_budgeted_run_recorded_before_budget_mode_had_the_multiplier():
    from benchmarks.quality.bench import BUDGET_MODE_BEFORE, search_settings

    assert search_settings({"max_params": 5})["budget_mode"] == BUDGET_MODE_BEFORE == "lagrange"
    assert search_settings({"max_params": 5, "budget_mode": "derive"})["budget_mode"] == "derive"
    assert "budget_mode" not in search_settings({"steps": 3})  # no budget, no mode
    dflt = {"budget_mode": "derive"}
    assert setting_label(search_settings({"max_params": "p25"}), {}, dflt) == \
        "budget_mode=lagrange max_params=p25"


def test_budget_quantiles_are_percentiles_of_the_references_parameter_counts():
    from benchmarks.quality.bench import budget_at, budget_label

    ref = {str(i): {"params": 100 + 10 * i} for i in range(11)}  # 100..200
    assert [budget_at(ref, q) for q in (25, 50, 75, 100)] == [125, 150, 175, 200]
    assert budget_label(ref, 150) == "p50" and budget_label(ref, 150.0) == "p50"
    assert budget_label(ref, 151) is None and budget_label(ref, None) is None
    assert budget_label({}, 150) is None
    for bad in (0, -5, 101):
        with pytest.raises(ValueError, match="quantile"):
            budget_at(ref, bad)
    with pytest.raises(ValueError, match="reference"):
        budget_at({}, 50)
    # a budgeted run's setting is the quantile on every corpus (the counts differ a bit
    # with the vocabulary), the default's setting stays "default"
    dflt = {"select": "argmax"}
    assert setting_label({"max_params": "p25"}, {}, dflt) == "max_params=p25"


def test_best_of_k_random_is_the_exact_expectation():
    import itertools
    import statistics

    from benchmarks.quality.bench import percentile

    losses = [2.0 + 0.01 * i for i in range(10)]
    got = random_k(losses, 3, top=25.0)
    pcts = [percentile(min(c), losses) for c in itertools.combinations(losses, 3)]
    assert got["mean"] == pytest.approx(statistics.fmean(pcts))
    assert got["p_top"] == pytest.approx(sum(p < 25 for p in pcts) / len(pcts))
    assert random_k(losses, 1)["mean"] == pytest.approx(statistics.fmean(
        percentile(x, losses) for x in losses))


def test_a_race_recorded_before_race_pick_is_not_taken_for_todays_default():
    from benchmarks.quality.bench import RACE_PICK_BEFORE, search_settings

    old = {"steps": 250, "select": "race", "race_steps": 400}
    assert search_settings(old)["race_pick"] == RACE_PICK_BEFORE == "draw"
    new = dict(old, race_pick="top")
    assert search_settings(new) != search_settings(old)
    # an argmax run has no race to pick for
    assert "race_pick" not in search_settings({"steps": 400})
    base = {"steps": 250, "select": "race", "race_steps": 400}
    dflt = {"race_pick": "top", "select": "argmax"}
    assert setting_label(search_settings(old), base, dflt) == "race_pick=draw"
    assert setting_label(search_settings(new), base, dflt) == "default"


def _sim_record():
    choices = {"a": [1, 2, 3], "b": [10, 20]}
    # the most probable arch (a=1, b=10) is the worst; the 2nd most probable the best
    probs = {"a": [0.6, 0.3, 0.1], "b": [0.55, 0.45]}
    ref = {}
    losses = {(1, 10): 3.0, (1, 20): 1.0, (2, 10): 2.0, (2, 20): 2.5, (3, 10): 1.5,
              (3, 20): 2.2}
    from benchmarks.quality.bench import _key

    for (a, b), v in losses.items():
        ref[_key({"a": a, "b": b})] = v
    return choices, probs, ref


def test_the_race_replay_scores_what_a_race_would_pick():
    from benchmarks.quality.simulate import replay

    choices, probs, ref = _sim_record()
    # noise-free: the argmax alone is the worst (5 of 6 better: 83.3%)
    assert replay(("argmax",), choices, probs, ref, 0.0, 5, 0) == [pytest.approx(500 / 6)] * 5
    # the two most probable: the second is the best of the space
    assert replay(("top", 2), choices, probs, ref, 0.0, 5, 0) == [0.0] * 5
    # all six raced without noise always find the best; with huge noise they pick at random
    assert set(replay(("uniform", 6), choices, probs, ref, 0.0, 20, 0)) == {0.0}
    noisy = replay(("uniform", 6), choices, probs, ref, 100.0, 400, 0)
    assert 30 < sum(noisy) / len(noisy) < 53  # the mean percentile of a random pick: 41.7
    # draws start with the argmax and are reproducible from the replay's seed
    assert replay(("draw", 3, 1.0), choices, probs, ref, 0.02, 50, 7) == \
        replay(("draw", 3, 1.0), choices, probs, ref, 0.02, 50, 7)

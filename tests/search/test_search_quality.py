"""benchmarks/search_quality.py on the tiny nanoGPT space for a few steps (CI smoke run
of the search-quality benchmark: the reference, every sampler at equal wall-clock,
random search, the report files and the README section), and the decision report of
the derived architecture."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _load():
    spec = importlib.util.spec_from_file_location(
        "search_quality", os.path.join(ROOT, "benchmarks", "search_quality.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_benchmark_end_to_end(tmp_path):
    sq = _load()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n")
    out = tmp_path / "results"
    argv = [
        "--quick",
        "--seeds", "0", "1", "2",
        "--work", str(tmp_path / "work"),
        "--run-root", str(tmp_path / "runs"),
        "--out", str(out),
        "--readme", str(readme),
        "--tag", "ci",
    ]
    assert sq.main(argv) == 0
    ref = [json.loads(l) for l in open(tmp_path / "work" / "reference.jsonl")]
    assert len(ref) == 16  # the tiny space: every architecture
    jsons = [p for p in os.listdir(out) if p.endswith("-search-quality-ci.json")]
    assert len(jsons) == 1
    doc = json.loads((out / jsons[0]).read_text())
    methods = {s["method"] for s in doc["summary"]}
    assert methods == set(sq.ALL_METHODS)
    for s in doc["summary"]:
        assert s["seeds"] == 3
        assert 0.0 <= s["pct_mean"] < 100.0
    for r in doc["runs"]:
        assert r["percentile"] is not None and r["scratch_val"] is not None
        if r["method"] in ("drnas", "darts", "gdas", "sparsemax"):
            assert set(r["decided"]) == {"embed", "heads", "mlp_ratio", "layers"}
        if r["method"] == "spos+random":  # reuses the SPOS + evolution supernet of its seed
            assert r["shared_supernet"].startswith("spos+evolution-")
            assert r["shared_supernet"].endswith(f"-s{r['seed']}")
    assert "ordering" in doc and "paper's ordering" in doc["ordering"]
    md = (out / jsons[0].replace(".json", ".md")).read_text()
    assert "| drnas | 3 |" in md
    text = readme.read_text()
    assert sq.README_START in text and sq.README_END in text and "| drnas | 3 |" in text
    # rerun: everything is cached (no new reference lines or runs), README section replaced
    n_runs = len(open(tmp_path / "work" / "runs.jsonl").readlines())
    assert sq.main(argv + ["--no-train-reference"]) == 0
    assert len(open(tmp_path / "work" / "runs.jsonl").readlines()) == n_runs
    assert readme.read_text().count(sq.README_START) == 1


def test_reference_resumes_after_interrupt(tmp_path):
    sq = _load()
    argv = ["--quick", "--stage", "reference", "--work", str(tmp_path / "w"),
            "--run-root", str(tmp_path / "r"), "--max-reference", "4", "--reference-sample", "5"]
    assert sq.main(argv) == 0
    lines = open(tmp_path / "w" / "reference.jsonl").readlines()
    assert len(lines) == 5  # more than max_reference architectures: a uniform sample
    # an interrupted write: the cut line is dropped and that architecture retrained
    with open(tmp_path / "w" / "reference.jsonl", "w") as f:
        f.writelines(lines[:3] + [lines[3][:20]])
    assert sq.main(argv) == 0
    again = [json.loads(l) for l in open(tmp_path / "w" / "reference.jsonl") if l.strip().endswith("}")]
    assert sorted(r["key"] for r in again) == sorted(json.loads(l)["key"] for l in lines)
    # same seed and batches: the retrained one matches
    orig = {json.loads(l)["key"]: json.loads(l)["val_loss"] for l in lines}
    assert all(orig[r["key"]] == pytest.approx(r["val_loss"], abs=1e-6) for r in again)


def test_percentile_and_random_search():
    sq = _load()
    assert sq.percentile(1.0, [0.5, 1.0, 2.0, 3.0]) == 25.0
    assert sq.percentile(0.1, [0.5, 1.0]) == 0.0
    ref = {
        str(i): {"key": str(i), "arch": {"a": i}, "val_loss": float(i), "time_s": 10.0}
        for i in range(10)
    }
    r = sq.random_search_from_reference(ref, 35.0, seed=0)
    assert r["trained"] == 3  # as many 10 s trainings as fit in 35 s
    assert r["percentile"] == 10.0 * r["scratch_val"]
    r1 = sq.random_search_from_reference(ref, 1.0, seed=0)
    assert r1["trained"] == 1  # at least one


def test_decision_report():
    from tangle_kernels.search.samplers import decision_report, format_decision

    rep = decision_report(
        {"embed": [0.404, 0.398, 0.198], "heads": torch.tensor([0.9, 0.1])},
        {"embed": [32, 48, 64], "heads": [2, 4]},
    )
    e, h = rep["choices"]["embed"], rep["choices"]["heads"]
    assert e["chosen"] == 32 and e["verdict"] == "coin toss" and e["margin"] == pytest.approx(0.006)
    assert h["chosen"] == 2 and h["verdict"] == "confident"
    assert 0.9 < e["norm_entropy"] < 1.0 and 0.0 < h["norm_entropy"] < 0.5
    assert rep["overall"]["coin_tosses"] == ["embed"]
    assert rep["overall"]["arch_prob"] == pytest.approx(0.404 * 0.9, abs=1e-4)
    lines = format_decision(rep)
    assert any("COIN TOSS on embed" in l for l in lines)


def test_search_writes_decision(tmp_path):
    from tangle_kernels.search.engine import Search, SearchConfig
    from tangle_kernels.spaces.nanogpt import NanoGPTSpace

    space = NanoGPTSpace(preset="tiny", hparams={"block_size": 16})
    data = space.make_data("synthetic")
    for opt in ("drnas", "spos"):
        cfg = SearchConfig(optimizer=opt, steps=3, batch_size=4, eval_batches=1,
                           spos_budget=3, spos_population=2, spos_eval_batches=1,
                           checkpoint_every=0)
        res = Search(space, data, cfg, out=str(tmp_path / opt), progress=False,
                     log=lambda m: None).run()
        saved = json.loads((tmp_path / opt / "arch.json").read_text())
        if opt == "drnas":
            assert set(saved["decided"]["choices"]) == set(space.choices)
            assert saved["decided"]["overall"]["max_entropy"] > 0
        else:
            assert saved["decided"]["spos"]["scored"] == 3
        assert res["decided"] == saved["decided"]


def test_drnas_concentration_scale_keeps_mean_lowers_noise():
    from tangle_kernels.search.samplers import DrNASSampler, make_sampler

    choices = {"c": [1, 2, 3]}
    a = torch.tensor([0.5, -0.3, 0.0])
    draws = {}
    for scale in (1.0, 20.0):
        s = make_sampler("drnas", choices, concentration_scale=scale)
        with torch.no_grad():
            s.alphas["c"].copy_(a)
        c = F_elu1(a)
        torch.testing.assert_close(s.probs()["c"], c / c.sum())  # mean: scale-free
        g = torch.Generator().manual_seed(0)
        draws[scale] = torch.stack([s.sample(g)["c"].detach() for _ in range(400)])
        torch.testing.assert_close(draws[scale].mean(0), c / c.sum(), atol=0.05, rtol=0)
    assert draws[20.0].std(0).max() < 0.3 * draws[1.0].std(0).min()
    # other samplers ignore the keyword; a bad scale is refused
    assert make_sampler("darts", choices, concentration_scale=5.0).name == "darts"
    with pytest.raises(ValueError):
        DrNASSampler(choices, concentration_scale=0.0)


def F_elu1(a):
    return torch.nn.functional.elu(a) + 1.0


SHAKESPEARE = os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare.txt")


@pytest.mark.skipif(not os.path.isfile(SHAKESPEARE), reason="no ../shared/data/tinyshakespeare.txt")
def test_quick_benchmark_on_a_data_path(tmp_path):
    sq = _load()
    argv = ["--quick", "--data", SHAKESPEARE, "--seeds", "0", "--samplers", "drnas", "spos+random",
            "random-search", "--max-reference", "3", "--reference-sample", "3",
            "--work", str(tmp_path / "w"), "--run-root", str(tmp_path / "r"),
            "--out", str(tmp_path / "o"), "--no-readme", "--tag", "ts"]
    assert sq.main(argv) == 0
    doc = json.loads(next((tmp_path / "o").glob("*-search-quality-ts.json")).read_text())
    assert doc["ident"]["data"].startswith("tinyshakespeare.txt:")
    assert doc["reference"]["n"] == 3
    # a derived arch outside a sampled reference has no from-scratch value, not a wrong one
    for r in doc["runs"]:
        assert (r["percentile"] is None) == (r["scratch_val"] is None)


def test_quick_budgeted_question_ranks_within_the_budget(tmp_path):
    """``--budget-quantile``: the search runs under max_params = that percentile of the
    reference's parameter counts, derives an architecture within it, and is ranked (as
    is random search) among the reference architectures within it only."""
    sq = _load()
    from benchmarks.quality.bench import budget_at

    base = ["--quick", "--seeds", "0", "--work", str(tmp_path / "w"),
            "--run-root", str(tmp_path / "r"), "--out", str(tmp_path / "o"),
            "--no-readme", "--tag", "bq"]
    assert sq.main(base + ["--stage", "reference"]) == 0
    ref = {r["key"]: r for r in map(json.loads, open(tmp_path / "w" / "reference.jsonl"))}
    lim = budget_at(ref, 50)
    assert min(r["params"] for r in ref.values()) <= lim < max(r["params"] for r in ref.values())
    assert sq.main(base + ["--samplers", "drnas", "random-search", "--budget-quantile", "50"]) == 0
    runs = [json.loads(l) for l in open(tmp_path / "w" / "runs.jsonl")]
    assert len(runs) == 1 and runs[0]["config"]["max_params"] == lim
    fit = [r for r in ref.values() if r["params"] <= lim]
    from benchmarks.quality.bench import _key

    got = ref[_key(runs[0]["arch"])]
    assert got["params"] <= lim
    assert runs[0]["percentile"] == pytest.approx(
        100.0 * sum(r["val_loss"] < got["val_loss"] for r in fit) / len(fit), abs=0.01)
    doc = json.loads(next((tmp_path / "o").glob("*-search-quality-bq.json")).read_text())
    rs = [r for r in doc["runs"] if r["method"] == "random-search"]
    assert rs and all(ref[_key(r["arch"])]["params"] <= lim for r in rs)
    with pytest.raises(SystemExit, match="give one"):
        sq.main(base + ["--budget-quantile", "50", "--set", "max_params=100"])
    with pytest.raises(SystemExit, match="quantile"):
        sq.main(base + ["--budget-quantile", "0"])


def test_a_method_set_applies_to_that_methods_runs_only(tmp_path):
    """``--method-set gdas:sandwich=max``: the GDAS runs have it (config, hash, metrics),
    the DrNAS run that sets the time budget does not and is shared with plain GDAS."""
    sq = _load()
    base = ["--quick", "--seeds", "0", "--work", str(tmp_path / "w"),
            "--run-root", str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--no-readme",
            "--tag", "ms"]
    assert sq.main(base + ["--samplers", "drnas", "gdas"]) == 0
    assert sq.main(base + ["--samplers", "drnas", "gdas", "--no-train-reference",
                           "--method-set", "gdas:sandwich=max"]) == 0
    runs = [json.loads(l) for l in open(tmp_path / "w" / "runs.jsonl")]
    assert [r["method"] for r in runs] == ["drnas", "gdas", "gdas"]  # drnas ran once
    plain, sw = runs[1], runs[2]
    assert "sandwich" not in runs[0]["config"] and "sandwich" not in plain["config"]
    assert sw["config"]["sandwich"] == "max" and sw["config_hash"] != plain["config_hash"]
    # the record's metrics path is relative to the repository (bench.ROOT)
    recs = [json.loads(l) for l in open(os.path.join(sq.ROOT, sw["metrics"]))]
    assert recs and all("train_loss_max" in r for r in recs if r.get("kind") == "train")
    probes = json.load(open(tmp_path / "w" / "probes.json"))
    # each GDAS setting has its own step-time probe (GDAS's gradient is always explicit)
    assert len([k for k in probes if k.startswith("gdas|")]) == 2
    assert plain["config"]["gdas_grad"] == sw["config"]["gdas_grad"] == "superposed"
    with pytest.raises(SystemExit, match="METHOD:FIELD=VALUE"):
        sq.main(base + ["--method-set", "drnas:sandwich=max"])
    with pytest.raises(SystemExit, match="METHOD:FIELD=VALUE"):
        sq.main(base + ["--method-set", "sandwich=max"])

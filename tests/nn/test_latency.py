"""The measured latency table (nn/latency.py): per-layer timings summed per architecture
and in expectation like the other costs, the measured remainder, the cache, and the
budget on it (``--max-latency-ms``) in the search driver, with resume.

Timings on a shared 2-core machine are noise, so every exact check replaces the timer
with a deterministic function of the module and its input; one test times for real and
checks only that the table is sane (positive, finite, larger for a larger network)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import tangle_kernels.nn.latency as L
from tangle_kernels.nn.cost import CostError, CostModel
from tangle_kernels.spaces import make_space

CALLS = {"n": 0}


def fake_ms(m, x, device, min_time):
    """A deterministic 'latency': 1 us per parameter plus 1 ns per input element."""
    CALLS["n"] += 1
    return 1e-3 * sum(p.numel() for p in m.parameters()) + 1e-6 * x.numel() + 0.01


def _built(name="nanogpt", preset="tiny"):
    sp = make_space(name, preset=preset)
    data = sp.make_data("synthetic")
    torch.manual_seed(0)
    model = sp.build_supernet(data)
    x, _ = data.batch("val", 1, torch.Generator().manual_seed(0))
    return sp, data, model, x


def fake_many(pairs, device, min_time):
    return [fake_ms(m, x, device, min_time) for m, x in pairs]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(L, "_time_modules", fake_many)
    CALLS["n"] = 0
    return CALLS


@pytest.mark.parametrize("name", ["nanogpt", "conv-macro", "autoformer"])
def test_table_sums_per_architecture_and_in_expectation(fake, name, tmp_path):
    sp, _, model, x = _built(name)
    cm = CostModel(model, sp.choices, example=x)
    info = L.add_latency(cm, model, x, cache=str(tmp_path))
    assert cm.has_latency and 0.25 <= info["scale"] <= 4
    if name == "nanogpt":  # each block of the depth timed whole, its layers not alone
        blocks = [u for u in cm._latency_units if u.path.endswith("#block")]
        assert len(blocks) == max(sp.choices["layers"]) >= 2
        assert all(float(u.latency.max()) > 0 for u in blocks)
        inner = [u for u in cm._units if u.path.startswith("blocks.blocks.")]
        assert inner and all(float(u.latency.abs().max()) == 0 for u in inner)
        # a block the depth does not reach costs nothing: depth 1 prices block 0 only
        i = sp.choices["layers"].index(1)
        assert float(blocks[1].latency.select(blocks[1].names.index("layers"), i).max()) == 0
    # the table is mapped onto the whole models timed (both ends and seeded draws): the
    # stored (scaled) table prices each at scale * unscaled table + rest, with (scale,
    # rest) the least-squares fit over them
    assert {"max", "min"} <= set(info["check"]) and len(info["check"]) >= 3
    # (LAPACK's least squares may differ in the last bit between two calls)
    assert (info["scale"], info["rest_ms"]) == pytest.approx(L._fit_whole(info["check"]),
                                                             rel=1e-12, abs=1e-12)
    for end, c in info["check"].items():
        assert c["rest_ms"] == pytest.approx(c["measured_ms"] - c["table_ms"])
        sel = {n: next(v for v in vals if str(v) == c["arch"][n])
               for n, vals in sp.choices.items()}
        assert cm.latency(sel) == pytest.approx(
            info["scale"] * c["table_ms"] + info["rest_ms"], rel=1e-9)
        if name == "nanogpt":  # this timer is close to the model: the fit is too
            assert cm.latency(sel) == pytest.approx(c["measured_ms"], rel=0.05)
    names = list(sp.choices)
    g = torch.Generator().manual_seed(1)
    probs = {n: torch.softmax(torch.randn(len(v), generator=g, dtype=torch.float64), 0)
             for n, v in sp.choices.items()}
    brute = 0.0
    for combo in itertools.product(*[range(len(sp.choices[n])) for n in names]):
        sel = {n: sp.choices[n][i] for n, i in zip(names, combo)}
        p = math.prod(float(probs[n][i]) for n, i in zip(names, combo))
        brute += p * cm.latency(sel)
    assert float(cm.expected(probs, "latency")) == pytest.approx(brute, rel=1e-9)
    # a larger architecture is slower under this timer (more parameters, wider inputs)
    small = {n: min(v) for n, v in sp.choices.items()}
    big = {n: max(v) for n, v in sp.choices.items()}
    assert cm.latency(big) > cm.latency(small) > 0


def test_expected_latency_gradient_equals_finite_differences(fake, tmp_path):
    sp, _, model, x = _built()
    cm = CostModel(model, sp.choices, example=x)
    L.add_latency(cm, model, x, cache=False)
    g = torch.Generator().manual_seed(3)
    logits = tuple(torch.randn(len(v), generator=g, dtype=torch.float64, requires_grad=True)
                   for v in sp.choices.values())

    def f(*ls):
        return cm.expected({n: torch.softmax(a, 0) for n, a in zip(sp.choices, ls)}, "latency")

    assert torch.autograd.gradcheck(f, logits, eps=1e-6, atol=1e-6, rtol=1e-6)


def test_the_cache_is_read_back_and_a_broken_file_is_measured_again(fake, tmp_path):
    sp, _, model, x = _built()
    cm = CostModel(model, sp.choices, example=x)
    L.add_latency(cm, model, x, cache=str(tmp_path))
    measured = fake["n"]
    assert measured > 0
    sel = {n: v[-1] for n, v in sp.choices.items()}
    cm2 = CostModel(model, sp.choices, example=x)
    info = L.add_latency(cm2, model, x, cache=str(tmp_path))
    assert fake["n"] == measured and info["cached"].startswith(str(tmp_path))
    assert cm2.latency(sel) == cm.latency(sel)
    # the table travels as plain data (DDP rank 0 -> the others, the checkpoint)
    cm3 = CostModel(model, sp.choices, example=x)
    L.attach(cm3, json.loads(json.dumps(L.table_of(cm))), model)
    assert cm3.latency(sel) == cm.latency(sel)
    (path,) = list(tmp_path.glob("*.json"))
    path.write_text("{not json")
    L.add_latency(CostModel(model, sp.choices, example=x), model, x, cache=str(tmp_path))
    assert fake["n"] == 2 * measured


def test_latency_queries_without_a_table_are_refused():
    sp, _, model, x = _built()
    cm = CostModel(model, sp.choices, example=x)
    with pytest.raises(CostError, match="latency needs a measured table"):
        cm.latency({n: v[0] for n, v in sp.choices.items()})
    with pytest.raises(CostError, match="latency table: no timings"):
        L.attach(cm, {"info": {"rest_ms": 0.0}, "tables": {}})


def test_a_real_table_is_sane(tmp_path):
    sp, _, model, x = _built()
    cm = CostModel(model, sp.choices, example=x)
    info = L.add_latency(cm, model, x, cache=False, min_time=0.001)
    small = {n: min(v) for n, v in sp.choices.items()}
    big = {n: max(v) for n, v in sp.choices.items()}
    for sel in (small, big):
        t = cm.latency(sel)
        assert math.isfinite(t) and t > 0
    assert info["measure_s"] < 60
    assert all(math.isfinite(c["measured_ms"]) and c["measured_ms"] > 0
               for c in info["check"].values())


# ------------------------------------------------------------------ the search driver
def test_search_under_a_latency_budget_and_resume(fake, tmp_path, monkeypatch):
    from tangle_kernels.search import Search, SearchConfig

    monkeypatch.setenv("TANGLE_CACHE", str(tmp_path / "cache"))
    sp, data, model, x = _built()
    cm = CostModel(model, sp.choices, example=x)
    L.add_latency(cm, model, x, cache=False)
    lats = sorted(cm.latency(dict(zip(sp.choices, c)))
                  for c in itertools.product(*sp.choices.values()))
    limit = lats[len(lats) // 4]
    cfg = SearchConfig(sampler="drnas", steps=4, batch_size=4, eval_batches=1,
                       checkpoint_every=0, max_latency_ms=limit, budget_mode="lagrange")
    res = Search(sp, data, cfg, out=str(tmp_path / "a"), progress=False,
                 log=lambda m: None).run()
    doc = json.loads((tmp_path / "a" / "arch.json").read_text())
    assert doc["budget"] == {"max_latency_ms": limit}
    assert doc["costs"]["latency"] <= limit
    assert doc["costs"]["latency"] == pytest.approx(cm.latency(res["arch"]))
    assert math.isfinite(doc["latency_table"]["rest_ms"]) and "check" in doc["latency_table"]
    assert doc["latency_table"]["scale"] > 0
    recs = [json.loads(r) for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("lambda_latency" in r for r in recs if r.get("kind") == "train")
    # interrupted and resumed: the checkpoint's table prices the rest of the run
    s = Search(sp, data, cfg, out=str(tmp_path / "b"), progress=False, log=lambda m: None,
               on_step=lambda search, step: search.request_stop() if step == 1 else None)
    with pytest.raises(KeyboardInterrupt):
        s.run()
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert json.loads(ck["latency_table"])["tables"]
    Search(sp, data, cfg, out=str(tmp_path / "b"), resume=True, progress=False,
           log=lambda m: None).run()
    doc2 = json.loads((tmp_path / "b" / "arch.json").read_text())
    assert doc2["arch"] == doc["arch"] and doc2["costs"] == doc["costs"]


def test_a_latency_budget_nothing_fits_is_refused_with_the_flag(fake, tmp_path, capsys,
                                                               monkeypatch):
    from cli_util import assert_one_error, run_cli

    monkeypatch.setenv("TANGLE_CACHE", str(tmp_path / "cache"))
    rc, _, err = run_cli(["--space", "nanogpt", "--preset", "tiny", "--data", "synthetic",
                          "--steps", "2", "--batch-size", "4", "--max-latency-ms", "1e-6",
                          "--out", str(tmp_path / "r"), "--no-progress"], capsys)
    assert_one_error(rc, err, "budget: no architecture of the space fits --max-latency-ms 1e-06")


class _TinyLM(torch.nn.Module):
    """A stock model (plain torch modules), made a supernet by entangle()."""

    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(11, 8)
        self.ln = torch.nn.LayerNorm(8)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 8)
        self.head = torch.nn.Linear(8, 11, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        x = x + self.fc2(torch.relu(self.fc1(self.ln(x))))
        return self.head(x)


def test_a_model_made_by_entangle_gets_a_table(fake):
    import tangle_kernels.nn as tnn

    choices = {"embed": (4, 8), "ratio": (1, 2)}
    dims = {"wte.embedding_dim": "embed", "ln.normalized_shape": "embed",
            "fc1.in_features": "embed", "fc1.out_features": ("embed", "ratio"),
            "fc2.in_features": ("embed", "ratio"), "fc2.out_features": "embed",
            "head.in_features": "embed"}
    sup = tnn.entangle(_TinyLM(), choices, dims)
    idx = torch.randint(0, 11, (1, 5))
    cm = CostModel(sup, choices, example=idx)
    L.add_latency(cm, sup, idx, cache=False)
    assert not cm._latency_units  # no depth: every layer timed alone
    for combo in itertools.product(*choices.values()):
        sel = dict(zip(choices, combo))
        # the table: each layer's fake time at its own width, with the input it saw
        want = 0.0
        plain = tnn.extract(sup, sel)
        shapes = {"wte": idx, "ln": torch.zeros(1, 5, sel["embed"]),
                  "fc1": torch.zeros(1, 5, sel["embed"]),
                  "fc2": torch.zeros(1, 5, sel["embed"] * sel["ratio"]),
                  "head": torch.zeros(1, 5, sel["embed"])}
        for name, x in shapes.items():
            want += fake_ms(getattr(plain, name), x, None, None)
        assert cm.latency(sel) - cm.latency_info["rest_ms"] == pytest.approx(
            cm.latency_info["scale"] * want)


def test_a_layer_whose_input_cannot_be_built_is_refused():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(CostError, match="cannot tell the input width"):
        L._input_for(torch.nn.ReLU(), (1, 4), torch.float32, torch.device("cpu"), g, "act")
    with pytest.raises(CostError, match="integer inputs but is not an embedding"):
        L._input_for(torch.nn.Linear(2, 2), (1, 4), torch.int64, torch.device("cpu"), g, "fc")


def test_the_whole_model_fit_is_least_squares_and_falls_back_when_it_cannot_tell():
    whole = {"max": {"measured_ms": 10.0, "table_ms": 8.0, "rest_ms": 2.0},
             "min": {"measured_ms": 3.0, "table_ms": 2.0, "rest_ms": 1.0}}
    scale, rest = L._fit_whole(whole)  # two models: exact at both
    assert scale * 8.0 + rest == pytest.approx(10.0) and scale * 2.0 + rest == pytest.approx(3.0)
    # more models on one line: recovered exactly; one off the line: the fit minimises the
    # squared relative error (checked against a brute-force grid)
    line = {f"m{i}": {"measured_ms": 1.5 * t + 0.2, "table_ms": t, "rest_ms": 0.0}
            for i, t in enumerate([0.5, 1.0, 1.7, 2.2, 3.0])}
    assert L._fit_whole(line) == (pytest.approx(1.5), pytest.approx(0.2))
    line["m9"] = {"measured_ms": 2.4, "table_ms": 1.2, "rest_ms": 0.0}

    def sse(sc, r):
        return sum(((sc * w["table_ms"] + r) / w["measured_ms"] - 1) ** 2 for w in line.values())

    sc, r = L._fit_whole(line)
    assert all(sse(sc, r) <= sse(sc + da, r + db) + 1e-12
               for da in (-1e-3, 0, 1e-3) for db in (-1e-3, 0, 1e-3))
    # models too close to tell (one table value) or an absurd slope: the mean remainder
    same = {"max": {"measured_ms": 3.0, "table_ms": 2.0, "rest_ms": 1.0},
            "min": {"measured_ms": 2.5, "table_ms": 2.0, "rest_ms": 0.5}}
    assert L._fit_whole(same) == (1.0, pytest.approx(0.75))
    wild = {"max": {"measured_ms": 100.0, "table_ms": 2.1, "rest_ms": 97.9},
            "min": {"measured_ms": 1.0, "table_ms": 2.0, "rest_ms": -1.0}}
    assert L._fit_whole(wild)[0] == 1.0


def test_the_models_timed_whole_are_the_ends_and_distinct_seeded_draws():
    choices = {"a": [1, 2, 3], "b": [4, 8], "act": ["relu", "gelu"]}
    got = L._fit_archs(choices, 4)
    assert got[0] == ("max", {"a": 3, "b": 8, "act": "relu"})
    assert got[1] == ("min", {"a": 1, "b": 4, "act": "relu"})
    assert len(got) == 6 and len({tuple(sorted(s.items())) for _, s in got}) == 6
    assert got == L._fit_archs(choices, 4)  # the same on every call
    assert len(L._fit_archs(choices, 100)) == 12  # never more than the space has
    assert len(L._fit_archs(choices, 0)) == 2


def test_time_many_interleaves_rounds_and_keeps_the_fastest():
    import time as _time

    order = []

    def slow_then_fast(tag, waits):
        it = iter(waits)

        def fn():
            order.append(tag)
            _time.sleep(next(it, waits[-1]))
        return fn

    # a: 2 ms except one 30 ms hiccup in its rounds; b: always 1 ms
    a = slow_then_fast("a", [0.002] * 6 + [0.03] + [0.002] * 100)
    b = slow_then_fast("b", [0.001])
    ms = L.time_many([a, b], min_time=0.0, rounds=4, warmup=1)
    # the fastest round: the hiccup is not in a's time
    assert 2.0 <= ms[0] < 12.0 and 1.0 <= ms[1] < 10.0
    # after warm-up and calibration (one call each at min_time 0), rounds alternate a, b
    timed = order[-8:]
    assert timed == ["a", "b"] * 4
    assert L.time_ms(b, min_time=0.0, rounds=2, warmup=0) >= 1.0

"""Architecture samplers (tangle_kernels.search.samplers) and SPOS selection
(tangle_kernels.search.evolution): the distributional properties each sampler
promises, its gradient, and determinism under an explicit generator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tangle_kernels.nn.arch import HardArch
from tangle_kernels.search.evolution import evolution, random_search
from tangle_kernels.search.samplers import (
    SAMPLERS,
    DartsSampler,
    DrNASSampler,
    GDASSampler,
    SparsemaxSampler,
    SPOSSampler,
    linear_tau,
    make_sampler,
    sparsemax,
)

CHOICES = {"embed": [16, 24, 32], "heads": [2, 4], "ratio": [2, 3, 4, 6, 8], "one": [7]}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomize(sampler, scale=2.0, seed=1):
    g = _gen(seed)
    with torch.no_grad():
        for a in sampler.alphas.values():
            a.copy_(scale * torch.randn(a.shape, generator=g))
    return sampler


# ------------------------------------------------------------------ simplex samplers


#: samplers whose archs are dense soft mixtures (every weight > 0), from the registry
DENSE = [n for n, c in SAMPLERS.items() if c.trains_arch and not c.hard and not c.find_unused()]
#: samplers that draw noise (the deterministic relaxations are the unrolled-capable ones)
STOCHASTIC = [n for n, c in SAMPLERS.items() if not c.supports_unrolled]


@pytest.mark.parametrize("name", DENSE)
def test_weights_positive_and_sum_to_one(name):
    s = _randomize(make_sampler(name, CHOICES, generator=_gen()))
    g = _gen(3)
    for _ in range(20):
        arch = s.sample(g)
        assert set(arch) == set(CHOICES)
        for n, w in arch.items():
            assert w.shape == (len(CHOICES[n]),)
            assert (w > 0).all(), (n, w)
            assert float(w.detach().sum()) == pytest.approx(1.0, abs=1e-6)
    for p in s.probs().values():
        assert (p > 0).all() and float(p.sum()) == pytest.approx(1.0, abs=1e-6)


def _sparsemax_oracle(z: torch.Tensor) -> torch.Tensor:
    """argmin_p ||p - z||^2 over the simplex, by bisection on the threshold tau."""
    z = z.double()
    lo, hi = float(z.min()) - 1.0, float(z.max())
    for _ in range(200):
        tau = 0.5 * (lo + hi)
        if float(torch.clamp(z - tau, min=0).sum()) > 1.0:
            lo = tau
        else:
            hi = tau
    return torch.clamp(z - 0.5 * (lo + hi), min=0)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_sparsemax_matches_projection_oracle(n):
    g = _gen(n)
    for scale in (0.1, 1.0, 5.0):
        z = scale * torch.randn(n, generator=g, dtype=torch.float64)
        p = sparsemax(z)
        torch.testing.assert_close(p, _sparsemax_oracle(z), atol=1e-9, rtol=0)
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
        assert (p >= 0).all()


def test_sparsemax_sums_to_one_with_zeros():
    s = SparsemaxSampler(CHOICES, generator=_gen())
    with torch.no_grad():
        s.alphas["ratio"].copy_(torch.tensor([3.0, 0.1, -1.0, 2.5, -4.0]))
    w = s.sample()["ratio"]
    assert float(w.detach().sum()) == pytest.approx(1.0, abs=1e-6)
    assert (w == 0).sum() >= 2, w  # exact zeros: sparse
    assert (w >= 0).all()
    torch.testing.assert_close(
        w.double(), _sparsemax_oracle(s.alphas["ratio"].detach()), atol=1e-6, rtol=0
    )


def test_sparsemax_jacobian():
    z = torch.tensor([1.2, 0.9, -0.5, 0.7], dtype=torch.float64, requires_grad=True)
    p = sparsemax(z)
    supp = (p > 0).double()
    want = torch.diag(supp) - torch.outer(supp, supp) / supp.sum()
    jac = torch.autograd.functional.jacobian(sparsemax, z.detach())
    torch.testing.assert_close(jac, want)


def test_drnas_is_reparameterised_dirichlet():
    """Samples follow Dirichlet(elu(alpha) + 1) (mean, covariance and E[log w], which a
    distribution with the right mean but another spread fails), and the pathwise
    gradient is the reparameterisation gradient: its average over draws is the gradient
    of the expectation, checked on a non-linear function (E[w_i^2] in closed form)."""
    s = DrNASSampler({"c": [1, 2, 3]}, generator=_gen())
    with torch.no_grad():
        s.alphas["c"].copy_(torch.tensor([0.5, -0.3, 1.5]))
    conc = F.elu(s.alphas["c"].detach()) + 1
    c0 = conc.sum()
    mean = conc / c0
    g = _gen(7)
    n = 4000
    draws = torch.stack([s.sample(g)["c"].detach() for _ in range(n)])
    # Dirichlet mean c / sum(c); standard error of the mean < 0.01 here
    torch.testing.assert_close(draws.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(s.probs()["c"], mean)
    # covariance (diag(m) - m m^T) / (c0 + 1): entries up to 0.043, standard error ~0.001
    cov = (torch.diag(mean) - torch.outer(mean, mean)) / (c0 + 1)
    torch.testing.assert_close(torch.cov(draws.T), cov, atol=0.005, rtol=0)
    # E[log w_i] = digamma(c_i) - digamma(c0); standard error < 0.025
    torch.testing.assert_close(draws.log().mean(0), torch.digamma(conc) - torch.digamma(c0), atol=0.1, rtol=0)
    # pathwise gradient reaches every alpha
    w = s.sample(_gen(8))["c"]
    (w * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    grad = s.alphas["c"].grad
    assert grad is not None and torch.isfinite(grad).all() and (grad != 0).all()
    # ... and is unbiased: mean over draws of d f(w) / d alpha = d E[f(w)] / d alpha for
    # f(w) = sum v_i w_i^2, E[w_i^2] = c_i (c_i + 1) / (c0 (c0 + 1)); values ~0.03-0.2,
    # Monte Carlo error ~1e-3 at 2000 draws
    v = torch.tensor([1.0, -2.0, 0.5])
    s.alphas["c"].grad = None
    g = _gen(9)
    m = 2000
    total = sum((v * s.sample(g)["c"] ** 2).sum() for _ in range(m))
    (total / m).backward()
    a = s.alphas["c"].detach().clone().requires_grad_(True)
    c = F.elu(a) + 1
    (exact,) = torch.autograd.grad((v * c * (c + 1) / (c.sum() * (c.sum() + 1))).sum(), a)
    torch.testing.assert_close(s.alphas["c"].grad, exact, atol=0.01, rtol=0)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_same_generator_same_sample(name):
    s = _randomize(make_sampler(name, CHOICES, generator=_gen(), total_steps=10))
    a = s.sample(_gen(42), step=3)
    b = s.sample(_gen(42), step=3)
    c = s.sample(_gen(43), step=3)
    for n in CHOICES:
        assert torch.equal(a[n], b[n])
    assert (
        any(not torch.equal(a[n], c[n]) for n in CHOICES if len(CHOICES[n]) > 1) or name == "spos"
    )


def test_alpha_init_is_seeded_and_small():
    a = DartsSampler(CHOICES, generator=_gen(5)).state_dict()
    b = DartsSampler(CHOICES, generator=_gen(5)).state_dict()
    for n in CHOICES:
        assert torch.equal(a[n], b[n])
        assert a[n].abs().max() < 1e-2


# -------------------------------------------------------------------------- GDAS


def _gumbel(shape, g):
    u = torch.rand(shape, generator=g)
    eps = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp(eps, 1.0 - 1e-7)))


def test_gdas_forward_exactly_one_hot_with_straight_through_grads():
    s = _randomize(GDASSampler(CHOICES, tau_max=5.0, tau_min=0.5, total_steps=11, generator=_gen()))
    step = 4
    g = _gen(11)
    arch = s.sample(g, step=step)
    assert isinstance(arch, HardArch)
    coef = {n: torch.randn(len(v)) for n, v in CHOICES.items()}
    for n, w in arch.items():
        i = arch.index[n]
        expect = torch.zeros(len(CHOICES[n]))
        expect[i] = 1.0
        assert torch.equal(w.detach(), expect), (n, w)  # exactly one-hot, bit for bit
    loss = sum((arch[n] * coef[n]).sum() for n in CHOICES)
    loss.backward()
    # oracle: the gradient of softmax((alpha + g) / tau) with the same Gumbel noise
    g2 = _gen(11)
    tau = linear_tau(step, 11, 5.0, 0.5)
    assert s.tau(step) == pytest.approx(tau)
    for n in CHOICES:  # same iteration order as the sampler (insertion order)
        a = s.alphas[n].detach().clone().requires_grad_(True)
        gn = _gumbel(a.shape, g2)
        assert arch.index[n] == int(torch.argmax(a.detach() + gn))
        (F.softmax((a + gn) / tau, 0) * coef[n]).sum().backward()
        torch.testing.assert_close(s.alphas[n].grad, a.grad)
        if len(CHOICES[n]) > 1:
            assert (s.alphas[n].grad != 0).any(), n


def test_temperature_schedule_endpoints():
    assert linear_tau(0, 100, 10.0, 0.1) == pytest.approx(10.0)
    assert linear_tau(99, 100, 10.0, 0.1) == pytest.approx(0.1)
    assert linear_tau(500, 100, 10.0, 0.1) == pytest.approx(0.1)  # clamped after the end
    mid = linear_tau(50, 101, 10.0, 0.1)
    assert mid == pytest.approx(0.5 * (10.0 + 0.1))
    taus = [linear_tau(t, 100, 10.0, 0.1) for t in range(100)]
    assert all(a > b for a, b in zip(taus, taus[1:]))  # strictly decreasing
    s = GDASSampler({"c": [1, 2]}, tau_max=4.0, tau_min=0.2, total_steps=7)
    assert s.tau(0) == pytest.approx(4.0) and s.tau(6) == pytest.approx(0.2)
    assert s.extra_metrics(6) == {"tau": pytest.approx(0.2)}
    with pytest.raises(ValueError, match="positive"):
        GDASSampler({"c": [1, 2]}, tau_min=0.0)


# -------------------------------------------------------------------------- SPOS


def test_spos_uniform_one_hot_and_no_arch_gradient():
    s = SPOSSampler(CHOICES, generator=_gen())
    assert s.parameters() == [] and not s.trains_arch
    assert all(not a.requires_grad for a in s.alphas.values())
    g = _gen(2)
    counts = torch.zeros(len(CHOICES["ratio"]))
    n = 3000
    for _ in range(n):
        arch = s.sample(g)
        assert isinstance(arch, HardArch)
        for w in arch.values():
            assert not w.requires_grad and w.grad_fn is None
            assert float(w.sum()) == 1.0 and int((w == 1).sum()) == 1
        counts[arch.index["ratio"]] += 1
    # chi-square goodness of fit to uniform, 4 dof: P(chi2 > 18.5) ~ 0.001
    exp = n / len(counts)
    chi2 = float(((counts - exp) ** 2 / exp).sum())
    assert chi2 < 18.5, counts
    for p in s.probs().values():
        assert torch.allclose(p, torch.full_like(p, 1.0 / p.numel()))


# -------------------------------------------------------------------- derive/misc


def test_derive_is_argmax_per_choice():
    s = DartsSampler(CHOICES)
    with torch.no_grad():
        s.alphas["embed"].copy_(torch.tensor([0.0, 2.0, 1.0]))
        s.alphas["ratio"].copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0]))
    sel = s.derive()
    assert sel["embed"] == 24 and sel["ratio"] == 8 and sel["one"] == 7


def test_state_dict_roundtrip_and_errors():
    s = _randomize(DrNASSampler(CHOICES))
    t = DrNASSampler(CHOICES)
    t.load_state_dict(s.state_dict())
    for n in CHOICES:
        assert torch.equal(s.alphas[n], t.alphas[n])
    with pytest.raises(ValueError, match="choices differ"):
        DrNASSampler({"x": [1, 2]}).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_sampler("nope", CHOICES)
    with pytest.raises(ValueError, match="empty"):
        DartsSampler({})
    assert set(SAMPLERS) == {"darts", "sparsemax", "drnas", "gdas", "spos", "snas"}


# ------------------------------------------------------------------ SPOS selection

GRID = {"a": [0, 1, 2, 3], "b": [0, 1, 2], "c": [0, 1, 2, 3, 4]}


def _score(sel):  # unique optimum at a=2, b=1, c=3
    return (sel["a"] - 2) ** 2 + (sel["b"] - 1) ** 2 + 0.5 * (sel["c"] - 3) ** 2


@pytest.mark.parametrize("fn", [evolution, random_search])
def test_selection_is_deterministic_distinct_and_good(fn):
    calls = []

    def score(sel):
        calls.append(dict(sel))
        return _score(sel)

    best, s, hist = fn(GRID, score, budget=30, seed=3)
    assert len(hist) == 30 == len(calls)
    keys = {tuple(sorted(h[0].items())) for h in hist}
    assert len(keys) == 30  # never scores a selection twice
    assert s == min(h[1] for h in hist) and _score(best) == s
    best2, s2, hist2 = fn(GRID, _score, budget=30, seed=3)
    assert best2 == best and [h[0] for h in hist2] == [h[0] for h in hist]


BIG = {n: list(range(6)) for n in "abcdef"}  # 6^6 = 46656 selections
BIG_OPT = {"a": 2, "b": 4, "c": 1, "d": 5, "e": 0, "f": 3}


def _big_score(sel):
    return sum((sel[n] - BIG_OPT[n]) ** 2 for n in BIG)


def test_evolution_finds_the_optimum_and_respects_small_spaces():
    """200 evaluations of 46656 selections: evolution reaches the unique optimum on
    every seed (about 95% of seeds in general); uniform random search finds it with
    probability 200 / 46656 = 0.4% and gets within 1 on about 2.5% of seeds, so a
    selection that has degraded into random search fails here."""
    found = [evolution(BIG, _big_score, budget=200, population=10, seed=sd) for sd in range(5)]
    assert [s for _, s, _ in found] == [0.0] * 5, [(b, s) for b, s, _ in found]
    assert all(b == BIG_OPT and len(h) == 200 for b, _, h in found)
    # random search with the same budget does not pass this test (it is not too easy)
    rand = [random_search(BIG, _big_score, budget=200, seed=sd)[1] for sd in range(5)]
    assert min(rand) > 1, rand
    # the small grid still: the optimum or a neighbour
    best, s, _ = evolution(GRID, _score, budget=40, population=8, seed=0)
    assert s <= 0.5, (best, s)
    tiny = {"a": [1, 2], "b": [3]}
    best, s, hist = evolution(tiny, lambda sel: -sel["a"], budget=50, seed=0)
    assert len(hist) == 2 and best == {"a": 2, "b": 3}
    assert math.isclose(s, -2)


def _big_fits(sel):  # about a fifth of BIG; its optimum lies outside
    return sum(sel.values()) <= 12


def test_constrained_selection_scores_only_what_fits_and_counts_only_that():
    """Under ``fits`` every evaluation goes to a selection that fits (none scored that
    does not, none counted against the budget), and evolution finds the constrained
    optimum where random search with the same evaluations does not."""
    feasible_best = min(_big_score(dict(zip(BIG, v))) for v in __import__("itertools").product(
        *BIG.values()) if sum(v) <= 12)
    for fn in (evolution, random_search):
        calls = []

        def score(sel):
            calls.append(dict(sel))
            return _big_score(sel)

        best, s, hist = fn(BIG, score, budget=150, seed=1, fits=_big_fits)
        assert len(hist) == len(calls) == 150  # the budget is spent on what fits
        assert all(_big_fits(c) for c in calls) and _big_fits(best)
        assert s == min(h[1] for h in hist) >= feasible_best
    found = [evolution(BIG, _big_score, budget=150, seed=sd, fits=_big_fits)[1]
             for sd in range(4)]
    rand = [random_search(BIG, _big_score, budget=150, seed=sd, fits=_big_fits)[1]
            for sd in range(4)]
    assert sum(found) < sum(rand) and min(found) == feasible_best, (found, rand)
    # fewer that fit than the budget: each scored once, then it stops (small space)
    few = lambda sel: sel["a"] + sel["b"] <= 1  # noqa: E731  (3 of 12 for a, b; c free)
    for fn in (evolution, random_search):
        best, s, hist = fn(GRID, _score, budget=50, seed=0, fits=few)
        assert len(hist) == 3 * 5 and all(few(h[0]) for h in hist)
        assert best == {"a": 1, "b": 0, "c": 3}
    # none fits: no selection, no evaluation
    for fn in (evolution, random_search):
        best, s, hist = fn(GRID, _score, budget=10, seed=0, fits=lambda sel: False)
        assert best is None and s == math.inf and hist == []


def test_a_nan_score_is_never_the_best_and_all_nan_is_refused():
    """A supernet loss of NaN for one architecture ranks it last (min() would keep a NaN
    met first); SPOS refuses a selection where every score is non-finite."""
    from tangle_kernels.search.config import SearchConfig, SearchError
    from tangle_kernels.search.samplers import make_sampler
    from tangle_kernels.search.samplers.base import SelectionContext

    for fn in (evolution, random_search):
        for sd in range(3):
            seen = []

            def score(sel):  # the first selection scored is NaN
                seen.append(dict(sel))
                return math.nan if len(seen) == 1 else _score(sel)

            best, s, hist = fn(GRID, score, budget=12, seed=sd)
            assert best != seen[0] and math.isfinite(s) and s == _score(best)
    cfg = SearchConfig(sampler="spos", spos_budget=5, spos_population=2)
    sp = make_sampler("spos", GRID)
    ctx = SelectionContext(cfg=cfg, score=lambda sel, n: math.nan, seed=0, log=lambda m: None)
    with pytest.raises(SearchError, match="non-finite supernet validation loss"):
        sp.select(ctx)
    ok = SelectionContext(cfg=cfg, score=lambda sel, n: _score(sel), seed=0, log=lambda m: None)
    sel, hist = sp.select(ok)
    assert len(hist) == 5 and _score(sel) == min(h["score"] for h in hist)


def test_a_tight_constraint_in_a_large_space_starts_from_one_that_fits():
    """8 of 6^7 selections fit: random draws find none, and evolution seeded with one
    that fits (SPOS passes the constrained argmax) finds the constrained optimum."""
    from tangle_kernels.search.config import SearchConfig
    from tangle_kernels.search.samplers import make_sampler
    from tangle_kernels.search.samplers.base import SelectionContext

    big = {n: list(range(6)) for n in "abcdefg"}
    fits = lambda sel: sum(sel.values()) <= 1  # noqa: E731
    score = lambda sel: sel["a"] - sel["g"]  # noqa: E731  (optimum g=1, the rest 0)
    assert evolution(big, score, budget=20, seed=0, fits=fits)[0] is None
    zero = {n: 0 for n in big}
    best, s, hist = evolution(big, score, budget=20, seed=0, fits=fits, initial=[zero])
    assert best == {**zero, "g": 1} and s == -1 and hist[0][0] == zero
    assert len(hist) == 8 and all(fits(h[0]) for h in hist)
    for wrong in ({**zero, "g": 9}, {"a": 0}, {**zero, "z": 0}):
        with pytest.raises(ValueError, match="not a selection of the choices"):
            evolution(big, score, budget=20, seed=0, fits=fits, initial=[wrong])
    cfg = SearchConfig(sampler="spos", spos_budget=20, spos_population=4)
    ctx = SelectionContext(cfg=cfg, score=lambda sel, n: score(sel), seed=0,
                           log=lambda m: None, fits=fits, best_within=lambda probs: zero)
    sel, _ = make_sampler("spos", big).select(ctx)
    assert sel == {**zero, "g": 1}

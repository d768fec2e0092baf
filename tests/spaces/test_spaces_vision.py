"""The vision search spaces (conv-macro, entangled-cell, nb201, darts, autoformer,
mobilenetv3) on tiny presets with synthetic data: search steps with every sampler,
architecture gradients, derive + extract equal to the one-hot supernet, parameter and
MAC formulas against the extracted plain model, genotype keys, the driver end to end,
and the conv-macro memory measurement (entangled vs padded-sum as K grows)."""

import json
import random

import pytest
import torch

import tangle_kernels.nn as tnn
from tangle_kernels.nn.base import EntangledModule
from tangle_kernels.search.samplers import make_sampler
from tangle_kernels.spaces import SpaceError, make_space
from tangle_kernels.spaces._vision import count_macs, count_params

SPACES = ["conv-macro", "entangled-cell", "nb201", "darts", "autoformer", "mobilenetv3"]
SAMPLERS = ["darts", "sparsemax", "drnas", "gdas", "spos"]

_CACHE: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions run faster on one thread (and do not thrash a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(name):
    """(space, data, supernet) of the tiny preset, built once per module (the layouts'
    tables are built on first use; rebuilding per test would repeat that cost)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        sp = make_space(name, preset="tiny")
        data = sp.make_data("synthetic")
        _CACHE[name] = (sp, data, sp.build_supernet(data))
    return _CACHE[name]


def _detach(arch):
    if isinstance(arch, tnn.HardArch):
        return tnn.HardArch({n: v.detach() for n, v in arch.items()}, arch.index)
    return {n: v.detach() for n, v in arch.items()}


@pytest.mark.parametrize("opt", SAMPLERS)
@pytest.mark.parametrize("name", SPACES)
def test_search_steps_derive_extract(name, opt):
    sp, data, model = tiny(name)
    g = torch.Generator().manual_seed(1)
    sampler = make_sampler(opt, sp.choices, init_scale=1e-3, generator=g, total_steps=2)
    w_opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for step in range(2):
        arch = sampler.sample(g, step)
        tnn.set_arch(model, arch)
        lv = sp.loss(model, data.batch("val", 4, g))
        if sampler.trains_arch:
            alphas = sampler.parameters()
            for a in alphas:
                a.grad = None
            lv.backward(inputs=alphas)
            grads = {n: a.grad for n, a in sampler.alphas.items()}
            if opt != "gdas":  # soft archs reach every choice
                assert all(gr is not None for gr in grads.values()), opt
            else:  # a hard sample skips the choices of blocks beyond its depth (MobileNetV3)
                assert sum(gr is not None for gr in grads.values()) >= len(grads) // 2
            got = [gr for gr in grads.values() if gr is not None]
            assert all(torch.isfinite(gr).all() for gr in got)
            assert sum(float(gr.abs().sum()) for gr in got) > 0
        else:
            assert sampler.parameters() == []
            assert not any(v.requires_grad for v in arch.values())
        tnn.set_arch(model, _detach(arch))
        w_opt.zero_grad()
        loss = sp.loss(model, data.batch("train", 4, g))
        loss.backward()
        w_opt.step()
        assert torch.isfinite(loss)
    tnn.set_arch(model, None)
    # derive + extract == the supernet under the one-hot arch
    sel = sp.check_selection(sampler.derive())
    x, _ = data.batch("val", 3, torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        tnn.set_arch(model, sp.hard_arch(sel))
        y_super = model(x)
        tnn.set_arch(model, None)
        plain = sp.extract(model, sel).eval()
        assert not any(isinstance(m, EntangledModule) for m in plain.modules())
        torch.testing.assert_close(plain(x), y_super, rtol=1e-5, atol=1e-5)
    model.train()


@pytest.mark.parametrize("name", SPACES)
def test_params_and_macs_formula(name):
    sp, data, model = tiny(name)
    rng = random.Random(name)
    x, _ = data.batch("val", 2, torch.Generator().manual_seed(0))
    sels = [{n: max(v) if isinstance(v[0], (int, float)) else v[-1] for n, v in sp.choices.items()}]
    sels += [{n: rng.choice(v) for n, v in sp.choices.items()} for _ in range(3)]
    for sel in sels:
        plain = sp.extract(model, sel)
        assert sp.arch_params(sel) == count_params(plain), sel
        assert sp.arch_macs(sel) == count_macs(plain, x), sel
        # build_plain (fresh init) has the same architecture
        fresh = sp.build_plain(sel, data)
        assert count_params(fresh) == count_params(plain)


DRIVER_OPT = dict(zip(SPACES, ["darts", "gdas", "spos", "sparsemax", "drnas", "darts"]))


@pytest.mark.parametrize("name", SPACES)
def test_driver_end_to_end(name, tmp_path):
    from tangle_kernels.search.engine import Search, SearchConfig

    sp = make_space(name, preset="tiny")
    data = sp.make_data("synthetic")
    cfg = SearchConfig(optimizer=DRIVER_OPT[name], steps=2, batch_size=4, eval_batches=1,
                       spos_budget=3, spos_population=2, spos_eval_batches=1,
                       checkpoint_every=0)
    res = Search(sp, data, cfg, out=str(tmp_path), progress=False, log=lambda m: None).run()
    doc = json.loads((tmp_path / "arch.json").read_text())
    sel = sp.check_selection(doc["arch"])
    assert res["params"] == sp.arch_params(sel)
    assert set(doc["val"]) == {"loss", "acc"} and 0 <= doc["val"]["acc"] <= 100


def test_space_sizes_and_keys():
    cm = make_space("conv-macro")
    assert cm.num_architectures() == 6561
    sel = {"c1": 8, "c2": 16, "c3": 32, "c4": 64, "k1": 5, "k2": 3, "k3": 3, "k4": 3}
    assert cm.genotype_key(sel) == "[[8, 16, 32, 64], [5, 3, 3, 3]]"
    ec = make_space("entangled-cell")
    assert ec.num_architectures() == 4096
    sel = {"normal_0": "sep_conv_3x3", "normal_1": "sep_conv_5x5", "normal_2": "dil_conv_3x3",
           "reduce_0": "dil_conv_5x5", "reduce_1": "sep_conv_3x3", "reduce_2": "dil_conv_5x5"}
    assert ec.genotype_key(sel) == (
        "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_5x5', 0), ('dil_conv_3x3', 1)], "
        "normal_concat=range(1, 3), reduce=[('dil_conv_5x5', 0), ('sep_conv_3x3', 0), "
        "('dil_conv_5x5', 1)], reduce_concat=range(1, 3))")
    nb = make_space("nb201")
    assert nb.num_architectures() == 15625
    sel = dict(zip(nb.choices, ["nor_conv_3x3", "nor_conv_3x3", "avg_pool_3x3", "skip_connect",
                                "nor_conv_1x1", "none"]))
    assert nb.genotype_key(sel) == ("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+"
                                    "|skip_connect~0|nor_conv_1x1~1|none~2|")
    assert len(make_space("darts").choices) == 28
    af = make_space("autoformer", hparams={"per_layer": False})  # the shared form
    assert af.choices == {"embed": [192, 216, 240], "mlp_ratio": [3.5, 4.0], "heads": [3, 4],
                          "depth": [12, 13, 14]}
    # AutoFormer-Tiny's smallest sub-network: about 5.7 M parameters, 1.25 G MACs
    small = {"embed": 192, "mlp_ratio": 4.0, "heads": 3, "depth": 12}
    assert 5.5e6 < af.arch_params(small) < 6.0e6
    # the default, as in AutoFormer and the paper: MLP ratio and heads per layer (14 blocks)
    afl = make_space("autoformer")
    assert afl.per_layer and afl.choices["embed"] == [192, 216, 240]
    assert afl.choices["depth"] == [12, 13, 14]
    assert sorted(afl.choices) == sorted(["embed", "depth"] + [f"mlp_ratio_{i}" for i in range(14)]
                                         + [f"heads_{i}" for i in range(14)])
    assert all(afl.choices[f"heads_{i}"] == [3, 4] for i in range(14))
    small_l = {"embed": 192, "depth": 12, **{f"mlp_ratio_{i}": 4.0 for i in range(14)},
               **{f"heads_{i}": 3 for i in range(14)}}
    assert afl.arch_params(small_l) == af.arch_params(small)
    assert afl.arch_macs(small_l) == af.arch_macs(small)
    # a wider layer 12 does not count at depth 12 (layers 0..11 run), at depth 13 it does
    wide12 = {**small_l, "heads_12": 4, "mlp_ratio_12": 3.5}
    assert afl.arch_params(wide12) == afl.arch_params(small_l)
    assert afl.arch_params({**wide12, "depth": 13}) > afl.arch_params({**small_l, "depth": 13})
    mb = make_space("mobilenetv3")
    assert len(mb.choices) == 5 * 4 * 2 + 5 and mb.choices["s1_b1_k"] == [3, 5, 7]
    largest = {n: max(v) for n, v in mb.choices.items()}
    assert 7.0e6 < mb.arch_params(largest) < 8.0e6  # OFA-MBv3 w1.0 largest: ~7.7 M


def test_query_benchmark_through_space(tmp_path):
    sp, data, model = tiny("conv-macro")
    sel = {n: v[0] for n, v in sp.choices.items()}
    key = sp.genotype_key(sel)
    p = tmp_path / "bench.json"
    p.write_text(json.dumps({"format": "tangle_kernels.tabular", "version": 1,
                             "entries": {key: {"test_acc": 61.5, "train_acc": 60.0}}}))
    assert sp.query_benchmark(sel, str(p)) == {"key": key, "test_acc": 61.5, "train_acc": 60.0}
    other = {n: v[-1] for n, v in sp.choices.items()}
    with pytest.raises(SpaceError, match="no entry for"):
        sp.query_benchmark(other, str(p))
    with pytest.raises(SpaceError, match="no tabular benchmark"):
        make_space("autoformer", preset="tiny").query_benchmark(
            {"embed": 8, "mlp_ratio": 4.0, "heads": 1, "depth": 1}, str(p))


def test_bad_choices_rejected():
    with pytest.raises(SpaceError, match="odd"):
        make_space("conv-macro", choices={"k1": [3, 4]})
    with pytest.raises(SpaceError, match="not a positive integer"):
        make_space("autoformer", choices={"embed": [7], "mlp_ratio": [3.5]})
    with pytest.raises(SpaceError, match="unknown operations"):
        make_space("nb201", choices={"edge1_0": ["nor_conv_3x3", "conv_9x9"]})
    with pytest.raises(SpaceError, match="depths must be in"):
        make_space("mobilenetv3", choices={"s1_depth": [5]})
    with pytest.raises(SpaceError, match="no choice"):
        make_space("entangled-cell", choices={"normal_9": ["sep_conv_3x3"]})
    sp = make_space("conv-macro", preset="tiny")
    with pytest.raises(SpaceError, match="expects"):
        sp.build_supernet(make_space("entangled-cell", preset="tiny").make_data("synthetic"))


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass of ``fn()``
    (what the forward holds alive until backward), then runs the backward."""
    seen: dict = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except Exception:  # pragma: no cover
            key = (id(t), t.numel() * t.element_size())
        seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def test_conv_macro_memory_measurement(monkeypatch, record_property, capsys):
    """Saved-for-backward bytes of one supernet forward (image 16x16, batch 2, default
    widths/kernels): the entangled supernet (one superposed weight per conv) vs the
    padded-sum formulation (``TANGLE_KERNELS_BACKEND=reference``) as the number of
    candidates per conv grows; the plain max-size network is the floor."""
    rows = []
    x = torch.randn(2, 3, 16, 16)
    y = torch.randint(0, 10, (2,))
    for n in (1, 2, 3):
        choices = {k: v[-n:] for k, v in make_space("conv-macro").default_choices.items()}
        sp = make_space("conv-macro", choices=choices,
                        hparams={"image_size": 16, "dropout": 0.0})
        torch.manual_seed(0)
        model = sp.build_supernet()
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        arch = {k: torch.full((len(v),), 1.0 / len(v), requires_grad=True)
                for k, v in sp.choices.items()}

        def run(sp=sp, model=model, arch=arch):
            tnn.set_arch(model, arch)
            return sp.loss(model, (x, y))

        monkeypatch.delenv("TANGLE_KERNELS_BACKEND", raising=False)
        ent = _saved_bytes(run)
        monkeypatch.setenv("TANGLE_KERNELS_BACKEND", "reference")
        ref = _saved_bytes(run)
        monkeypatch.delenv("TANGLE_KERNELS_BACKEND")
        tnn.set_arch(model, None)
        plain = _saved_bytes(lambda sp=sp, model=model: sp.loss(model, (x, y)))
        K = n ** 3  # candidates of conv2..conv4 (in x out x kernel)
        rows.append({"K": K, "weights_MB": wbytes / 1e6, "plain_MB": plain / 1e6,
                     "entangled_MB": ent / 1e6, "padded_sum_MB": ref / 1e6})
        # the entangled supernet keeps the max-size network's tensors plus about one
        # weight copy (the superposed weight each conv saves), whatever K
        assert ent <= plain + 1.1 * wbytes, rows[-1]
    record_property("conv_macro_memory", json.dumps(rows))
    with capsys.disabled():
        print("\nconv-macro saved-for-backward MB (batch 2, 16x16):")
        for r in rows:
            print("  " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in r.items()))
    # the padded-sum formulation grows with K; the entangled one does not
    assert rows[-1]["padded_sum_MB"] > rows[0]["padded_sum_MB"] * 2
    assert rows[-1]["entangled_MB"] < rows[0]["entangled_MB"] * 1.5

"""``tangle-search --compile``: a few compiled search steps equal the eager ones (losses
and alphas within float tolerance) for a soft sampler (DrNAS) and a one-hot sampler
(GDAS), retraining from scratch too, with the number of compiled graphs asserted;
resume of a compiled run continues an eager checkpoint unchanged.

Tiny nanoGPT supernet (one layer). Backends: ``eager`` (dynamo's capture, the graph
run as is) and ``aot_eager`` (+ AOTAutograd's joint forward/backward graph with fake
tensors), no code generation: inductor takes tens of seconds per graph on a CPU; one
short test goes through inductor itself, the ``--compile`` default.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo

from tangle_kernels.search.compiled import Compiler
from tangle_kernels.search.engine import Search, SearchConfig
from tangle_kernels.spaces.nanogpt import NanoGPTSpace


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch.set_num_threads(n)


def _space():
    return NanoGPTSpace(
        preset="tiny",
        choices={"embed": [8, 16], "heads": [1, 2], "mlp_ratio": [2, 4], "layers": [1]},
        hparams={"block_size": 8},
    )


def _cfg(optimizer, **kw):
    base = dict(optimizer=optimizer, steps=3, batch_size=2, eval_batches=1, lr=3e-3,
                arch_lr=3e-2, checkpoint_every=0, seed=3, retrain_steps=0)
    base.update(kw)
    return SearchConfig(**base)


def _run(tmp_path, name, optimizer, compile, **kw):
    space = _space()
    data = space.make_data("synthetic")
    s = Search(space, data, _cfg(optimizer, **kw), out=str(tmp_path / name), progress=False,
               log=lambda m: None, compile=compile)
    res = s.run()
    recs = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    train = [r for r in recs if r["kind"] == "train"]
    return res, train, s


def _close(a, b, tol):
    assert a == pytest.approx(b, rel=tol, abs=tol)


@pytest.mark.parametrize("soft_heads", ["partition", "exact"])
def test_one_hot_soft_path_gradient_equals_the_sliced_path(soft_heads):
    """What the compiled GDAS step relies on: at a straight-through one-hot sample, the
    soft path with one-hot values (:func:`hard_as_soft`, what compiled steps run) gives
    every alpha the gradient the eager sliced path gives it, in float64 (the attention's
    sliced path carries its own soft relaxation's straight-through scales)."""
    from tangle_kernels.nn import set_arch
    from tangle_kernels.nn.arch import HardArch, hard_as_soft

    torch.manual_seed(0)
    sp = NanoGPTSpace(preset="tiny", choices={"embed": [8, 16], "heads": [1, 2],
                                             "mlp_ratio": [2, 4], "layers": [1, 2]},
                      hparams={"block_size": 8, "soft_heads": soft_heads})
    data = sp.make_data("synthetic")
    m = sp.build_supernet(data).double()
    batch = data.batch("train", 2, torch.Generator().manual_seed(0))
    al = {n: torch.randn(len(v), dtype=torch.float64, requires_grad=True) for n, v in sp.choices.items()}
    for idx in ({"embed": 0, "heads": 1, "mlp_ratio": 0, "layers": 1},
                {"embed": 1, "heads": 0, "mlp_ratio": 1, "layers": 0}):
        def hard():
            w = {}
            for n, a in al.items():
                s = torch.softmax(a, 0)
                w[n] = torch.nn.functional.one_hot(torch.tensor(idx[n]), len(s)).double() - s.detach() + s
            return HardArch(w, idx)

        grads = []
        for form in (lambda a: a, lambda a: hard_as_soft(a, m)):
            set_arch(m, form(hard()))
            grads.append(torch.autograd.grad(sp.loss(m, batch), list(al.values())))
        set_arch(m, None)
        for n, g_hard, g_soft in zip(al, *grads):
            # the depth: every depth up to the chosen one gets a gradient (the chosen one's
            # is erased by the final LayerNorm when it is the shallowest)
            assert g_hard.abs().max() > 1e-8 or (n == "layers" and idx["layers"] == 0), (n, g_hard)
            torch.testing.assert_close(g_soft, g_hard, rtol=1e-9, atol=1e-12, msg=f"{idx} {n}")


@pytest.mark.parametrize("optimizer,backend", [("drnas", "eager"), ("gdas", "aot_eager")])
def test_compiled_steps_equal_eager(tmp_path, optimizer, backend):
    """Soft (DrNAS) and one-hot (GDAS: a new HardArch sample every step) samplers, then
    retraining the derived arch from scratch: the compiled run's losses, alphas, derived
    arch and metrics equal the eager run's. Graphs: the loss of the supernet (arch step,
    weight step: 2, whatever the samples were) and of the retrained model (1), the
    forward of the supernet evaluation (1) and of the extracted / retrained model (1)."""
    e_res, e_train, _ = _run(tmp_path, "eager", optimizer, False, retrain_steps=2)
    c_res, c_train, s = _run(tmp_path, "compiled", optimizer, backend, retrain_steps=2)
    assert len(e_train) == len(c_train) == 3
    for e, c in zip(e_train, c_train):
        _close(c["train_loss"], e["train_loss"], 1e-5)
        _close(c["arch_loss"], e["arch_loss"], 1e-5)
    for n in e_res["alphas"]:
        torch.testing.assert_close(torch.tensor(c_res["alphas"][n]), torch.tensor(e_res["alphas"][n]),
                                   rtol=1e-5, atol=1e-6)
    assert c_res["arch"] == e_res["arch"]
    _close(c_res["val"]["loss"], e_res["val"]["loss"], 1e-5)
    _close(c_res["val_supernet"]["loss"], e_res["val_supernet"]["loss"], 1e-5)
    _close(c_res["scratch"]["val"]["loss"], e_res["scratch"]["val"]["loss"], 1e-5)
    _close(c_res["scratch"]["train_loss"], e_res["scratch"]["train_loss"], 1e-5)
    assert c_res["compile"]["graphs"] == 5, c_res["compile"]
    assert c_res["compile"]["fullgraph"] == {"loss": True, "forward": True}
    assert c_res["compile"]["backend"] == backend and "compile" not in e_res


def test_spos_compiled(tmp_path):
    """SPOS: every weight step has a new one-hot architecture, every selection the
    evolution scores is another one: ONE training graph and ONE supernet evaluation
    graph serve them all (+ the extracted model's); equal to eager."""
    kw = dict(spos_budget=4, spos_population=2, spos_eval_batches=1)
    e_res, e_train, _ = _run(tmp_path, "eager", "spos", False, **kw)
    c_res, c_train, _ = _run(tmp_path, "compiled", "spos", "eager", **kw)
    for e, c in zip(e_train, c_train):
        _close(c["train_loss"], e["train_loss"], 1e-5)
    assert c_res["arch"] == e_res["arch"]
    assert len({json.dumps(h["arch"]) for h in c_res["spos_history"]}) > 1
    for e, c in zip(e_res["spos_history"], c_res["spos_history"]):
        assert e["arch"] == c["arch"]
        _close(c["score"], e["score"], 1e-5)
    assert c_res["compile"]["graphs"] == 3, c_res["compile"]


def test_resume_with_compile_continues_an_eager_checkpoint(tmp_path):
    """Checkpoints are the same with or without --compile: a compiled run resumed from
    an eager run's checkpoint ends where the uninterrupted eager run ends."""
    space = _space()
    data = space.make_data("synthetic")
    full = Search(space, data, _cfg("darts", steps=4), out=str(tmp_path / "full"), progress=False,
                  log=lambda m: None).run()
    part = Search(space, data, _cfg("darts", steps=4, checkpoint_every=2), out=str(tmp_path / "part"),
                  progress=False, log=lambda m: None)
    part.setup()
    part.on_step = lambda s, step: s.request_stop() if step == 1 else None
    with pytest.raises(KeyboardInterrupt):
        part.run()
    res = Search(space, data, _cfg("darts", steps=4, checkpoint_every=2), out=str(tmp_path / "part"),
                 progress=False, log=lambda m: None, resume=True, compile="eager").run()
    for n in full["alphas"]:
        torch.testing.assert_close(torch.tensor(res["alphas"][n]), torch.tensor(full["alphas"][n]),
                                   rtol=1e-5, atol=1e-6)


def test_inductor_compiler_fresh_layout():
    """The --compile default (inductor, fullgraph) through :class:`Compiler`: an
    EntangledLinear built just before (its layouts never used eagerly), a soft arch:
    one graph, equal to eager in loss and gradients; compile time counted."""
    import tangle_kernels.nn as tnn

    ch = {"i": [4, 8], "o": [6, 12]}
    lin = tnn.EntangledLinear("i", "o", ch)
    arch = {n: torch.rand(len(v)).requires_grad_() for n, v in ch.items()}
    x = torch.randn(3, 8)

    def loss_fn(model, batch):
        return model(batch).square().mean()

    comp = Compiler("cpu")
    tnn.set_arch(lin, arch)
    leaves = [lin.weight, lin.bias, *arch.values()]
    lc = comp.loss(loss_fn, lin, x)
    gc = torch.autograd.grad(lc, leaves)
    le = loss_fn(lin, x)
    ge = torch.autograd.grad(le, leaves)
    torch.testing.assert_close(lc, le)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    comp.loss(loss_fn, lin, x)
    assert comp.graphs == 1 and comp.fullgraph == {"loss": True}
    assert comp.summary()["compile_s"] > 0 and comp.summary()["backend"] == "inductor"

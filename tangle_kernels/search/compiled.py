"""``tangle-search --compile``: the supernet's forward and loss under ``torch.compile``.

:class:`Compiler` holds the compiled functions of one run (search, evaluation,
retraining from scratch):

- :meth:`Compiler.loss` ``(model, batch)``: ``space.loss(model, batch)`` compiled, the
  forward and the loss in one graph (the training steps, and the unrolled DARTS
  gradient);
- :meth:`Compiler.module` ``(model)``: a thin module whose forward is ``model``'s,
  compiled (evaluation: ``space.evaluate`` calls it, directly or through its loss).

``fullgraph=True`` first; if dynamo cannot capture a whole graph, it says so once and
recompiles with graph breaks allowed. On CUDA the inductor backend runs in mode
``reduce-overhead`` (CUDA graphs: the per-op host cost, which bounds a supernet step on
a GPU, is paid once per graph); on CPU in its default mode.

Graphs: the architecture reaches the modules through :func:`set_arch` (module
attributes, guarded by dynamo on their structure, not their values), so a new sample
does not recompile. What changes a graph is the *form* of the step: whether the arch
vectors require a gradient (the architecture step) or not (the weight step), and
gradient mode (evaluation). A :class:`~tangle_kernels.nn.arch.HardArch` (GDAS, SPOS,
a derived architecture) would specialise the sliced path on its selection (one graph
per sampled architecture), so the compiled functions run it as
:func:`~tangle_kernels.nn.arch.hard_as_soft`: the one-hot values on the soft path,
gradients to the chosen entries only: one graph for every selection. A search
therefore compiles at most 2 training graphs (arch step, weight step; 1 for SPOS,
whose arch never needs a gradient) + 1 evaluation graph of the supernet, + 1
evaluation graph of the extracted model; retraining from scratch adds 1 training and
(shared with the extracted model's when the shapes agree) 1 evaluation graph.
:attr:`Compiler.graphs` counts them (a dynamo recompilation or graph break counts one
more each). The architecture step traces the weights without ``requires_grad`` (its
backward computes the alpha gradients only, as eager ``backward(inputs=alphas)``).

Tested on CPU with the inductor, ``eager`` and ``aot_eager`` backends
(tests/search/test_compile_search.py); GPU runs: benchmarks/results/.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..nn.arch import HardArch, hard_as_soft
from ..nn.base import get_arch, set_arch

__all__ = ["Compiler", "make_compiler"]


class _CountingBackend:
    """A dynamo backend that counts the graphs it compiles, then hands them on."""

    def __init__(self, inner):
        self.inner = inner
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)

    def __getattr__(self, name):  # get_compiler_config, reset, ... of the inner backend
        return getattr(self.inner, name)


def _fresh(fn: Callable) -> Callable:
    """``fn`` with its own code object: dynamo keeps compiled graphs (and counts its
    recompile limit) per code object, so every Compiler starts from an empty cache."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


@contextlib.contextmanager
def _soft_arch(model: nn.Module):
    """A HardArch stored by set_arch, replaced by :func:`hard_as_soft` for the call.

    Every module's sliced path carries the straight-through gradient of its own soft
    relaxation at the one-hot point (``EntangledAttention(soft_heads="partition")``
    scales q, k, v and the output by the embedding entry, as its relaxation does), so
    the soft path at one-hot values gives the alphas the sliced path's gradient
    (tests/test_compile_search.py checks both in float64)."""
    arch = get_arch(model)
    if not isinstance(arch, HardArch):
        yield
        return
    set_arch(model, hard_as_soft(arch, model))
    try:
        yield
    finally:
        set_arch(model, arch)


def _call_loss(loss_fn, model, batch):
    return loss_fn(model, batch)


def _call_forward(model, args, kwargs):
    return model(*args, **kwargs)


class _CompiledForward(nn.Module):
    """``model``'s forward through a :class:`Compiler` (``train()``/``eval()`` and the
    parameters are the wrapped model's)."""

    def __init__(self, model: nn.Module, compiler: Compiler):
        super().__init__()
        self.model = model
        self._compiler = compiler

    def forward(self, *args, **kwargs):
        return self._compiler._run("forward", self.model, (self.model, args, kwargs))


class Compiler:
    """The compiled functions of one run (see the module docstring).

    Args:
        device: the run's device (CUDA: mode ``reduce-overhead`` unless ``mode`` given).
        backend: a ``torch.compile`` backend name (default ``"inductor"``); tests use
            ``"aot_eager"`` (same capture, no code generation).
        mode: inductor mode (default: ``reduce-overhead`` on CUDA, none on CPU).
        log: where the one-line notices go (a graph break, the fallback).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        backend: str | None = None,
        mode: str | None = None,
        log: Callable[[str], None] | None = None,
    ):
        device = torch.device(device)
        self.backend_name = backend or "inductor"
        if mode is None and device.type == "cuda" and self.backend_name == "inductor":
            mode = "reduce-overhead"
        self.mode = mode
        self._log = log or (lambda msg: None)
        self._fns: dict[str, Any] = {}
        self._counters: list[_CountingBackend] = []
        self.fullgraph: dict[str, bool] = {}
        self.compile_s = 0.0

    # ----------------------------------------------------------------- compile
    def _backend(self):
        if self.backend_name == "inductor":
            inner = torch._TorchCompileInductorWrapper(self.mode, None, None)
        else:
            from torch._dynamo.backends.registry import lookup_backend

            inner = lookup_backend(self.backend_name)
        c = _CountingBackend(inner)
        self._counters.append(c)
        return c

    def _compiled(self, kind: str):
        fn = self._fns.get(kind)
        if fn is None:
            fullgraph = self.fullgraph.setdefault(kind, True)
            base = _call_loss if kind == "loss" else _call_forward
            fn = torch.compile(_fresh(base), backend=self._backend(), fullgraph=fullgraph)
            self._fns[kind] = fn
        return fn

    def _run(self, kind: str, model: nn.Module, args: tuple):
        n, t0 = self.graphs, time.perf_counter()
        try:
            return self._call(kind, model, args)
        finally:
            if self.graphs != n:  # this call compiled: count its time as compile time
                self.compile_s += time.perf_counter() - t0

    def _call(self, kind: str, model: nn.Module, args: tuple):
        with _soft_arch(model):
            try:
                return self._compiled(kind)(*args)
            except torch._dynamo.exc.Unsupported as e:
                if not self.fullgraph.get(kind, True):
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self._log(
                    f"--compile: the {kind} does not compile as one graph ({first}); "
                    "compiling it with graph breaks"
                )
                self.fullgraph[kind] = False
                self._fns.pop(kind, None)
                return self._compiled(kind)(*args)

    # ------------------------------------------------------------------ public
    def loss(
        self,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        model: nn.Module,
        batch,
        *,
        weight_grads: bool = True,
    ):
        """``loss_fn(model, batch)`` compiled (forward + loss in one graph).

        ``weight_grads=False`` (the architecture step, whose backward wants only the
        alpha gradients): the weights are traced as constants of the graph's autograd
        (``requires_grad`` off during the forward), so its backward does not compute
        weight gradients it would throw away (eager mode skips them with
        ``backward(inputs=alphas)``, a compiled backward computes all of its inputs')."""
        if weight_grads:
            return self._run("loss", model, (loss_fn, model, batch))
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            return self._run("loss", model, (loss_fn, model, batch))
        finally:
            for p in params:
                p.requires_grad_(True)

    def loss_fn(self, loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
        """``loss_fn`` as a compiled function of ``(model, batch)``."""
        return lambda model, batch: self.loss(loss_fn, model, batch)

    def module(self, model: nn.Module) -> nn.Module:
        """A module whose forward is ``model``'s, compiled (for evaluation)."""
        return _CompiledForward(model, self)

    @property
    def graphs(self) -> int:
        """Graphs compiled so far (all the run's compiled functions)."""
        return sum(c.graphs for c in self._counters)

    def summary(self) -> dict:
        """``{"backend", "mode", "graphs", "fullgraph", "compile_s"}`` (arch.json, logs);
        ``compile_s``: wall time of the calls that compiled (tracing, code generation
        and that one run)."""
        return {
            "backend": self.backend_name,
            "mode": self.mode,
            "graphs": self.graphs,
            "fullgraph": dict(self.fullgraph),
            "compile_s": round(self.compile_s, 2),
        }


def make_compiler(compile: bool | str | Compiler | None, device, log=None) -> Compiler | None:
    """``None`` for ``compile`` False/None; a :class:`Compiler` for True (inductor) or a
    backend name; a given Compiler as is."""
    if compile is None or compile is False:
        return None
    if isinstance(compile, Compiler):
        return compile
    return Compiler(device, backend=None if compile is True else str(compile), log=log)

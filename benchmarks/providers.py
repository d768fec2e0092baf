"""The competitors, side by side: what each benchmark provider computes.

Superpose op (``W_mix`` from the max-size weight ``W`` and the candidate mix):

- ``ours[<backend>]``: :func:`tangle_kernels.superpose` with that backend (cpu, torch on
  CPU; triton, cuda, torch on GPU): ``W * M(mix)`` in one pass, gradients in one sweep.
- ``reference``: the padded-sum of the seeds, ``sum_k mix_k * pad(slice_k(W))``
  (:func:`tangle_kernels.backends.reference.superpose_reference`), plain autograd.
- ``compiled-reference``: ``torch.compile`` of that reference (Inductor fuses the
  pads, multiplies and adds: the fair competitor).
- ``masksum``: one dense 0/1 mask per candidate, ``W * sum_k mix_k mask_k`` (how other
  NAS libraries do it; :func:`~tangle_kernels.backends.reference.superpose_masksum`).
- ``copy``: ``out.copy_(W)``, the bandwidth floor (reads and writes the weight once).

Layers (linear, conv, attention) use the same providers for their weights and biases,
plus ``plain``: the max-size ``F.linear`` / ``F.conv2d`` / attention ignoring the mix
(the limit). Ours for linear layers is
:func:`tangle_kernels.ops.entangled_linear.entangled_linear` with that backend
(``ours[triton]``: the fused Triton GEMM; the others: the superpose kernels + the
GEMMs of ``F.linear``); conv is :func:`tangle_kernels.entangled_conv2d`
(``superpose`` + ``F.conv2d`` in one autograd node).

``masksum`` builds its K dense masks once per layout and caches them (as those libraries
do): the cache is persistent state, not part of the measured peak; the K-sized
temporaries of ``sum_k mix_k mask_k`` are.

Supernet step (a search space of :mod:`tangle_kernels.spaces`): ``ours[<backend>]``
(the supernet with ``TANGLE_KERNELS_BACKEND=<backend>``), ``reference`` (the same
supernet with every superposition computed by the padded-sum), and ``plain`` (the
plain max-size model of the space, ``space.build_plain``), ``floor`` (nanoGPT only: the
plain max-size GPT whose attention runs one extra attention call per additional head
count in every layer, each at the max width over the same q, k, v, outputs summed:
the least any soft relaxation of the heads choice can cost, since a head count
re-partitions the width and so needs its own attention call), ``compiled-ours`` and
``compiled-plain``: the same supernet (automatic backend) and plain model with their
forward + loss under ``torch.compile`` as ``tangle-search --compile`` runs them
(:class:`tangle_kernels.search.compiled.Compiler`: inductor, fullgraph; CUDA graphs on
CUDA); their compile time is the first call's (``first_call_s``, reported apart).
``plain-fused`` and ``floor-fused`` (CPU, nanoGPT): the plain model and the floor with
every attention call through :func:`tangle_kernels.ops.attention.fused_attention` (the
kernel the supernet's head-partition attention runs with dropout on CPU): how much of
the supernet's cost over ``plain``/``floor`` is the relaxation rather than torch's
attention kernel.

A provider that cannot run raises :class:`Unavailable` with the reason; the suites
record it as ``unavailable (reason)``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tangle_kernels import backends, entangled_conv2d, superpose
from tangle_kernels.backends.reference import superpose_masksum, superpose_reference
from tangle_kernels.ops.entangled_linear import bias_layout, entangled_linear

from . import shapes

try:  # many distinct compiled closures share one code object: lift dynamo's limits
    import torch._dynamo

    for _name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                  "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, _name):
            setattr(torch._dynamo.config, _name, max(256, getattr(torch._dynamo.config, _name)))
except Exception:  # pragma: no cover - torch without dynamo
    pass


class Unavailable(Exception):
    """The provider cannot run here; the message says why."""


BACKENDS_BY_DEVICE = {"cpu": ("cpu", "torch", "triton"), "cuda": ("triton", "cuda", "torch")}
MODES = ("fwd", "fwd+bwd")


def ours(backend: str) -> str:
    return f"ours[{backend}]"


def backend_of(provider: str) -> str | None:
    if provider.startswith("ours[") and provider.endswith("]"):
        return provider[5:-1]
    return None


def op_providers(device: str) -> list[str]:
    return [ours(b) for b in BACKENDS_BY_DEVICE[device]] + [
        "reference", "compiled-reference", "masksum", "copy"]


def layer_providers(device: str) -> list[str]:
    return [ours(b) for b in BACKENDS_BY_DEVICE[device]] + [
        "reference", "compiled-reference", "masksum", "plain"]


def supernet_providers(device: str) -> list[str]:
    extra = ["floor-fused"] if device == "cpu" else []
    return [ours(b) for b in BACKENDS_BY_DEVICE[device]] + ["reference", "plain", "floor", *extra,
                                                            "compiled-ours", "compiled-plain"]


def why_unavailable(provider: str, device: str) -> str | None:
    """None when ``provider`` can run on ``device``, else the reason."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    b = backend_of(provider)
    if b is not None:
        if b == "triton" and device == "cpu":
            return "triton runs on CPU tensors only in the interpreter (TRITON_INTERPRET=1): not a benchmark"
        return backends.why_unavailable("superpose", b, torch.device(device))
    if provider.startswith("compiled-"):
        if not hasattr(torch, "compile"):
            return "torch.compile is missing"
    if provider.endswith("-fused"):
        if device != "cpu":
            return "the fused attention is a CPU kernel"
        from tangle_kernels.ops.attention import fused_attention_available

        return fused_attention_available()
    return None


# --------------------------------------------------------------- superposers
Superposer = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def superposer(provider: str) -> Superposer:
    """``sp(weight, mix, layout) -> W_mix`` of an (uncompiled) provider."""
    b = backend_of(provider)
    if b is not None:
        return functools.partial(_ours_sp, backend=b)
    if provider in ("reference", "compiled-reference"):
        return superpose_reference
    if provider == "masksum":
        return superpose_masksum
    if provider == "plain":
        return lambda w, mix, layout: w
    raise ValueError(f"provider: {provider!r} has no superposer")


def _ours_sp(w, mix, layout, *, backend):
    return superpose(w, mix, layout, backend=backend)


_COMPILED: dict = {}


#: Inductor options of the compiled reference of conv layers. Inductor's default
#: ``layout_optimization`` (channels-last convolutions) MISCOMPILES the padded-sum
#: conv layer on CUDA (torch 2.11, conv_256_k27: max relative error 0.95 against eager,
#: with and without tf32; 2e-5 / 4e-7 with it off), so it is turned off there and the
#: competitor computes the right thing.
CONV_INDUCTOR_OPTIONS = {"layout_optimization": False}


def compiled(key, fn: Callable, options: dict | None = None) -> Callable:
    """``torch.compile(fn, dynamic=False)``, cached under ``key`` so the fwd and fwd+bwd
    modes of a case share one compilation."""
    c = _COMPILED.get(key)
    if c is None:
        c = torch.compile(fn, dynamic=False, options=options) if options else torch.compile(fn, dynamic=False)
        _COMPILED[key] = c
    return c


# ------------------------------------------------------------------ benches
@dataclass
class Bench:
    """What a suite times: ``fn()`` (returns the output, or None), ``grads``: the
    leaf tensors whose ``.grad`` is reset between calls, and the size facts of the case:
    ``bytes_fwd`` / ``bytes_fwdbwd`` (the minimal traffic of the op: weight-sized reads
    and writes), ``flops`` (GEMM/conv FLOPs of the forward), ``items`` (tokens/images)."""

    fn: Callable[[], object]
    inputs: tuple = ()
    grads: tuple = ()
    bytes_fwd: int = 0
    bytes_fwdbwd: int = 0
    flops_fwd: float = 0.0
    items: int = 0
    extra: dict = field(default_factory=dict)


def _mix(K: int, device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(K, generator=g), 0).to(device).requires_grad_(True)


def _randn(shape, device, dtype, seed, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def _training_fn(call, mode: str, out_like_grad: bool = True):
    """fwd: ``call()`` with grad-requiring inputs (the training forward, autograd graph
    built); fwd+bwd: also ``out.backward(G)`` with a fixed upstream gradient ``G``."""
    if mode == "fwd":
        return call
    if mode != "fwd+bwd":
        raise ValueError(f"mode: expected 'fwd' or 'fwd+bwd', got {mode!r}")
    holder: dict = {}

    def step():
        out = call()
        g = holder.get("g")
        if g is None or g.shape != out.shape:
            g = holder["g"] = torch.randn_like(out)
        out.backward(g)
        return None

    return step


def make_op(case: shapes.OpCase, provider: str, mode: str, device: str,
            dtype: torch.dtype = torch.float32) -> Bench:
    """The superpose op of ``case`` computed by ``provider``."""
    why = why_unavailable(provider, device)
    if why:
        raise Unavailable(why)
    layout = case.layout
    w = _randn(case.shape, device, dtype, 0).requires_grad_(True)
    mix = _mix(layout.K, device)
    esz = w.element_size()
    n = case.numel
    if provider == "copy":
        if mode != "fwd":
            raise Unavailable("copy is measured once (mode fwd); the fwd+bwd floor is derived")
        out = torch.empty_like(w)
        w0 = w.detach()
        return Bench(lambda: out.copy_(w0), inputs=(w0,), bytes_fwd=2 * n * esz, bytes_fwdbwd=5 * n * esz)
    if provider == "compiled-reference":
        fn = compiled(("op", case.name, device, dtype), functools.partial(_ref_closure, layout=layout))
    else:
        sp = superposer(provider)
        fn = functools.partial(sp, layout=layout)
    call = lambda: fn(w, mix)  # noqa: E731
    return Bench(_training_fn(call, mode), inputs=(w, mix), grads=(w, mix),
                 bytes_fwd=2 * n * esz, bytes_fwdbwd=5 * n * esz,
                 extra={"reference_out": lambda: superpose_reference(w, mix, layout), "out": call})


def _ref_closure(w, mix, *, layout):
    return superpose_reference(w, mix, layout)


# layers ---------------------------------------------------------------------
def _linear(sp: Superposer, backend: str | None):
    """``linear(x, W, b, mix, layout)`` for a provider."""
    if backend is not None:
        return lambda x, W, b, mix, L: entangled_linear(x, W, b, mix, L, backend=backend)
    return lambda x, W, b, mix, L: F.linear(x, sp(W, mix, L), None if b is None else sp(b, mix, bias_layout(L)))


def layer_fn(case: shapes.LayerCase, provider: str) -> Callable:
    """The layer of ``case`` as a pure function ``f(x, *params, mix)``."""
    base = "reference" if provider == "compiled-reference" else provider
    sp = superposer(base)
    lin = _linear(sp, backend_of(base))
    if base == "plain":
        lin = lambda x, W, b, mix, L: F.linear(x, W, b)  # noqa: E731
    L = case.op_case.layout
    if case.kind == "linear":
        return lambda x, W, b, mix: lin(x, W, b, mix, L)
    if case.kind == "conv":
        pad = case.op_case.shape[-1] // 2
        Lb = bias_layout(L)
        g = case.groups

        be = backend_of(base)
        if be is not None:  # ours: the one-node entangled_conv2d with that backend
            def conv(x, W, b, mix):
                return entangled_conv2d(x, W, b, mix, L, bias_mix=mix, bias_layout=Lb, padding=pad,
                                        groups=g, backend=be)
        else:
            def conv(x, W, b, mix):
                return F.conv2d(x, sp(W, mix, L), sp(b, mix, Lb), padding=pad, groups=g)

        return conv
    if case.kind == "attention":
        embeds, heads, d = case.attn
        H = max(heads)
        Lp = shapes.proj_layout(embeds, heads, d)
        if Lp.K != L.K:
            raise AssertionError("attention: qkv and proj layouts must share the candidates")

        def attn(x, Wqkv, bqkv, Wp, bp, mix):
            B, T, _ = x.shape
            qkv = lin(x, Wqkv, bqkv, mix, L)
            q, k, v = qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v)
            return lin(o.transpose(1, 2).reshape(B, T, H * d), Wp, bp, mix, Lp)

        return attn
    raise ValueError(f"case.kind: unknown layer kind {case.kind!r}")


def make_layer(case: shapes.LayerCase, provider: str, mode: str, device: str,
               dtype: torch.dtype = torch.float32) -> Bench:
    why = why_unavailable(provider, device)
    if why:
        raise Unavailable(why)
    if provider == "copy":
        raise Unavailable("copy is an op-level floor")
    oc = case.op_case
    L = oc.layout
    mix = _mix(L.K, device)
    if case.kind == "linear":
        n_out, n_in = oc.shape
        W = _randn(oc.shape, device, dtype, 0, 1 / math.sqrt(n_in)).requires_grad_(True)
        b = _randn((n_out,), device, dtype, 2, 0.1).requires_grad_(True)
        x = _randn((case.tokens, n_in), device, dtype, 3)
        params = (W, b)
        flops = 2.0 * case.tokens * n_out * n_in
        items = case.tokens
    elif case.kind == "conv":
        n_out, n_in_g, kh, kw = oc.shape
        W = _randn(oc.shape, device, dtype, 0, 1 / math.sqrt(n_in_g * kh * kw)).requires_grad_(True)
        b = _randn((n_out,), device, dtype, 2, 0.1).requires_grad_(True)
        x = _randn((case.batch, n_in_g * case.groups, case.hw, case.hw), device, dtype, 3)
        params = (W, b)
        flops = 2.0 * case.batch * case.hw * case.hw * n_out * n_in_g * kh * kw
        items = case.batch
    elif case.kind == "attention":
        embeds, heads, d = case.attn
        E, Hd = max(embeds), max(heads) * d
        Wqkv = _randn((3 * Hd, E), device, dtype, 0, 1 / math.sqrt(E)).requires_grad_(True)
        bqkv = _randn((3 * Hd,), device, dtype, 2, 0.1).requires_grad_(True)
        Wp = _randn((E, Hd), device, dtype, 4, 1 / math.sqrt(Hd)).requires_grad_(True)
        bp = _randn((E,), device, dtype, 5, 0.1).requires_grad_(True)
        x = _randn((case.batch, case.seq, E), device, dtype, 3)
        params = (Wqkv, bqkv, Wp, bp)
        T = case.batch * case.seq
        flops = 2.0 * T * (3 * Hd * E + E * Hd) + 4.0 * case.batch * max(heads) * case.seq ** 2 * d
        items = T
    else:
        raise ValueError(f"case.kind: unknown layer kind {case.kind!r}")
    x.requires_grad_(True)
    if provider == "compiled-reference":
        f = compiled(("layer", case.name, device, dtype), layer_fn(case, provider),
                     CONV_INDUCTOR_OPTIONS if case.kind == "conv" else None)
    else:
        f = layer_fn(case, provider)
    ref = layer_fn(case, "reference")
    args = (x, *params, mix)
    call = lambda: f(*args)  # noqa: E731
    wbytes = sum(p.numel() * p.element_size() for p in params)
    extra = {"reference_out": lambda: ref(*args), "out": call, "comparable": provider != "plain"}
    if provider == "compiled-reference" and case.kind == "conv":
        extra["note"] = f"inductor options {CONV_INDUCTOR_OPTIONS} (the default miscompiles, see providers.py)"
    return Bench(_training_fn(call, mode), inputs=args, grads=args,
                 bytes_fwd=2 * wbytes, bytes_fwdbwd=5 * wbytes, flops_fwd=flops, items=items,
                 extra=extra)


# supernet -------------------------------------------------------------------
SPACES = {
    "nanogpt": "tangle_kernels.spaces.nanogpt:NanoGPTSpace",
    "conv-macro": "tangle_kernels.spaces.conv_macro:ConvMacroSpace",
}


def space_class(name: str):
    """The SearchSpace class of ``name`` (the package registry if it has one)."""
    target = SPACES.get(name)
    try:
        reg = importlib.import_module("tangle_kernels.spaces")
        for attr in ("REGISTRY", "SPACES", "_REGISTRY"):
            table = getattr(reg, attr, None)
            if isinstance(table, dict) and name in table:
                target = table[name]
                break
    except Exception as e:
        raise Unavailable(f"tangle_kernels.spaces does not import ({type(e).__name__}: {e})") from e
    if target is None:
        raise Unavailable(f"no space named {name!r}")
    if not isinstance(target, str):
        return target
    mod, _, cls = target.partition(":")
    try:
        return getattr(importlib.import_module(mod), cls)
    except Exception as e:
        raise Unavailable(f"space {name!r} ({target}) is not available ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def backend_env(backend: str | None):
    """Route every ``superpose(..., backend=None)`` to ``backend`` (None: automatic)."""
    old = os.environ.get(backends.ENV_VAR)
    if backend is None:
        os.environ.pop(backends.ENV_VAR, None)
    else:
        os.environ[backends.ENV_VAR] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(backends.ENV_VAR, None)
        else:
            os.environ[backends.ENV_VAR] = old


def _max_selection(choices: dict) -> dict:
    sel = {}
    for n, vals in choices.items():
        vals = list(vals)
        try:
            sel[n] = max(vals)
        except TypeError:
            sel[n] = vals[-1]
    return sel


def _set_arch():
    try:
        from tangle_kernels.nn import set_arch
    except Exception:
        from tangle_kernels.nn.base import set_arch
    return set_arch


def _on_device(build, device: str):
    """``build()`` with parameters created on ``device`` directly (fast init of a large
    model on a GPU); falls back to building on the CPU and moving the model."""
    if device != "cpu":
        try:
            with torch.device(device):
                return build().to(device)
        except Exception:
            pass
    return build().to(device)


def make_space(case: shapes.SupernetCase):
    cls = space_class(case.space)
    preset = next((p for p in case.preset_candidates if p in getattr(cls, "presets", {})), None)
    hp = {k: v for k, v in case.hparams if k in getattr(cls, "default_hparams", {})}
    return cls(hparams=hp or None, preset=preset), preset


def _attend(fused: bool):
    """The plain GPT's multi-head attention call: torch's, or the fused CPU kernel."""
    from tangle_kernels.nn import plain

    if not fused:
        return plain.attend
    from tangle_kernels.ops.attention import fused_attention

    def attend(q, k, v, num_heads, *, causal, dropout_p):
        B, T, C = q.shape
        d = C // num_heads
        q, k, v = (t.reshape(B, T, num_heads, d).transpose(1, 2) for t in (q, k, v))
        y = fused_attention(q, k, v, causal=causal, dropout_p=dropout_p)
        return y.transpose(1, 2).reshape(B, T, C)

    return attend


def _floor_attention(model: torch.nn.Module, space, *, floor: bool = True,
                     fused: bool = False) -> int:
    """Turn every plain attention of the max-size GPT ``model`` into the floor's: one
    attention call per head-count candidate of its layer (max width, the plain q, k, v),
    outputs summed, then the plain output projection (``floor=False``: the plain count
    only); ``fused``: the calls through the fused CPU kernel. Returns the number of
    layers."""
    import types

    from tangle_kernels.nn import plain

    attend = _attend(fused)

    def forward(self, x, arch=None):
        q, k, v = self.qkv(x).split(self.num_heads * self.head_dim, dim=-1)
        p = self.dropout if self.training else 0.0
        y = None
        for h in self._floor_heads:
            t = attend(q, k, v, h, causal=self.causal, dropout_p=p)
            y = t if y is None else y + t
        return self.proj(y)

    atts = [m for m in model.modules() if isinstance(m, plain.SelfAttention)]
    for i, m in enumerate(atts):
        name = f"heads_{i}" if f"heads_{i}" in space.choices else "heads"
        heads = sorted(space.choices[name], reverse=True)  # the plain count first
        m._floor_heads = heads if floor else heads[:1]
        m.forward = types.MethodType(forward, m)
    return len(atts)


def make_supernet(case: shapes.SupernetCase, provider: str, device: str) -> Bench:
    """One training step (forward, backward to the weights and the architecture
    parameters, AdamW step) of the supernet of ``case.space`` under a soft arch
    (softmax of architecture logits), or of the plain max-size model (``plain``)."""
    why = why_unavailable(provider, device)
    if why:
        raise Unavailable(why)
    space, preset = make_space(case)
    try:
        data = space.make_data("synthetic")
    except Exception:
        data = space.make_data(None)
    gen = torch.Generator().manual_seed(0)
    batch = data.batch("train", case.batch, gen, device)
    torch.manual_seed(0)
    backend = backend_of(provider)
    if provider.startswith(("floor", "plain-fused")) and case.space != "nanogpt":
        raise Unavailable(f"{provider}: defined for the nanoGPT space (its attention calls)")
    if provider in ("plain", "compiled-plain", "floor", "plain-fused", "floor-fused"):
        model = _on_device(lambda: space.build_plain(_max_selection(space.choices), data), device)
        alphas = {}
        if provider in ("floor", "plain-fused", "floor-fused") and not _floor_attention(
                model, space, floor=provider.startswith("floor"), fused=provider.endswith("-fused")):
            raise Unavailable(f"{provider}: the plain model has no attention to extend")
    else:
        model = _on_device(lambda: space.build_supernet(data), device)
        alphas = {n: torch.zeros(len(v), device=device, requires_grad=True)
                  for n, v in space.choices.items()}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    set_arch = _set_arch()
    route = "reference" if provider == "reference" else backend
    loss_fn = space.loss
    if provider.startswith("compiled-"):
        from tangle_kernels.search.compiled import Compiler

        compiler = Compiler(device)  # what tangle-search --compile runs

        def loss_fn(model, batch):
            return compiler.loss(space.loss, model, batch)

    def step():
        with backend_env(route):
            if alphas:
                set_arch(model, {n: torch.softmax(a, 0) for n, a in alphas.items()})
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            for a in alphas.values():
                a.grad = None
        return None

    inputs = batch[0]
    items = inputs.numel() if case.unit == "tokens" else inputs.shape[0]
    return Bench(step, items=items,
                 extra={"preset": preset, "params": sum(p.numel() for p in model.parameters()),
                        "space_config": space.config()})

"""Embedding into other codebases: :func:`entangle` turns the layers of an existing
model into entangled ones (keeping the weights), :func:`extract` turns a supernet back
into a plain model of one sub-network, of the original classes.

Conversion goes through the converter registry (:mod:`.registry`): one converter per
module type, matched by exact type or by a registered base class whose methods the
subclass does not redefine; a subclass that redefines them is refused with its name,
its type and the way out. Converters shipped: the stock torch layers
(:mod:`.layers`), timm's ``BatchNormAct2d`` / ``Conv2dSame`` / ``LayerNorm2d`` /
``Attention``, transformers' ``Conv1D``, nanoGPT's ``LayerNorm`` and
``CausalSelfAttention`` (:mod:`.attention`); guards for containers whose forward
reads their children's weights (``nn.TransformerEncoderLayer``,
``nn.MultiheadAttention``, GPT-2 / BERT attention)."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..base import EntangledModule
from ..spec import check_choices
from . import attention as _attention  # noqa: F401  (registers its converters)
from . import attention_hf as _attention_hf  # noqa: F401  (registers its converters)
from . import layers as _layers  # noqa: F401
from .check import check_flow
from .layers import layer_norm_converter
from .registry import (
    _MEMO,
    Converter,
    Guard,
    Origin,
    find_converter,
    find_guard,
    register_converter,
    register_guard,
    registered,
)

__all__ = [
    "entangle",
    "extract",
    "ENTANGLE_ARGS",
    "Converter",
    "Guard",
    "register_converter",
    "register_guard",
    "layer_norm_converter",
    "check_flow",
]

#: The stock torch layer types :func:`entangle` converts and the arguments that can
#: follow a choice (every registered converter: :func:`.registry.registered`).
ENTANGLE_ARGS: dict[type, tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features", "out_segments"),
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "groups"),
    nn.BatchNorm2d: ("num_features",),
    nn.LayerNorm: ("normalized_shape",),
    nn.Embedding: ("embedding_dim",),
}


def _inside(path: str, parent: str) -> bool:
    return parent == "" and path != "" or path.startswith(parent + ".")


def entangle(
    model: nn.Module,
    choices: Mapping[str, Sequence],
    dims: Mapping[str, Any],
    *,
    inplace: bool = False,
    kernel_transform: bool = False,
    example_inputs: Any = None,
) -> nn.Module:
    """Swap the layers of ``model`` named by ``dims`` for entangled versions that keep
    their weights (the same ``nn.Parameter`` objects, except transformers' ``Conv1D``,
    whose weight is stored transposed).

    Args:
        model: any ``nn.Module``. Convertible: ``nn.Linear``, ``nn.Conv2d``,
            ``nn.BatchNorm2d``, ``nn.LayerNorm``, ``nn.Embedding`` (and subclasses that
            redefine none of their methods), timm ``BatchNormAct2d`` / ``Conv2dSame`` /
            ``LayerNorm2d`` / ``Attention``, transformers ``Conv1D``, nanoGPT
            ``LayerNorm`` / ``CausalSelfAttention``, and every class with a registered
            converter (:func:`register_converter`).
        choices: ``{name: values}``, e.g. ``{"hidden": [128, 256, 512]}``.
        dims: ``{"<module path>.<argument>": spec}``. The key is an ``fnmatch`` pattern
            matched against ``<path>.<arg>`` for every convertible layer (``path`` as in
            ``model.named_modules()``, e.g. ``"blocks.0.mlp.fc1.out_features"``;
            ``"*.fc1.out_features"`` matches every block's). The value is a width spec:
            a choice name, a tuple of names and ints (``("embed", "ratio")``) or an int.
            When several patterns match one argument the LAST one in ``dims`` wins (write
            general patterns first, exceptions after). Arguments per layer type:
            Linear / Conv1D ``in_features``, ``out_features``, ``out_segments`` (an int:
            stacked q|k|v blocks, each prefix-sliced by ``out_features``); Conv2d
            ``in_channels``, ``out_channels``, ``kernel_size`` (a choice of odd sizes),
            ``groups``; BatchNorm2d ``num_features``; LayerNorm ``normalized_shape``;
            Embedding ``embedding_dim``; attention modules ``embed_dim``, ``num_heads``.
            Every spec's max must equal the layer's size.
        inplace: modify ``model`` itself; by default a deep copy is converted.
        kernel_transform: give entangled convs with a kernel-size choice the
            Once-for-All kernel-transform matrices (identity-initialised).
        example_inputs: an input of ``model`` (a tensor, a tuple of positional
            arguments or a dict of keyword arguments). When given, the data flow is
            checked on the meta device (:func:`check_flow`): the sub-networks of the
            smallest and the largest choice are extracted and run, and a layer left
            unentangled whose input width follows a choice (a forgotten consumer) is an
            error naming it and the entangled layer before it.

    Returns the converted model. Layers that no pattern names stay as they are. Errors
    (``ValueError``) name the offending pattern, module and type: a pattern that
    matches nothing (saying when the module exists but its type has no converter), a
    subclass whose forward differs from its base, an unknown choice name, a width
    above the layer's size, a kernel size that does not fit, a change that a
    container's forward would not follow (attention heads split by fixed sizes,
    ``nn.MultiheadAttention``). Without ``example_inputs`` the caller keeps the data
    flow consistent (the layer after a layer whose ``out_features`` follows
    ``"hidden"`` needs ``in_features`` following ``"hidden"``).

    Run the converted model with an arch stored by :func:`set_arch` (its layers are
    called without one).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(dims, Mapping) or not dims:
        raise ValueError("dims: expected a non-empty mapping '<module path>.<argument>' -> spec")
    choices = check_choices(choices, list(choices or {}), "choices", None) if choices else {}
    original = model
    if not inplace:
        model = copy.deepcopy(model)
    entangled_paths = [p for p, m in model.named_modules() if isinstance(m, EntangledModule)]
    layers, refused, unsupported = [], {}, []
    for path, m in model.named_modules():
        if isinstance(m, EntangledModule) or any(_inside(path, p) for p in entangled_paths):
            continue
        conv, why = find_converter(m)
        if conv is not None:
            layers.append((path, m, conv))
        elif why is not None:
            refused[path] = (m, why)
        else:
            unsupported.append((path, m))
    all_args = {a for _, _, c in layers for a in c.args} | {
        a for c in registered().values() for a in c.args
    }
    used = dict.fromkeys(dims, False)
    plan: dict[int, tuple[str, nn.Module, Converter, dict]] = {}
    for path, m, conv in layers:
        kw: dict[str, Any] = {}
        for arg in conv.args:
            key = f"{path}.{arg}" if path else arg
            for pat, spec in dims.items():
                if fnmatch.fnmatchcase(key, pat):
                    used[pat] = True
                    kw[arg] = (pat, spec)
        if kw and id(m) not in plan:
            plan[id(m)] = (path, m, conv, kw)
    # An outer converted module takes its descendants: a pattern may not set both.
    outer = [(p, m) for p, m, _, _ in plan.values()]
    for path, m, _, kw in plan.values():
        owner = [(p, om) for p, om in outer if om is not m and _inside(path, p)]
        if owner:
            pats = sorted({p for p, _ in kw.values()})
            raise ValueError(
                f"dims {pats} set {path!r} ({type(m).__name__}) inside {owner[0][0]!r} "
                f"({type(owner[0][1]).__name__}), which dims convert as a whole; "
                "set the outer module's arguments only"
            )
    for path, (_, why) in refused.items():
        for pat in dims:
            ppat, _, arg = pat.rpartition(".")
            if arg in all_args and fnmatch.fnmatchcase(path, ppat):
                raise ValueError(f"dims: pattern {pat!r} matches {path!r}: {why}")
    unused = [p for p, u in used.items() if not u]
    for pat in unused:
        ppat, _, arg = pat.rpartition(".")
        hits = [(p, m) for p, m in unsupported if fnmatch.fnmatchcase(p, ppat or "")]
        hits.sort(key=lambda h: not any(v is not None for v in h[1]._parameters.values()))
        if hits:
            p, m = hits[0]
            raise ValueError(
                f"dims: pattern {pat!r} matches the module {p!r}, but its type "
                f"{type(m).__name__} ({type(m).__module__}) has no converter; register one "
                "(tangle_kernels.nn.register_converter) or replace the module by stock layers"
            )
    if unused:
        avail = [f"{p}.{a}" if p else a for p, _, c in layers for a in c.args]
        shown = ", ".join(avail[:12]) + (", ..." if len(avail) > 12 else "")
        raise ValueError(
            f"dims: pattern {unused[0]!r} matches no layer argument (available: {shown or 'none'})"
        )
    # Guards of the containers of converted modules.
    restore: dict[int, tuple[nn.Module, dict]] = {}
    for cpath, c in model.named_modules():
        g = find_guard(c)
        if g is None:
            continue
        targeted = {}
        for path, _, _, kw in plan.values():
            if _inside(path, cpath):
                targeted[path[len(cpath) + 1 :] if cpath else path] = tuple(kw)
        if id(c) in plan:
            continue
        fix = g.check(c, cpath, targeted)
        if fix:
            restore[id(c)] = (c, dict(fix))
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    # ``shared``: parameters tied across modules (a converter that copies a weight into a
    # new layout refuses them: the copy would untie them).
    options = {
        "kernel_transform": kernel_transform,
        "shared": {k for k, n in seen.items() if n > 1},
    }
    new_for: dict[int, nn.Module] = {}
    for mid, (path, m, conv, kw) in plan.items():
        specs = {a: s for a, (_, s) in kw.items()}
        try:
            new = conv.entangle(m, specs, choices, options)
        except (ValueError, TypeError, KeyError) as e:
            pats = sorted({p for p, _ in kw.values()})
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise type(e)(
                f"dims {pats} on {path or 'the model'} ({type(m).__name__}): {msg}"
            ) from None
        meta = [
            n
            for n, t in (*new.named_parameters(), *new.named_buffers())
            if t is not None and t.is_meta
        ]
        if meta and not any(t.is_meta for t in (*m.parameters(), *m.buffers())):
            raise RuntimeError(
                f"converter {conv.name or conv.entangle.__name__} left meta tensors {meta[:3]} "
                f"on {path or 'the model'} ({type(m).__name__})"
            )
        new.__dict__["_tk_origin"] = Origin.of(m)
        new.__dict__["_tk_converter"] = conv
        new.train(m.training)
        new_for[mid] = new
    for c, fix in restore.values():
        c.__dict__.setdefault("_tk_restore", {})
        for k, v in fix.items():
            c.__dict__["_tk_restore"].setdefault(k, getattr(c, k))
            setattr(c, k, v)
    if new_for:
        if id(model) in new_for:
            model = new_for[id(model)]
        else:
            _replace(model, new_for, set())
    if example_inputs is not None:
        check_flow(original, model, example_inputs)
    return model


def _replace(parent: nn.Module, new_for: dict[int, nn.Module], seen: set[int]) -> None:
    if id(parent) in seen:
        return
    seen.add(id(parent))
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        if id(child) in new_for:
            parent._modules[name] = new_for[id(child)]
        else:
            _replace(child, new_for, seen)


def _extract_one(m: EntangledModule, selection: Mapping[str, Any]) -> nn.Module:
    conv = m.__dict__.get("_tk_converter")
    if conv is None:
        return m.extract(selection)
    if conv.extract is None:
        from .registry import retype

        out = retype(m.extract(selection), m.__dict__["_tk_origin"])
        out.train(m.training)
        return out
    return conv.extract(m, selection, m.__dict__["_tk_origin"])


def extract(supernet: nn.Module, selection: Mapping[str, Any]) -> nn.Module:
    """A plain copy of ``supernet`` in which every (outermost) entangled submodule is
    replaced by the chosen sub-network with the sliced weights copied. Other modules,
    parameters and buffers are deep-copied.

    ``selection``: ``{name: value}`` with a value for every choice of the entangled
    modules (or a :class:`~tangle_kernels.nn.HardArch`). The result's output equals the
    supernet's under the one-hot arch of ``selection`` (its widths are the sliced ones
    where the supernet zero-pads). A module made by :func:`entangle` comes back as its
    original class (``nn.Linear``, timm's ``BatchNormAct2d``, transformers'
    ``Conv1D``, ...; a pickled extracted model loads without tangle_kernels) with its
    size attributes updated; an entangled module built directly returns its plain
    counterpart (:mod:`tangle_kernels.nn.plain`). Attributes that entangle changed on
    containers (the disabled fast path of ``nn.TransformerEncoderLayer``) are
    restored. Parameters tied in the supernet (one ``nn.Parameter`` under several
    names, nanoGPT's ``wte`` / ``lm_head``) stay tied: the copies are one parameter
    (``ValueError`` when their sliced shapes differ).
    """
    if not isinstance(supernet, nn.Module):
        raise TypeError(f"supernet: expected an nn.Module, got {type(supernet).__name__}")
    if not isinstance(selection, Mapping):
        raise TypeError(
            f"selection: expected a mapping name -> value, got {type(selection).__name__}"
        )
    if isinstance(supernet, EntangledModule):
        return _extract_one(supernet, selection)
    memo: dict[int, Any] = {}
    token = _MEMO.set(memo)
    try:
        stack = [supernet]
        found: dict[int, EntangledModule] = {}
        while stack:
            m = stack.pop()
            for child in m.children():
                if isinstance(child, EntangledModule):
                    found.setdefault(id(child), child)
                else:
                    stack.append(child)
        for mid, child in found.items():
            memo[mid] = _extract_one(child, selection)
        out = copy.deepcopy(supernet, memo)
    finally:
        _MEMO.reset(token)
    for m in out.modules():
        fix = m.__dict__.pop("_tk_restore", None)
        if fix:
            for k, v in fix.items():
                setattr(m, k, v)
    _retie(supernet, out)
    return out


def _param_at(root: nn.Module, name: str):
    mod, _, leaf = name.rpartition(".")
    try:
        owner = root.get_submodule(mod) if mod else root
    except AttributeError:
        return None, None
    if leaf not in owner._parameters:
        return None, None
    return owner, leaf


def _retie(supernet: nn.Module, out: nn.Module) -> None:
    groups: dict[int, list[str]] = {}
    for name, p in supernet.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        if len(names) < 2:
            continue
        found = [(n, *_param_at(out, n)) for n in names]
        found = [
            (n, o, leaf)
            for n, o, leaf in found
            if o is not None and o._parameters[leaf] is not None
        ]
        if len(found) < 2:
            continue
        n0, o0, l0 = found[0]
        p0 = o0._parameters[l0]
        for n, o, leaf in found[1:]:
            p = o._parameters[leaf]
            if p is p0:
                continue
            if p.shape != p0.shape or (p.device.type != "meta" and not torch.equal(p, p0)):
                raise ValueError(
                    f"extract: {n0!r} and {n!r} are one parameter in the supernet but their "
                    f"sub-network shapes differ ({tuple(p0.shape)} vs {tuple(p.shape)}); give "
                    "both modules the same width choices"
                )
            o._parameters[leaf] = p0

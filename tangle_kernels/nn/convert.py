"""Embedding into other codebases: :func:`entangle` turns the layers of an existing
model into entangled ones (keeping the weights), :func:`extract` turns a supernet back
into a plain model of one sub-network."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .base import EntangledModule
from .conv import EntangledBatchNorm2d, EntangledConv2d
from .embedding import EntangledEmbedding
from .linear import EntangledLinear
from .norm import EntangledLayerNorm
from .spec import check_choices

__all__ = ["entangle", "extract", "ENTANGLE_ARGS"]

#: The layer types :func:`entangle` converts and the arguments that can follow a choice.
ENTANGLE_ARGS: dict[type, tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features", "out_segments"),
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "groups"),
    nn.BatchNorm2d: ("num_features",),
    nn.LayerNorm: ("normalized_shape",),
    nn.Embedding: ("embedding_dim",),
}


def _kind(m: nn.Module) -> type | None:
    for t in ENTANGLE_ARGS:
        if isinstance(m, t) and not isinstance(m, EntangledModule):
            return t
    return None


def entangle(
    model: nn.Module,
    choices: Mapping[str, Sequence],
    dims: Mapping[str, Any],
    *,
    inplace: bool = False,
    kernel_transform: bool = False,
) -> nn.Module:
    """Swap the layers of ``model`` named by ``dims`` for entangled versions that keep
    their weights (the same ``nn.Parameter`` objects).

    Args:
        model: any ``nn.Module``. Its ``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``,
            ``nn.LayerNorm`` and ``nn.Embedding`` layers can be converted.
        choices: ``{name: values}``, e.g. ``{"hidden": [128, 256, 512]}``.
        dims: ``{"<module path>.<argument>": spec}``. The key is an ``fnmatch`` pattern
            matched against ``<path>.<arg>`` for every convertible layer (``path`` as in
            ``model.named_modules()``, e.g. ``"blocks.0.mlp.fc1.out_features"``;
            ``"*.fc1.out_features"`` matches every block's). The value is a width spec:
            a choice name, a tuple of names and ints (``("embed", "ratio")``) or an int.
            When several patterns match one argument the LAST one in ``dims`` wins (write
            general patterns first, exceptions after). Arguments per layer type:
            Linear ``in_features``, ``out_features``, ``out_segments`` (an int: stacked
            q|k|v blocks, each prefix-sliced by ``out_features``); Conv2d
            ``in_channels``, ``out_channels``, ``kernel_size`` (a choice of odd sizes),
            ``groups``; BatchNorm2d ``num_features``; LayerNorm ``normalized_shape``;
            Embedding ``embedding_dim``. Every spec's max must equal the layer's size.
        inplace: modify ``model`` itself; by default a deep copy is converted.
        kernel_transform: give entangled convs with a kernel-size choice the
            Once-for-All kernel-transform matrices (identity-initialised).

    Returns the converted model. Layers that no pattern names stay as they are. Errors
    (``ValueError``) name the offending pattern: a pattern that matches nothing, an
    unknown choice name, a width above the layer's size, a kernel size that does not
    fit. The caller keeps the data flow consistent (the layer after a layer whose
    ``out_features`` follows ``"hidden"`` needs ``in_features`` following ``"hidden"``).
    Code that reshapes by a fixed size (a stock attention splitting a fixed number of
    heads) still runs at the max size; use :class:`EntangledAttention` for attention.
    ``nn.MultiheadAttention`` uses its projections' weights directly and cannot be
    converted layer by layer.

    Run the converted model with an arch stored by :func:`set_arch` (its layers are
    called without one).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(dims, Mapping) or not dims:
        raise ValueError("dims: expected a non-empty mapping '<module path>.<argument>' -> spec")
    choices = check_choices(choices, list(choices or {}), "choices", None) if choices else {}
    if not inplace:
        model = copy.deepcopy(model)
    # Every convertible (path, module, type); modules inside nn.MultiheadAttention are marked.
    layers = []
    mha_paths = [p for p, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    entangled_paths = [p for p, m in model.named_modules() if isinstance(m, EntangledModule)]
    for path, m in model.named_modules():
        t = _kind(m)
        if t is None:
            continue
        if any(path.startswith(p + ".") or (p == "" and path) for p in entangled_paths):
            continue
        layers.append((path, m, t))
    used = dict.fromkeys(dims, False)
    plan: dict[int, tuple[str, nn.Module, type, dict]] = {}
    for path, m, t in layers:
        kw: dict[str, Any] = {}
        for arg in ENTANGLE_ARGS[t]:
            key = f"{path}.{arg}" if path else arg
            for pat, spec in dims.items():
                if fnmatch.fnmatchcase(key, pat):
                    used[pat] = True
                    kw[arg] = (pat, spec)
        if kw:
            inside = [p for p in mha_paths if path.startswith(p + ".") or p == ""]
            if inside:
                raise ValueError(
                    f"dims: {sorted({p for p, _ in kw.values()})} match {path!r} inside the "
                    f"nn.MultiheadAttention {inside[0]!r}, which uses its projections' weights "
                    "directly; replace it with tangle_kernels.nn.EntangledAttention"
                )
            if id(m) not in plan:
                plan[id(m)] = (path, m, t, kw)
    unused = [p for p, u in used.items() if not u]
    if unused:
        avail = [f"{p}.{a}" if p else a for p, _, t in layers for a in ENTANGLE_ARGS[t]]
        shown = ", ".join(avail[:12]) + (", ..." if len(avail) > 12 else "")
        raise ValueError(
            f"dims: pattern {unused[0]!r} matches no layer argument (available: {shown or 'none'})"
        )
    new_for: dict[int, nn.Module] = {}
    for mid, (path, m, t, kw) in plan.items():
        specs = {a: s for a, (_, s) in kw.items()}
        try:
            new_for[mid] = _convert(m, t, specs, choices, kernel_transform)
        except (ValueError, TypeError, KeyError) as e:
            pats = sorted({p for p, _ in kw.values()})
            raise type(e)(
                f"dims {pats} on {path or 'the model'} ({type(m).__name__}): {e}"
            ) from None
    if not new_for:
        return model
    for mid, new in new_for.items():
        new.train(plan[mid][1].training)
    if id(model) in new_for:
        return new_for[id(model)]
    _replace(model, new_for, set())
    return model


def _convert(m: nn.Module, t: type, specs: dict, choices: Mapping, kernel_transform: bool):
    if t is nn.Linear:
        seg = specs.pop("out_segments", 1)
        if isinstance(seg, bool) or not isinstance(seg, int):
            raise ValueError(f"out_segments={seg!r} must be an int")
        return EntangledLinear.from_module(m, choices, out_segments=seg, **specs)
    if t is nn.Conv2d:
        kt = kernel_transform and isinstance(specs.get("kernel_size"), str)
        return EntangledConv2d.from_module(m, choices, kernel_transform=kt, **specs)
    if t is nn.BatchNorm2d:
        return EntangledBatchNorm2d.from_module(m, choices, **specs)
    if t is nn.LayerNorm:
        return EntangledLayerNorm.from_module(m, choices, **specs)
    return EntangledEmbedding.from_module(m, choices, **specs)


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


def extract(supernet: nn.Module, selection: Mapping[str, Any]) -> nn.Module:
    """A plain copy of ``supernet`` in which every (outermost) entangled submodule is
    replaced by its ``extract(selection)``: the chosen sub-network with the sliced
    weights copied. Other modules, parameters and buffers are deep-copied.

    ``selection``: ``{name: value}`` with a value for every choice of the entangled
    modules (or a :class:`~tangle_kernels.nn.HardArch`). The result's output equals the
    supernet's under the one-hot arch of ``selection`` (its widths are the sliced ones
    where the supernet zero-pads). Parameters tied across modules are copied
    separately (the copies hold equal values).
    """
    if not isinstance(supernet, nn.Module):
        raise TypeError(f"supernet: expected an nn.Module, got {type(supernet).__name__}")
    if not isinstance(selection, Mapping):
        raise TypeError(
            f"selection: expected a mapping name -> value, got {type(selection).__name__}"
        )
    if isinstance(supernet, EntangledModule):
        return supernet.extract(selection)
    memo: dict[int, Any] = {}
    stack = [supernet]
    while stack:
        m = stack.pop()
        for child in m.children():
            if isinstance(child, EntangledModule):
                if id(child) not in memo:
                    memo[id(child)] = child.extract(selection)
            else:
                stack.append(child)
    return copy.deepcopy(supernet, memo)

"""Search spaces, by their ``--space`` name.

The registry maps each name to a ``"module:Class"`` string and imports the module only
when the space is asked for, so ``tangle-search --help`` and the other spaces do not pay
for (or break on) one space's imports.

==============  ======================================================  ==================
name            class                                                   what
==============  ======================================================  ==================
nanogpt         tangle_kernels.spaces.nanogpt:NanoGPTSpace              char-level GPT
conv-macro      tangle_kernels.spaces.conv_macro:ConvMacroSpace         toy conv macro
entangled-cell  tangle_kernels.spaces.cells:EntangledCellSpace          toy entangled cell
nb201           tangle_kernels.spaces.cells:NB201Space                  NAS-Bench-201 cell
darts           tangle_kernels.spaces.darts:DartsCellSpace              DARTS cell
autoformer      tangle_kernels.spaces.autoformer:AutoFormerSpace        AutoFormer ViT
mobilenetv3     tangle_kernels.spaces.mobilenetv3:MobileNetV3Space      MobileNetV3 / OFA
==============  ======================================================  ==================
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from .base import DataSource, SearchSpace, SpaceError

__all__ = [
    "SPACES",
    "SpaceError",
    "SearchSpace",
    "DataSource",
    "get_space",
    "make_space",
    "register_space",
    "space_names",
    "space_status",
]

#: ``--space`` name -> ``"module:Class"`` (imported lazily by :func:`get_space`).
SPACES: dict[str, str] = {
    "nanogpt": "tangle_kernels.spaces.nanogpt:NanoGPTSpace",
    "conv-macro": "tangle_kernels.spaces.conv_macro:ConvMacroSpace",
    "entangled-cell": "tangle_kernels.spaces.cells:EntangledCellSpace",
    "nb201": "tangle_kernels.spaces.cells:NB201Space",
    "darts": "tangle_kernels.spaces.darts:DartsCellSpace",
    "autoformer": "tangle_kernels.spaces.autoformer:AutoFormerSpace",
    "mobilenetv3": "tangle_kernels.spaces.mobilenetv3:MobileNetV3Space",
}


def space_names() -> list[str]:
    """The registered ``--space`` names, in registry order."""
    return list(SPACES)


def register_space(cls_or_target: type[SearchSpace] | str, name: str | None = None) -> None:
    """Register a space class (its ``name`` attribute is the key) or a ``"module:Class"``
    string under ``name``. Re-registering a name replaces it."""
    if isinstance(cls_or_target, str):
        if not name:
            raise ValueError("register_space: a 'module:Class' target needs a name")
        if ":" not in cls_or_target:
            raise ValueError(f"register_space: {cls_or_target!r} is not of the form 'module:Class'")
        SPACES[name] = cls_or_target
        return
    cls = cls_or_target
    if not (isinstance(cls, type) and issubclass(cls, SearchSpace)):
        raise TypeError(f"register_space: expected a SearchSpace subclass, got {cls!r}")
    key = name or cls.name
    if not key:
        raise ValueError(f"register_space: {cls.__name__} has no name")
    SPACES[key] = cls
    _LOADED[key] = cls


_LOADED: dict[str, type[SearchSpace]] = {}


def get_space(name: str) -> type[SearchSpace]:
    """The space class registered as ``name``; :class:`SpaceError` for an unknown name or
    a space whose module is not available (not written yet, or failing to import)."""
    if name in _LOADED:
        return _LOADED[name]
    if name not in SPACES:
        raise SpaceError(f"unknown space {name!r}; choose one of: {', '.join(SPACES)}")
    target = SPACES[name]
    if isinstance(target, type):
        _LOADED[name] = target
        return target
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
            raise SpaceError(
                f"space {name!r} is not available in this installation "
                f"(module {module_name} is missing)"
            ) from None
        raise SpaceError(
            f"space {name!r} is not available: importing {module_name} failed: "
            f"{type(e).__name__}: {e}"
        ) from None
    except Exception as e:
        raise SpaceError(
            f"space {name!r} is not available: importing {module_name} failed: "
            f"{type(e).__name__}: {e}"
        ) from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise SpaceError(f"space {name!r} is not available: {module_name} has no {cls_name}")
    _LOADED[name] = cls
    return cls


def space_status() -> dict[str, str]:
    """``{name: "ok" | why not}`` for every registered space (imports each)."""
    out = {}
    for n in SPACES:
        try:
            get_space(n)
            out[n] = "ok"
        except SpaceError as e:
            out[n] = str(e)
    return out


def make_space(
    name: str,
    choices: Mapping[str, Sequence] | None = None,
    hparams: Mapping[str, Any] | None = None,
    preset: str | None = None,
) -> SearchSpace:
    """``get_space(name)(choices=..., hparams=..., preset=...)``."""
    return get_space(name)(choices=choices, hparams=hparams, preset=preset)

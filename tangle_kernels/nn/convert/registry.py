"""The converter registry of :func:`~tangle_kernels.nn.entangle`: one
:class:`Converter` per module type (how to entangle it, how to extract it back).

A module is matched

- by its exact type (a class, or its ``"module.QualName"`` string, so that a
  converter for a library class is registered without importing the library);
- by a registered base class, when the subclass overrides no method of that base
  (its forward is the base's); a subclass that overrides one is REFUSED (its
  behaviour would be lost) unless a converter is registered for it;
- by a ``match`` predicate (a class recognised by its shape and source, e.g.
  nanoGPT's ``LayerNorm``), tried after the types.

Guards (:func:`register_guard`) watch containers whose own forward reads their
children's weights or splits them by fixed sizes (``nn.TransformerEncoderLayer``'s
fast path, attention modules): they refuse a conversion that would be silently
wrong, or make it exact (and undo that on extract).
"""

from __future__ import annotations

import contextvars
import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "Converter",
    "Guard",
    "Origin",
    "register_converter",
    "register_guard",
    "find_converter",
    "find_guard",
    "qualname",
    "retype",
    "registered",
    "copy_state",
    "refuse_tied",
]

# Methods a subclass may override without changing what the module computes.
_HARMLESS = {
    "__init__",
    "__repr__",
    "extra_repr",
    "reset_parameters",
    "_reset_parameters",
    "__setstate__",
    "__getstate__",
    "_load_from_state_dict",
    "_save_to_state_dict",
    "__init_subclass__",
    "__class_getitem__",
}


@dataclass(frozen=True)
class Converter:
    """How :func:`entangle` converts one module type and :func:`extract` turns it back.

    Args:
        args: the arguments a ``dims`` key can name after the module path
            (``"<path>.<arg>"``).
        entangle: ``entangle(module, specs, choices, options) -> EntangledModule``;
            ``specs`` maps each named argument to its width spec, ``options`` holds the
            keywords of :func:`entangle` (``kernel_transform``) and ``shared`` (the ids
            of parameters tied across modules). It raises ``ValueError`` for a
            configuration it cannot make exact.
        extract: ``extract(entangled, selection, origin) -> nn.Module``: the chosen
            sub-network as a module of the original class (``origin`` is the
            :class:`Origin` recorded at entangle time). ``None``: the entangled module's
            own ``extract`` re-typed to the original class with :func:`retype` (for
            classes whose state is the stock torch class's).
        name: shown in messages.
        match: a predicate for converters not keyed by a type (see the module docstring).
    """

    args: tuple[str, ...]
    entangle: Callable[..., nn.Module]
    extract: Callable[..., nn.Module] | None = None
    name: str = ""
    match: Callable[[nn.Module], bool] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Guard:
    """A container whose forward depends on how its children are converted.

    ``check(container, path, targeted) -> dict | None``: ``targeted`` maps each
    converted descendant's path (relative to the container) to the arguments ``dims``
    sets on it. It raises ``ValueError`` to refuse, or returns ``{attr: value}`` to set
    on the container in the supernet (restored to the original values by extract).
    """

    check: Callable[[nn.Module, str, Mapping[str, tuple]], Mapping[str, Any] | None]
    name: str = ""
    match: Callable[[nn.Module], bool] | None = field(default=None, compare=False)


@dataclass
class Origin:
    """What :func:`extract` needs to rebuild the original class: the class and its
    instance ``__dict__`` without parameters, buffers and children (a shallow copy)."""

    cls: type
    state: dict

    @classmethod
    def of(cls, m: nn.Module) -> Origin:
        st = {
            k: v for k, v in m.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")
        }
        return cls(type(m), st)


_TYPES: dict[Any, Converter] = {}
_PREDICATES: list[Converter] = []
_GUARDS: dict[Any, Guard] = {}
_PRED_GUARDS: list[Guard] = []


# The deepcopy memo of the extract() in progress: the original state of every extracted
# module is copied with it, so objects shared across modules (a transformers config)
# stay shared in the extracted model.
_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "tangle_extract_memo", default=None
)


def copy_state(state: Any) -> Any:
    """A deep copy (of an :class:`Origin` state, a child module) inside the memo of the
    running extract."""
    memo = _MEMO.get()
    return copy.deepcopy(state) if memo is None else copy.deepcopy(state, memo)


def qualname(t: type) -> str:
    """``"module.QualName"`` of a class (the string key of the registry)."""
    return f"{t.__module__}.{t.__qualname__}"


def register_converter(
    key: type | str | None, converter: Converter, *, replace: bool = False
) -> Converter:
    """Register ``converter`` for the class ``key`` (a class or its ``"module.QualName"``),
    or, with ``key=None``, as a predicate converter (``converter.match`` required).
    Registering a key twice raises unless ``replace``. Returns the converter."""
    if key is None:
        if converter.match is None:
            raise ValueError("register_converter(None, ...): the converter needs a match predicate")
        _PREDICATES.append(converter)
        return converter
    k = key if isinstance(key, str) else qualname(key)
    if k in _TYPES and not replace:
        raise ValueError(f"register_converter: {k} already has a converter (pass replace=True)")
    _TYPES[k] = converter
    return converter


def register_guard(key: type | str | None, guard: Guard) -> Guard:
    """Register ``guard`` for the container class ``key`` (see :class:`Guard`), or with
    ``key=None`` as a predicate guard (``guard.match`` required)."""
    if key is None:
        if guard.match is None:
            raise ValueError("register_guard(None, ...): the guard needs a match predicate")
        _PRED_GUARDS.append(guard)
        return guard
    _GUARDS[key if isinstance(key, str) else qualname(key)] = guard
    return guard


def registered() -> dict[str, Converter]:
    """``{"module.QualName": converter}`` of the type-keyed converters."""
    return dict(_TYPES)


def _overrides(sub: type, base: type) -> list[str]:
    """The methods of ``base`` that a class between ``sub`` and ``base`` redefines."""
    out = []
    for klass in sub.__mro__:
        if klass is base:
            break
        for name, v in vars(klass).items():
            if name in _HARMLESS or not callable(getattr(base, name, None)):
                continue
            if inspect.isfunction(v) or isinstance(v, (staticmethod, classmethod)):
                out.append(f"{klass.__name__}.{name}")
    return out


def find_converter(m: nn.Module) -> tuple[Converter | None, str | None]:
    """``(converter, None)`` for a convertible module, ``(None, reason)`` for a refused
    subclass, ``(None, None)`` for a type with no converter."""
    t = type(m)
    for klass in t.__mro__:
        conv = _TYPES.get(qualname(klass))
        if conv is None:
            continue
        if klass is t:
            return conv, None
        over = _overrides(t, klass)
        if not over:
            return conv, None
        return None, (
            f"{t.__name__} ({qualname(t)}) subclasses {klass.__name__} but redefines "
            f"{', '.join(over)}, so converting it as a {klass.__name__} would lose its "
            "behaviour; register a converter for it "
            "(tangle_kernels.nn.register_converter) or split it into stock layers"
        )
    for conv in _PREDICATES:
        if conv.match(m):
            return conv, None
    return None, None


def refuse_tied(options: Mapping, *params) -> None:
    """For converters that copy weights into a new layout: a tied weight would be untied."""
    shared = options.get("shared", ())
    if any(p is not None and id(p) in shared for p in params):
        raise ValueError(
            "a weight of this module is tied to another module's; the converter stores it in a "
            "new layout (a transposed or stacked copy), which would untie it"
        )


def find_guard(m: nn.Module) -> Guard | None:
    for klass in type(m).__mro__:
        g = _GUARDS.get(qualname(klass))
        if g is not None:
            return g
    for g in _PRED_GUARDS:
        if g.match(m):
            return g
    return None


def retype(
    module: nn.Module,
    origin: Origin,
    *,
    keep: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
) -> nn.Module:
    """A module of ``origin.cls`` with ``module``'s parameters, buffers and children.

    Its ``__dict__`` starts from (a deep copy of) the original instance's, then takes
    ``module``'s entries (all but hooks and ``training`` when ``only`` is None, else the
    names in ``only``), then restores the original's ``keep`` entries. Valid when
    ``origin.cls`` keeps the same state as ``type(module)`` (a stock torch class and its
    subclasses that add no state)."""
    new = origin.cls.__new__(origin.cls)
    new.__dict__.update(copy_state(origin.state))
    for k, v in module.__dict__.items():
        if k in ("_parameters", "_buffers", "_modules"):
            new.__dict__[k] = v
        elif only is None:
            if "hook" in k or k == "training" or k in keep:
                continue
            new.__dict__[k] = v
        elif k in only:
            new.__dict__[k] = v
    return new

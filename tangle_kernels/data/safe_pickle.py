"""Restricted unpickling: read the pickled data files of CIFAR (python version) and of the
seeds' toy tabular benchmarks without running code from the file.

``pickle.load`` calls any importable callable the file names (``os.system`` included), so a
downloaded pickle is code. :class:`RestrictedUnpickler` overrides ``find_class`` (the only
way a pickle reaches a global) and admits a fixed set of names, resolved here to the
objects themselves (never imported by the name the file gives):

- plain containers with no opcode of their own: ``set``, ``frozenset``, ``bytearray``,
  ``collections.OrderedDict``, and ``_codecs.encode`` restricted to latin-1 strings (how
  protocol 2 stores ``bytes``); dict/list/tuple/str/int/float/bytes need no global;
- with ``arrays=True``: numpy array reconstruction (``numpy[._]core.multiarray._reconstruct``,
  ``numpy.ndarray``, ``numpy[._]core.numeric._frombuffer``) and ``numpy.dtype``;
- with ``scalars=True``: numpy scalars (``numpy[._]core.multiarray.scalar``) and
  ``numpy.dtype``.

Arrays of dtype ``object`` are refused (their items would be pickled objects). Any other
global raises :class:`UnsafePickleError` naming it.
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
from typing import Any

import numpy as np

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "safe_load", "safe_loads"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global the restricted unpickler does not admit."""


def _numpy_module(name: str):
    """``numpy._core.<name>`` (numpy >= 2) or ``numpy.core.<name>`` (numpy 1.x)."""
    import importlib

    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module(f"numpy.core.{name}")


def _latin1_encode(obj: Any, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for ``bytes``: a str encoded as latin-1."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(
            f"_codecs.encode is admitted only as encode(str, 'latin1'), got "
            f"encode({type(obj).__name__}, {encoding!r})"
        )
    return obj.encode("latin1")


def _checked_dtype(*args, **kwargs):
    dt = np.dtype(*args, **kwargs)
    if dt.hasobject:
        raise UnsafePickleError(f"numpy dtype {dt!r} holds Python objects; refused")
    return dt


_PLAIN: dict[tuple[str, str], Any] = {}
for _mod in ("builtins", "__builtin__"):
    _PLAIN[(_mod, "set")] = set
    _PLAIN[(_mod, "frozenset")] = frozenset
    _PLAIN[(_mod, "bytearray")] = bytearray
_PLAIN[("collections", "OrderedDict")] = collections.OrderedDict
_PLAIN[("_codecs", "encode")] = _latin1_encode


def _numpy_globals(arrays: bool, scalars: bool) -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {}
    if not (arrays or scalars):
        return out
    multiarray = _numpy_module("multiarray")
    out[("numpy", "dtype")] = _checked_dtype  # dtype(str, align, copy) + state
    if arrays:
        numeric = _numpy_module("numeric")

        def _reconstruct(subtype, shape, dtype):
            if subtype is not np.ndarray:
                raise UnsafePickleError(f"array subtype {subtype!r} refused (only numpy.ndarray)")
            return multiarray._reconstruct(subtype, shape, dtype)

        def _frombuffer(buf, dtype, shape, order):
            if np.dtype(dtype).hasobject:
                raise UnsafePickleError("object arrays are refused")
            return numeric._frombuffer(buf, dtype, shape, order)

        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            out[(mod, "_reconstruct")] = _reconstruct
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            out[(mod, "_frombuffer")] = _frombuffer
        out[("numpy", "ndarray")] = np.ndarray
    if scalars:

        def _scalar(dtype, data=None):
            if not isinstance(dtype, np.dtype) or dtype.hasobject:
                raise UnsafePickleError(f"numpy scalar of dtype {dtype!r} refused")
            return multiarray.scalar(dtype, data) if data is not None else multiarray.scalar(dtype)

        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            out[(mod, "scalar")] = _scalar
    return out


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that admits only plain containers, bytes and (optionally)
    numpy arrays and/or numpy scalars; see the module docstring.

    Args:
        file: a binary file object.
        arrays: admit numpy array reconstruction (CIFAR python batches).
        scalars: admit numpy scalars (the toy benchmarks' float64 metrics).
        source: a name for error messages (the file path).
        encoding: how Python 2 ``str`` objects are decoded (``"latin1"`` keeps numpy's
            Python 2 array payloads intact, as numpy documents).
    """

    def __init__(self, file, *, arrays: bool = False, scalars: bool = False,
                 source: str = "<pickle>", encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self.source = source
        self._allowed = dict(_PLAIN)
        self._allowed.update(_numpy_globals(arrays, scalars))
        self._what = "plain containers, bytes" + (
            ", numpy arrays" if arrays else "") + (", numpy scalars" if scalars else "")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refusing to load the global {module}.{name}: this reader "
                f"admits only {self._what} (the file may run code when unpickled; "
                f"convert it with a trusted tool)"
            ) from None

    def persistent_load(self, pid):  # pragma: no cover - no persistent ids in data files
        raise UnsafePickleError(f"{self.source}: persistent ids are not allowed ({pid!r})")


def _check_arrays(obj: Any, source: str) -> Any:
    """Refuse object arrays anywhere in ``obj`` (their ``__setstate__`` takes objects)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, np.ndarray) and o.dtype.hasobject:
            raise UnsafePickleError(f"{source}: object arrays are refused")
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
    return obj


def safe_load(path: str | os.PathLike, *, arrays: bool = False, scalars: bool = False) -> Any:
    """Unpickle the file at ``path`` with :class:`RestrictedUnpickler`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        obj = RestrictedUnpickler(f, arrays=arrays, scalars=scalars, source=path).load()
    return _check_arrays(obj, path)


def safe_loads(data: bytes, *, arrays: bool = False, scalars: bool = False,
               source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    obj = RestrictedUnpickler(io.BytesIO(data), arrays=arrays, scalars=scalars,
                              source=source).load()
    return _check_arrays(obj, source)

"""Width specs: how a size argument of an entangled module names its choices.

A size argument (``in_features``, ``out_channels``, ``embed_dim``, a depth, ...) is

- an ``int``: fixed at that size;
- a ``str``: the name of a choice whose values are the sizes
  (``"embed"`` with ``choices["embed"] = [192, 384]``);
- a ``tuple`` of names and ints whose product is the size
  (``("embed", "mlp_ratio")`` is ``embed * mlp_ratio``; ``("heads", 64)`` is
  ``heads * 64``). Products must be positive integers for every candidate.

The max size of an argument is the max over its candidates.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Union

Spec = Union[int, str, tuple]

__all__ = ["WidthSpec", "ordered_union", "check_choices"]


def check_choices(
    choices: Mapping[str, Sequence] | None, names: Sequence[str], arg: str, spec: Any
) -> dict[str, tuple]:
    """``{name: tuple(values)}`` for ``names``; clear errors for unknown or empty choices."""
    if choices is None:
        choices = {}
    if not isinstance(choices, Mapping):
        raise TypeError(f"choices: expected a mapping name -> values, got {type(choices).__name__}")
    out = {}
    for n in names:
        if n not in choices:
            known = ", ".join(repr(k) for k in choices) or "none"
            raise ValueError(f"{arg}={spec!r}: unknown choice {n!r} (choices given: {known})")
        vals = choices[n]
        if isinstance(vals, (str, bytes)) or not isinstance(vals, Sequence):
            try:
                vals = list(vals)
            except TypeError:
                raise TypeError(
                    f"choices[{n!r}]: expected a sequence of values, got {type(vals).__name__}"
                ) from None
        vals = tuple(vals)
        if len(vals) == 0:
            raise ValueError(f"choices[{n!r}]: empty list of values")
        if len(set(vals)) != len(vals):
            raise ValueError(f"choices[{n!r}]: duplicate values in {list(vals)}")
        out[n] = vals
    return out


def ordered_union(*name_lists: Sequence[str]) -> tuple[str, ...]:
    """Names in order of first appearance."""
    return tuple(dict.fromkeys(n for names in name_lists for n in names))


class WidthSpec:
    """One parsed size argument (see the module docstring).

    Attributes:
        arg: the argument's name, used in error messages.
        spec: the spec as given.
        names: the choice names it depends on (order of appearance, no repeats).
        choices: ``{name: values}`` for those names.
        max, min: the largest and smallest candidate size.
    """

    def __init__(
        self,
        spec: Spec,
        choices: Mapping[str, Sequence] | None,
        arg: str,
        *,
        allow_zero: bool = False,
    ):
        self.arg = arg
        self.spec = spec
        if isinstance(spec, bool):
            raise TypeError(f"{arg}={spec!r}: expected an int, a choice name or a tuple of them")
        if isinstance(spec, numbers.Integral) or isinstance(spec, str):
            factors: tuple = (spec,)
        elif isinstance(spec, (tuple, list)):
            factors = tuple(spec)
            if not factors:
                raise ValueError(f"{arg}={spec!r}: empty tuple (expected names and/or ints)")
        else:
            raise TypeError(
                f"{arg}={spec!r}: expected an int, a choice name (str) or a tuple of names/ints, "
                f"got {type(spec).__name__}"
            )
        for f in factors:
            if isinstance(f, bool) or not isinstance(f, (numbers.Integral, str)):
                raise TypeError(f"{arg}={spec!r}: factor {f!r} is neither an int nor a choice name")
            if isinstance(f, numbers.Integral) and (f < 0 or (f == 0 and not allow_zero)):
                raise ValueError(f"{arg}={spec!r}: size {f} must be positive")
        self.factors = tuple(f if isinstance(f, str) else int(f) for f in factors)
        self.names: tuple[str, ...] = ordered_union([f for f in self.factors if isinstance(f, str)])
        self.choices = check_choices(choices, self.names, arg, spec)
        for n, vals in self.choices.items():
            for v in vals:
                if isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise TypeError(f"{arg}={spec!r}: choice {n!r} has the non-numeric value {v!r}")
        self._allow_zero = allow_zero
        sizes = [
            self.size(dict(zip(self.names, combo)))
            for combo in itertools.product(*self.choices.values())
        ]
        self.max = max(sizes)
        self.min = min(sizes)

    @property
    def fixed(self) -> bool:
        """True when the size depends on no choice."""
        return not self.names

    def size(self, values: Mapping[str, Any]) -> int:
        """The size for the choice values ``values`` (a mapping with at least ``names``)."""
        p = 1
        for f in self.factors:
            p = p * (values[f] if isinstance(f, str) else f)
        w = int(round(p))
        if (
            not math.isclose(p, w, rel_tol=0, abs_tol=1e-9)
            or w < 0
            or (w == 0 and not self._allow_zero)
        ):
            shown = {n: values[n] for n in self.names}
            raise ValueError(
                f"{self.arg}={self.spec!r}: size {p} for {shown} is not a positive integer"
            )
        return w

    def sizes(self) -> list[int]:
        """The candidate sizes in ``itertools.product`` order of ``names``."""
        return [
            self.size(dict(zip(self.names, c))) for c in itertools.product(*self.choices.values())
        ]

    def same_as(self, other: WidthSpec) -> bool:
        return sorted(map(repr, self.factors)) == sorted(map(repr, other.factors))

    def __repr__(self) -> str:
        return f"WidthSpec({self.arg}={self.spec!r}, max={self.max})"

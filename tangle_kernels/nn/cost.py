"""Costs of the sub-networks of a supernet: the parameters and MACs of any selection,
counted from the extracted plain modules (no hand formula that can drift from the
model), and their expectation under a factorised architecture distribution as a
differentiable function of the per-choice probabilities.

The supernet is cut into *units*: every entangled layer (its ``extract`` gives the
unit's plain module for each assignment of its own choices), and the parameters a
plain module owns directly. A unit exists under a *condition*: a block ``j`` of a
:class:`~tangle_kernels.nn.DepthMixer` exists when the depth is ``> j``, the op ``i``
of an :class:`~tangle_kernels.nn.OpMixer` when its choice takes value ``i``. So every
unit's cost depends on a few choices only, and

    E_p[cost] = sum_units sum_{values of its choices} prod_n p_n[value_n] * cost_unit

is a small multilinear polynomial in the probabilities ``p_n``: exact, and
differentiable in the architecture parameters with plain autograd.

MACs follow :mod:`tangle_kernels.spaces._vision`'s convention: convolutions
``H_out W_out C_out (C_in / groups) k_h k_w``, linear layers ``tokens x in x out``,
self-attention's two matrix products ``2 T^2 (heads x head_dim)``, per sample;
normalisation, activations and additions are not counted. The token count and the
spatial size each layer sees are read from one forward pass of the supernet at the
max size and one at the min size; a supernet where they depend on the choices is
refused (every space of this package keeps them fixed).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .base import EntangledModule
from .mixers import DepthMixer, OpMixer

__all__ = ["CostModel", "CostError"]


class CostError(ValueError):
    """The supernet's costs cannot be computed as asked (the message says why)."""


class _Unit:
    __slots__ = ("path", "module", "names", "params", "macs", "latency", "_cond", "_numel",
                 "owner")

    def __init__(self, path: str, module: nn.Module | None, names: tuple[str, ...]):
        self.path, self.module, self.names = path, module, names
        self.owner: nn.Module | None = None  # a plain unit: the module owning its parameters
        self.params: torch.Tensor | None = None  # [len(v) for v in names], cost x condition
        self.macs: torch.Tensor | None = None
        self.latency: torch.Tensor | None = None  # ms (nn.latency.add_latency)


def _plain_macs(m: nn.Module, tokens: int, spatial: int | None, recurse: bool = True) -> int:
    """MACs per sample of a plain (extracted) module, by its leaf layers (``recurse``
    False: of ``m`` itself only)."""
    from .plain import SelfAttention

    total = 0
    for sub in (m.modules() if recurse else [m]):
        if isinstance(sub, nn.Conv2d):
            if spatial is None:
                raise CostError(f"{type(sub).__name__}: no output size recorded")
            k = sub.kernel_size[0] * sub.kernel_size[1]
            total += spatial * sub.out_channels * (sub.in_channels // sub.groups) * k
        elif isinstance(sub, nn.Linear):
            total += tokens * sub.in_features * sub.out_features
        elif isinstance(sub, SelfAttention):
            total += 2 * tokens * tokens * sub.num_heads * sub.head_dim
    return total


class CostModel:
    """Parameters and MACs of the sub-networks of ``supernet``.

    Args:
        supernet: a model built from :mod:`tangle_kernels.nn` modules (a space's
            supernet, or one made by :func:`~tangle_kernels.nn.entangle`).
        choices: ``{name: values}`` of every choice of the supernet.
        example: an input batch for ``supernet(example)`` (only needed for MACs: the
            token count and output sizes each layer sees are recorded from it).

    ``params(selection)`` / ``macs(selection)``: the exact cost of one architecture.
    ``expected(probs, "params")``: ``E[cost]`` under ``probs`` (``{name: 1-D tensor}``,
    one probability vector per choice), differentiable in ``probs``.
    """

    def __init__(self, supernet: nn.Module, choices: Mapping[str, Sequence],
                 example: Any = None):
        self.choices = {n: tuple(v) for n, v in choices.items()}
        self._units: list[_Unit] = []
        self._inputs: dict[int, tuple[tuple[int, ...], torch.dtype]] = {}
        self.latency_info: dict | None = None  # set by nn.latency.add_latency
        self._latency_units: list[_Unit] = []  # whole blocks timed (nn.latency)
        seen: set[int] = set()
        self._walk(supernet, "", {}, seen)
        for u in self._units:
            u.params = self._table(u, lambda m: sum(p.numel() for p in m.parameters()))
        self.has_macs = example is not None
        if example is not None:
            shapes = self._record(supernet, example)
            for u in self._units:
                tokens, spatial = shapes.get(id(u.module if u.module is not None else u.owner),
                                             (None, None))
                if tokens is None:  # never ran (e.g. a block no depth reaches)
                    u.macs = torch.zeros_like(u.params)
                elif u.module is None:
                    u._numel = _plain_macs(u.owner, tokens, spatial, recurse=False)
                    u.macs = self._table(u, None)
                else:
                    u.macs = self._table(u, lambda m, t=tokens, s=spatial: _plain_macs(m, t, s))

    # ------------------------------------------------------------------ build
    def _walk(self, m: nn.Module, path: str, cond: dict[str, set], seen: set[int]) -> None:
        if isinstance(m, DepthMixer):
            vals = m.choices[m.depth]
            for j, blk in enumerate(m.blocks):
                allowed = {v for v in vals if v > j}
                if allowed:
                    self._walk(blk, f"{path}blocks.{j}.", self._and(cond, m.depth, allowed), seen)
            return
        if isinstance(m, OpMixer):
            vals = m.choices[m.choice]
            for i, op in enumerate(m.ops):
                self._walk(op, f"{path}ops.{i}.", self._and(cond, m.choice, {vals[i]}), seen)
            return
        if isinstance(m, EntangledModule):
            unknown = [n for n in m.choices if n not in self.choices]
            if unknown:
                raise CostError(f"{path or 'model'} ({type(m).__name__}): choices {unknown} "
                                f"are not in the choices given ({sorted(self.choices)})")
            for n, v in m.choices.items():
                if tuple(v) != self.choices[n]:
                    raise CostError(f"{path or 'model'}: choice {n!r} has values {list(v)}, "
                                    f"the model's are {list(self.choices[n])}")
            u = _Unit(path.rstrip(".") or "model", m, tuple(m.choices))
            u.names = tuple(dict.fromkeys(u.names + tuple(cond)))
            u._cond = cond  # type: ignore[attr-defined]
            self._units.append(u)
            for p in m.parameters():
                seen.add(id(p))
            return
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        if own:
            for p in own:
                seen.add(id(p))
            u = _Unit(path.rstrip(".") or "model", None, tuple(cond))
            u._cond = cond  # type: ignore[attr-defined]
            u._numel = sum(p.numel() for p in own)  # type: ignore[attr-defined]
            u.owner = m
            self._units.append(u)
        for name, child in m.named_children():
            self._walk(child, f"{path}{name}.", cond, seen)

    @staticmethod
    def _and(cond: dict[str, set], name: str, allowed: set) -> dict[str, set]:
        out = dict(cond)
        out[name] = set(allowed) & out[name] if name in out else set(allowed)
        return out

    def _table(self, u: _Unit, count) -> torch.Tensor:
        """``cost x condition`` over every assignment of ``u.names`` (float64)."""
        shape = [len(self.choices[n]) for n in u.names]
        t = torch.zeros(shape, dtype=torch.float64)
        cache: dict[tuple, float] = {}
        own = [n for n in u.names if u.module is not None and n in u.module.choices]
        for idx in itertools.product(*[range(s) for s in shape]):
            sel = {n: self.choices[n][i] for n, i in zip(u.names, idx)}
            if not all(sel[n] in allowed for n, allowed in u._cond.items()):  # type: ignore[attr-defined]
                continue
            if u.module is None:
                t[idx] = u._numel  # type: ignore[attr-defined]
                continue
            key = tuple(sel[n] for n in own)
            if key not in cache:
                cache[key] = float(count(u.module.extract({n: sel[n] for n in own})))
            t[idx] = cache[key]
        return t

    def _record(self, supernet: nn.Module, example,
                extra: set[int] = frozenset()) -> dict[int, tuple[int, int | None]]:
        """Per entangled unit: (tokens per sample, output H*W or None), checked equal at
        the max and the min architecture; the input at the max architecture of the
        units and of the modules whose ids are in ``extra`` goes to ``self._inputs``."""
        from .arch import one_hot_arch
        from .base import get_arch, set_arch

        mods = {id(u.module if u.module is not None else u.owner): u for u in self._units}
        runs = []
        before = get_arch(supernet)
        small = {n: min(v) if all(isinstance(x, (int, float)) for x in v) else v[0]
                 for n, v in self.choices.items()}
        dev = next((p.device for p in supernet.parameters()), None)
        uniform = {n: torch.full((len(v),), 1.0 / len(v), device=dev) for n, v in self.choices.items()}
        for arch in (uniform, one_hot_arch(self.choices, small, device=dev)):
            rec: dict[int, tuple[int, int | None]] = {}
            hooks = []

            def hook(m, inp, out, rec=rec, first=not runs):
                x = inp[0] if isinstance(inp, tuple) and inp else inp
                if not torch.is_tensor(x) or not torch.is_tensor(out):
                    return
                if first:  # the input at the max architecture (for latency.py)
                    self._inputs[id(m)] = (tuple(x.shape), x.dtype)
                B = x.shape[0]
                if x.dim() >= 3 and out.dim() == 4 and x.dim() == 4:  # NCHW conv-like
                    rec[id(m)] = (1, out.shape[2] * out.shape[3])
                else:
                    rec[id(m)] = (int(x[..., 0].numel() // max(B, 1)) if x.dim() > 1 else 1, None)

            for m in supernet.modules():
                if id(m) in mods or id(m) in extra:
                    hooks.append(m.register_forward_hook(hook))
            was = supernet.training
            supernet.eval()
            try:
                set_arch(supernet, arch)
                with torch.no_grad():
                    supernet(example)
            finally:
                set_arch(supernet, before)
                supernet.train(was)
                for h in hooks:
                    h.remove()
            runs.append(rec)
        for k, shape in runs[1].items():
            if k in mods and k in runs[0] and runs[0][k] != shape:
                raise CostError(
                    f"{mods[k].path}: the tokens / output size it sees change with the "
                    f"architecture ({runs[0][k]} at the max, {shape} at the min): MACs "
                    f"per layer would depend on the inputs, not only on its choices")
        return runs[0]

    # ----------------------------------------------------------------- query
    def _check(self, selection: Mapping[str, Any]) -> dict[str, int]:
        idx = {}
        for n, vals in self.choices.items():
            if n not in selection:
                raise CostError(f"selection: no value for choice {n!r}")
            if selection[n] not in vals:
                raise CostError(f"selection: {n}={selection[n]!r} is not one of {list(vals)}")
            idx[n] = vals.index(selection[n])
        return idx

    @property
    def has_latency(self) -> bool:
        return self.latency_info is not None

    def _tables(self, kind: str) -> list[tuple[_Unit, torch.Tensor]]:
        if kind not in ("params", "macs", "latency"):
            raise CostError(f"cost {kind!r}: 'params', 'macs' or 'latency'")
        if kind == "macs" and not self.has_macs:
            raise CostError("MACs need an example input (CostModel(..., example=batch))")
        if kind == "latency" and not self.has_latency:
            raise CostError("latency needs a measured table (tangle_kernels.nn.latency.add_latency)")
        if kind == "latency":
            return [(u, u.latency) for u in self._units + self._latency_units]
        return [(u, getattr(u, kind)) for u in self._units]

    def cost(self, selection: Mapping[str, Any], kind: str = "params") -> int | float:
        """The exact cost of one architecture (``selection``: name -> value): an int for
        parameters and MACs, milliseconds (float) for the latency table's sum."""
        idx = self._check(selection)
        total = sum(float(t[tuple(idx[n] for n in u.names)]) for u, t in self._tables(kind))
        if kind == "latency":
            return total + self.latency_info["rest_ms"]
        return int(round(total))

    def latency(self, selection: Mapping[str, Any]) -> float:
        return self.cost(selection, "latency")

    def params(self, selection: Mapping[str, Any]) -> int:
        return self.cost(selection, "params")

    def macs(self, selection: Mapping[str, Any]) -> int:
        return self.cost(selection, "macs")

    def expected(self, probs: Mapping[str, torch.Tensor], kind: str = "params") -> torch.Tensor:
        """``E[cost]`` when choice ``n`` takes value ``i`` with probability
        ``probs[n][i]``, independently per choice; a 0-dim tensor differentiable in
        ``probs`` (float64 unless ``probs`` is another floating dtype)."""
        for n, vals in self.choices.items():
            if n not in probs:
                raise CostError(f"probs: no vector for choice {n!r}")
            p = probs[n]
            if not torch.is_tensor(p) or p.dim() != 1 or p.shape[0] != len(vals):
                raise CostError(f"probs[{n!r}]: a 1-D tensor of length {len(vals)} expected")
            if not torch.isfinite(p.detach()).all():
                raise CostError(f"probs[{n!r}] is not finite: {p.detach().tolist()}")
        dtype = next(iter(probs.values())).dtype if probs else torch.float64
        total = None
        for u, t in self._tables(kind):
            e = t.to(dtype=dtype, device=next(iter(probs.values())).device)
            for n in reversed(u.names):  # contract the last axis with its probabilities
                e = e @ probs[n].to(dtype)
            total = e if total is None else total + e
        if total is None:
            total = torch.zeros((), dtype=dtype)
        if kind == "latency":
            total = total + self.latency_info["rest_ms"]
        return total

    def bounds(self, kind: str = "params") -> tuple[int, int]:
        """(min, max) cost over every architecture (each unit's extreme is independent of
        the others' only when they share no choice, so this enumerates when small)."""
        import math

        n = math.prod(len(v) for v in self.choices.values())
        if n > 200_000:
            raise CostError(f"{n} architectures: too many to enumerate for exact bounds")
        vals = [self.cost(dict(zip(self.choices, c)), kind)
                for c in itertools.product(*self.choices.values())]
        return min(vals), max(vals)

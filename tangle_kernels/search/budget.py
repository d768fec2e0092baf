"""Search under a budget: limits on parameters, MACs and measured latency, a
differentiable constraint for the architecture step, and the best architecture of the
final distribution that fits.

**Costs.** :class:`~tangle_kernels.nn.cost.CostModel` counts every architecture's
parameters and MACs from the extracted plain modules and gives their expectation under
the per-choice probabilities as a polynomial in them (exact, differentiable). The
latency (``--max-latency-ms``) is a table measured on the search's device
(:mod:`tangle_kernels.nn.latency`: every entangled layer's plain module per assignment
of its own choices, plus a measured constant for what lies between them; cached), at a
batch of ``latency_batch`` validation samples, priced by the same polynomial. Under DDP
rank 0 measures it and every rank uses rank 0's table.

**The constraint (``budget_mode=lagrange``): a Lagrange multiplier per limit, learned
with the alphas.** The architecture objective becomes ``L_val + sum_k lambda_k (E[cost_k] / limit_k - 1)``;
after every architecture step ``lambda_k <- max(0, lambda_k + rate (E[cost_k] /
limit_k - 1))`` (dual ascent). Why a multiplier and not a fixed penalty: a penalty's
weight must be tuned per space and per budget (a weight that holds a 1 M budget
crushes a 100 M one), while the multiplier is scale-free (each violation is relative
to its limit) and goes back to 0 while the expected cost fits, so a search whose
unconstrained optimum already fits is left alone.

``budget_mode=derive`` (the default) leaves the multipliers out: the alphas are
searched as without a budget and only the derivation below (and a race's contenders)
keeps to the limits. On the nanoGPT space the unconstrained distribution ranks the
architectures within a budget better than a distribution pushed under it
(docs/search-quality.md, "Search under a budget").

**Derivation.** :func:`constrained_argmax`: among the architectures within every
limit, the most probable one under the final distribution (the product of the
per-choice probabilities), never one that violates a limit; :class:`BudgetError` when
none fits. Exact (by enumeration) for spaces up to ``exact_limit`` architectures,
else a beam search over the choices whose partial architectures are kept only while
a completion that fits exists (checked with a lower bound of the remaining cost).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..nn.cost import CostError, CostModel

__all__ = ["Budget", "BudgetError", "Lagrangian", "constrained_argmax", "costs_of", "setup", "fits"]

KINDS = ("params", "macs", "latency")
#: the config field (and flag, with dashes) of each kind's limit
FIELDS = {"params": "max_params", "macs": "max_macs", "latency": "max_latency_ms"}


def _flag(kind: str) -> str:
    return "--" + FIELDS[kind].replace("_", "-")


class BudgetError(ValueError):
    """A budget that cannot be met or is malformed (the message says which)."""


@dataclass(frozen=True)
class Budget:
    """Upper limits per cost kind (``params``, ``macs``); an empty budget is no limit."""

    limits: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for k, v in self.limits.items():
            if k not in KINDS:
                raise BudgetError(f"budget: unknown cost {k!r} (known: {', '.join(KINDS)})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise BudgetError(f"budget: {_flag(k)} must be a positive finite number, got {v!r}")

    @classmethod
    def of(cls, max_params: float | None = None, max_macs: float | None = None,
           max_latency_ms: float | None = None) -> Budget:
        return cls({k: v for k, v in (("params", max_params), ("macs", max_macs),
                                      ("latency", max_latency_ms)) if v is not None})

    def __bool__(self) -> bool:
        return bool(self.limits)

    def fits(self, costs: Mapping[str, int]) -> bool:
        return all(costs[k] <= v for k, v in self.limits.items())

    def margins(self, costs: Mapping[str, int]) -> dict[str, float]:
        """Per limit, the unused fraction ``1 - cost / limit`` (>= 0 when it fits)."""
        return {k: 1.0 - costs[k] / v for k, v in self.limits.items()}

    def to_dict(self) -> dict:
        return {FIELDS[k]: v for k, v in self.limits.items()}


def _has(cm: CostModel, kind: str) -> bool:
    return kind == "params" or (kind == "macs" and cm.has_macs) or (
        kind == "latency" and cm.has_latency)


def costs_of(cm: CostModel, selection: Mapping[str, Any], kinds: Sequence[str] = KINDS) -> dict:
    """``{kind: cost}`` of ``selection`` for the kinds ``cm`` can price."""
    return {k: cm.cost(selection, k) for k in kinds if _has(cm, k)}


class Lagrangian:
    """The constraint term of the architecture objective (see the module docstring).

    ``term(probs)``: ``sum_k lambda_k (E[cost_k] / limit_k - 1)`` (a 0-dim tensor,
    differentiable in ``probs``); ``update(probs)`` the dual-ascent step of the
    multipliers, after the architecture step. ``state_dict`` / ``load_state_dict`` keep
    the multipliers through checkpoints."""

    def __init__(self, cm: CostModel, budget: Budget, rate: float = 1.0):
        if not budget:
            raise BudgetError("Lagrangian: an empty budget")
        _check_kinds(cm, budget)
        if not (math.isfinite(rate) and rate > 0):
            raise BudgetError(f"budget multiplier rate {rate!r}: must be positive and finite")
        self.cm, self.budget, self.rate = cm, budget, float(rate)
        self.lam = {k: 0.0 for k in budget.limits}

    def violations(self, probs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.cm.expected(probs, k) / lim - 1.0 for k, lim in self.budget.limits.items()}

    def term(self, probs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for k, v in self.violations(probs).items():
            t = self.lam[k] * v
            total = t if total is None else total + t
        return total

    @torch.no_grad()
    def update(self, probs: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One dual-ascent step; returns the expected costs (for the metrics)."""
        out = {}
        for k, v in self.violations({n: p.detach() for n, p in probs.items()}).items():
            self.lam[k] = max(0.0, self.lam[k] + self.rate * float(v))
            out[f"expected_{k}"] = (float(v) + 1.0) * self.budget.limits[k]
            out[f"lambda_{k}"] = self.lam[k]
        return out

    def state_dict(self) -> dict:
        return dict(self.lam)

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        if set(state) != set(self.lam):
            raise BudgetError(f"budget multipliers {sorted(state)} do not match the budget "
                              f"{sorted(self.lam)}")
        self.lam = {k: float(v) for k, v in state.items()}


def _logp(probs: Mapping[str, Sequence[float]], names, idx) -> float:
    s = 0.0
    for n, i in zip(names, idx):
        p = float(probs[n][i])
        s += math.log(p) if p > 0 else -math.inf
    return s


def constrained_argmax(cm: CostModel, probs: Mapping[str, Sequence[float]], budget: Budget,
                       *, exact_limit: int = 200_000, beam: int = 512) -> dict[str, Any]:
    """The most probable architecture under ``probs`` (per choice, independent) whose
    costs fit ``budget``; :class:`BudgetError` when no architecture fits. Probabilities
    must be finite (a diverged search is refused before it gets here)."""
    names = list(cm.choices)
    for n in names:
        if n not in probs:
            raise BudgetError(f"probs: no vector for choice {n!r}")
        p = [float(x) for x in probs[n]]
        if len(p) != len(cm.choices[n]) or not all(math.isfinite(x) and x >= 0 for x in p):
            raise BudgetError(f"probs[{n!r}]: {len(cm.choices[n])} finite non-negative values "
                              f"expected, got {p}")
    kinds = list(budget.limits)
    _check_kinds(cm, budget)
    sizes = [len(cm.choices[n]) for n in names]
    total = math.prod(sizes)

    def sel_of(idx):
        return {n: cm.choices[n][i] for n, i in zip(names, idx)}

    def fits(idx):
        s = sel_of(idx)
        return all(cm.cost(s, k) <= budget.limits[k] for k in kinds)

    if not kinds:
        return sel_of([max(range(len(cm.choices[n])), key=lambda i: float(probs[n][i])) for n in names])
    if total <= exact_limit:
        # most probable first: stop at the first architecture that fits
        order = sorted(itertools.product(*[range(s) for s in sizes]),
                       key=lambda idx: -_logp(probs, names, idx))
        for idx in order:
            if fits(idx):
                return sel_of(idx)
        lo = {k: min(cm.cost(sel_of(i), k) for i in itertools.product(*[range(s) for s in sizes]))
              for k in kinds}
        raise BudgetError(_none_fits(budget, lo))
    return _beam(cm, probs, budget, names, sizes, kinds, beam, sel_of, fits)


def _check_kinds(cm: CostModel, budget: Budget) -> None:
    if "macs" in budget.limits and not cm.has_macs:
        raise BudgetError("budget on MACs: the cost model has no example input")
    if "latency" in budget.limits and not cm.has_latency:
        raise BudgetError("budget on latency: the cost model has no latency table "
                          "(tangle_kernels.nn.latency.add_latency)")


def _none_fits(budget: Budget, lo: Mapping[str, float]) -> str:
    def num(k, v):
        return f"{v:,.3f} ms" if k == "latency" else f"{v:,.0f}"

    parts = [f"{_flag(k)} {budget.limits[k]:g} (the smallest architecture has {num(k, lo[k])})"
             for k in budget.limits if lo[k] > budget.limits[k]]
    if not parts:
        parts = [f"{_flag(k)} {v:g}" for k, v in budget.limits.items()]
        return "no architecture of the space fits every limit at once: " + ", ".join(parts)
    return "no architecture of the space fits " + ", ".join(parts)


def _beam(cm, probs, budget, names, sizes, kinds, width, sel_of, fits):
    """Beam search over the choices in order. A partial architecture (the first j choices
    fixed) is kept only if its cost with every other choice at the value that minimises
    the cost of each unit alone (a lower bound of any completion's cost) fits."""
    # lower bound of a completion: each unit's table minimised over its free axes
    def bound(prefix: dict[str, int], k: str) -> float:
        tot = 0.0
        for u, t in cm._tables(k):
            sub = t
            for ax, n in reversed(list(enumerate(u.names))):
                if n in prefix:
                    sub = sub.select(ax, prefix[n])
                else:
                    sub = sub.min(dim=ax).values
            tot += float(sub)
        return tot + (cm.latency_info["rest_ms"] if k == "latency" else 0.0)

    lo = {k: bound({}, k) for k in kinds}
    if any(lo[k] > budget.limits[k] for k in kinds):
        raise BudgetError(_none_fits(budget, lo))
    beams: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
    for j, n in enumerate(names):
        nxt = []
        for lp, idx in beams:
            for i in range(sizes[j]):
                p = float(probs[n][i])
                if p <= 0 and sizes[j] > 1:
                    continue
                cand = idx + (i,)
                prefix = dict(zip(names, cand))
                if all(bound(prefix, k) <= budget.limits[k] for k in kinds):
                    nxt.append((lp + (math.log(p) if p > 0 else -1e300), cand))
        nxt.sort(key=lambda t: -t[0])
        beams = nxt[:width]
        if not beams:
            break
    for _, idx in beams:  # the bound of a full architecture is its cost: every one fits
        if fits(idx):
            return sel_of(idx)
    raise BudgetError("no architecture of the space fits " + ", ".join(
        f"{_flag(k)} {v:g}" for k, v in budget.limits.items()) + " (beam search)")


def setup(search):
    """A search's ``(budget, cost model, Lagrangian)`` from its config (``--max-params``,
    ``--max-macs``): the cost model of its supernet (with an example validation batch
    for MACs), a check that some architecture fits (else a one-line SearchError before
    any training) and the Lagrangian when the sampler trains the architecture."""
    from .common import derive_seed, generator
    from .config import SearchError

    cfg = search.cfg
    budget = Budget.of(cfg.max_params, cfg.max_macs, cfg.max_latency_ms)
    if not budget:
        return budget, None, None
    example = None
    if "macs" in budget.limits or "latency" in budget.limits:
        n = cfg.latency_batch if "latency" in budget.limits else 2
        example = search.data.batch("val", n, generator(derive_seed(cfg.seed, 0, "cost")),
                                    search.device)[0]
    try:
        cm = CostModel(search.model, search.space.choices, example=example)
        if "latency" in budget.limits:
            _add_latency(search, cm, example)
        uniform = {n: [1.0] * len(v) for n, v in search.space.choices.items()}
        constrained_argmax(cm, uniform, budget)  # raises when nothing fits
        lag = (Lagrangian(cm, budget, rate=cfg.budget_rate)
               if search.sampler.trains_arch and cfg.budget_mode == "lagrange" else None)
    except (BudgetError, CostError) as e:
        raise SearchError(f"budget: {e}") from None
    return budget, cm, lag


def _add_latency(search, cm: CostModel, example) -> None:
    """The latency table of ``cm``: measured (or cached) by rank 0, the same on every rank."""
    from ..nn.latency import add_latency, attach, table_of
    from .distributed import all_gather_object

    dist = search.dist
    if dist.is_main:
        add_latency(cm, search.model, example, device=search.device, log=search.log)
    if dist.enabled:
        payload = all_gather_object(table_of(cm) if dist.is_main else None, dist)[0]
        if not dist.is_main:
            attach(cm, payload, search.model)


def fits(search, selection: Mapping[str, Any]) -> bool:
    """Whether ``selection`` is within ``search``'s budget (True without one)."""
    b = search.budget
    return not b or b.fits(costs_of(search.cost_model, selection, list(b.limits)))

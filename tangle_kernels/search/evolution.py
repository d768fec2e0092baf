"""Architecture selection over a trained supernet (the second stage of SPOS).

SPOS trains the supernet with uniformly sampled one-hot architectures and no
architecture parameters; an architecture is then chosen by scoring candidate selections
with the supernet's inherited weights (the one-hot fast path) on validation batches:

- :func:`random_search`: ``budget`` distinct uniformly drawn selections, best kept;
- :func:`evolution`: aging-free regularised evolution as in SPOS: an initial random
  population, then each generation keeps the ``parents`` best, and fills the population
  with mutations (each choice re-drawn with probability ``mutate_prob``) and uniform
  crossovers of parents, until ``budget`` distinct selections have been scored.

``score(selection) -> float`` is lower-is-better (the driver negates accuracies).
Both functions are deterministic given ``seed`` and never score a selection twice.

Under a constraint (``fits(selection) -> bool``, e.g. a parameter budget) a selection
that does not fit is never scored and does not count against ``budget``: the search
spends every evaluation on architectures that fit, as Once-for-All and HAT's constrained
evolution do, and stops early only when the space holds no more that fit. A search that
finds none returns ``(None, inf, [])``. A NaN score ranks last (as ``inf``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["random_search", "evolution", "SelectionCache"]

Selection = dict[str, Any]


class SelectionCache:
    """Scores selections once; ``history`` lists ``(selection, score)`` in scoring order.
    With ``fits``, a selection that does not fit is remembered as rejected (``in`` the
    cache, so never drawn again) but neither scored nor counted by ``len``."""

    def __init__(self, score: Callable[[Selection], float],
                 fits: Callable[[Selection], bool] | None = None):
        self._score = score
        self._fits = fits
        self._seen: dict[tuple, float] = {}
        self._rejected: set[tuple] = set()
        self.history: list[tuple[Selection, float]] = []

    @staticmethod
    def key(sel: Mapping[str, Any]) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in sel.items()))

    def __contains__(self, sel) -> bool:
        k = self.key(sel)
        return k in self._seen or k in self._rejected

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def visited(self) -> int:
        """Distinct selections met so far, scored or rejected."""
        return len(self._seen) + len(self._rejected)

    def __call__(self, sel: Selection) -> float:
        k = self.key(sel)
        if k in self._rejected:
            return math.inf
        if k not in self._seen:
            if self._fits is not None and not self._fits(dict(sel)):
                self._rejected.add(k)
                return math.inf
            s = float(self._score(dict(sel)))
            if math.isnan(s):  # a NaN is never the best (min() would keep it if first)
                s = math.inf
            self._seen[k] = s
            self.history.append((dict(sel), s))
        return self._seen[k]

    def best(self) -> tuple[Selection | None, float]:
        if not self.history:
            return None, math.inf
        return min(self.history, key=lambda t: t[1])


def _random_selection(choices: Mapping[str, Sequence], rng: random.Random) -> Selection:
    return {n: rng.choice(list(v)) for n, v in choices.items()}


def _check(choices: Mapping[str, Sequence], budget: int) -> tuple[int, int]:
    """(evaluations to spend, size of the space)."""
    if budget < 1:
        raise ValueError(f"budget={budget} must be >= 1")
    total = math.prod(len(v) for v in choices.values())
    return min(budget, total), total


def _fill_random(choices, cache: SelectionCache, rng: random.Random, n: int, limit: int,
                 total: int) -> None:
    """Score up to ``n`` new random selections (that fit), stopping at ``limit`` scored,
    when every selection of the space has been met, or after many draws in a row that
    brought nothing new (a space almost exhausted, or a constraint few selections meet)."""
    misses = 0
    while len(cache) < limit and n > 0 and cache.visited < total \
            and misses < 100 * limit + 1000:
        sel = _random_selection(choices, rng)
        if sel in cache:
            misses += 1
            continue
        before = len(cache)
        cache(sel)
        if len(cache) > before:
            n -= 1
            misses = 0
        else:
            misses += 1


def random_search(
    choices: Mapping[str, Sequence],
    score: Callable[[Selection], float],
    *,
    budget: int = 50,
    seed: int = 0,
    fits: Callable[[Selection], bool] | None = None,
) -> tuple[Selection | None, float, list[tuple[Selection, float]]]:
    """Score ``budget`` distinct random selections (that ``fits``, when given); returns
    (best, its score, history)."""
    limit, total = _check(choices, budget)
    rng = random.Random(seed)
    cache = SelectionCache(score, fits)
    _fill_random(choices, cache, rng, limit, limit, total)
    best, s = cache.best()
    return best, s, cache.history


def evolution(
    choices: Mapping[str, Sequence],
    score: Callable[[Selection], float],
    *,
    budget: int = 50,
    population: int = 10,
    parents: int | None = None,
    mutate_prob: float = 0.3,
    seed: int = 0,
    fits: Callable[[Selection], bool] | None = None,
    initial: Sequence[Mapping[str, Any]] = (),
) -> tuple[Selection | None, float, list[tuple[Selection, float]]]:
    """Evolutionary search (SPOS): returns (best selection, its score, history). With
    ``fits``, only selections that fit are scored, and parents are drawn among them.
    ``initial`` selections join the first population (scored first, if they fit): under
    a tight constraint in a large space, random draws may find none that fits, and one
    known to fit (the constrained argmax) gives the mutations a place to start."""
    limit, total = _check(choices, budget)
    population = max(2, min(population, limit))
    parents = max(1, min(parents or max(1, population // 2), population))
    rng = random.Random(seed)
    cache = SelectionCache(score, fits)
    for sel in initial:
        bad = [n for n, v in choices.items() if n not in sel or sel[n] not in list(v)]
        if bad or set(sel) - set(choices):
            raise ValueError(f"initial selection {dict(sel)}: not a selection of the choices "
                             f"{dict(choices)}")
        if len(cache) < limit:
            cache(dict(sel))
    _fill_random(choices, cache, rng, population - len(cache), limit, total)
    stall = 0
    while len(cache) < limit and stall < 50 and cache.history and cache.visited < total:
        ranked = sorted(cache.history, key=lambda t: t[1])[:parents]
        pool = [s for s, _ in ranked]
        before = len(cache)
        for _ in range(population):
            if len(cache) >= limit:
                break
            if len(pool) > 1 and rng.random() < 0.5:
                a, b = rng.sample(pool, 2)
                child = {n: (a[n] if rng.random() < 0.5 else b[n]) for n in choices}
            else:
                p = rng.choice(pool)
                child = {
                    n: (rng.choice(list(v)) if rng.random() < mutate_prob else p[n])
                    for n, v in choices.items()
                }
            if child not in cache:
                cache(child)
        stall = stall + 1 if len(cache) == before else 0
        if stall >= 3:  # the neighbourhood is exhausted: inject random selections
            _fill_random(choices, cache, rng, population, limit, total)
    best, s = cache.best()
    return best, s, cache.history

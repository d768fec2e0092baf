"""Final selection by a race: the architectures the search leaves in contention, each
trained from scratch, the best on the validation batches kept (``select=race``).

Why: a weight-sharing supernet ranks its candidates by their shared weights, and on a
small corpus those weights are biased (the narrow prefixes are trained by every
candidate, the wide remainder overfits the train split within the budget), so the
argmax of the final distribution can be confidently wrong (docs/search-quality.md,
issue 28). A candidate trained alone for the retrain budget is what the user will get;
a few of them cost a few retrainings.

The contenders: the selection of the sampler (the argmax, or under a budget the most
probable architecture that fits) first, then ``race_archs - 1`` distinct others, each
within the budget when there is one. ``race_pick="top"`` (the default): the next most
probable architectures under the final distribution (the product of its per-choice
probabilities), found best-first without listing the space, so in a fixed order;
``race_pick="draw"``: drawn from the per-choice probabilities raised to
``1 / race_temperature`` and renormalised (1: the distribution as trained; larger: closer
to uniform, more exploration). ``top`` was chosen on the tuning corpora by replaying both
rules on the recorded searches (``benchmarks/quality/simulate.py``;
docs/search-quality.md). Each contender is trained with
:func:`~.report.train_from_scratch` for ``race_steps`` steps (0: ``retrain_steps``)
from a seed of its own (``derive_seed(seed, i, "race")``: never the retraining's), and
scored on the run's fixed validation batches; ties keep the earlier contender. Every
rank runs the same race (same seeds, same batches), so DDP ranks agree.

A race is one training per contender, so its ranking carries the seed noise of a
training: ``race_noise`` (the spread of the metric between two trainings of one
architecture with different seeds) turns the winner's margin into a verdict. ``coin
toss``: a runner-up within the noise of the winner (``tied`` names them), so another seed
could have picked it; ``ahead``: every other contender is further behind; no verdict
when the noise is unknown (0).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from typing import Any

import torch

from .common import derive_seed, generator

__all__ = ["contenders", "most_probable", "race", "race_verdict"]


def _tempered(probs: Mapping[str, Any], temperature: float) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in probs.items():
        p = torch.as_tensor(p, dtype=torch.float64).clamp_min(0)
        if not torch.isfinite(p).all() or float(p.sum()) <= 0:
            p = torch.ones_like(p)
        logp = torch.log(p.clamp_min(1e-300)) / temperature
        out[n] = torch.softmax(logp, 0)
    return out


def most_probable(choices: Mapping[str, list], probs: Mapping[str, Any], *,
                  max_pops: int = 100_000):
    """The selections of the space in order of their probability under independent
    per-choice ``probs`` (most probable first; ties by the choices' order), lazily: a
    best-first walk over the per-choice rankings (each selection is reached from the one
    with one choice a rank better), so a space of 10^20 selections costs only what is
    taken. Stops after ``max_pops`` selections."""
    names = list(choices)
    logp, order = {}, {}
    for n in names:
        p = torch.as_tensor(probs[n], dtype=torch.float64)
        if p.numel() != len(choices[n]):
            raise ValueError(f"probs[{n!r}] has {p.numel()} entries, the choice has "
                             f"{len(choices[n])}")
        p = torch.where(torch.isfinite(p), p, torch.zeros_like(p)).clamp_min(0)
        lp = [math.log(float(x)) if x > 0 else -math.inf for x in p]
        order[n] = sorted(range(len(lp)), key=lambda i: (-lp[i], i))
        logp[n] = [lp[i] for i in order[n]]

    def score(ranks):
        return sum(logp[n][r] for n, r in zip(names, ranks))

    start = (0,) * len(names)
    heap, seen = [(-score(start), start)], {start}
    pops = 0
    while heap and pops < max_pops:
        _, ranks = heapq.heappop(heap)
        pops += 1
        yield {n: choices[n][order[n][r]] for n, r in zip(names, ranks)}
        for j in range(len(names)):
            if ranks[j] + 1 < len(order[names[j]]):
                nxt = ranks[:j] + (ranks[j] + 1,) + ranks[j + 1:]
                if nxt not in seen:
                    seen.add(nxt)
                    heapq.heappush(heap, (-score(nxt), nxt))


def contenders(first: Mapping[str, Any], choices: Mapping[str, list], probs: Mapping[str, Any],
               n: int, *, pick: str = "top", temperature: float = 1.0, seed: int = 0,
               fits=None, max_draws: int = 10_000) -> list[dict]:
    """``first`` and up to ``n - 1`` distinct other selections: the next most probable
    under ``probs`` (``pick="top"``) or drawn from the tempered ``probs`` (``"draw"``; see
    the module docstring); fewer when the space (or the budget) holds fewer, or
    ``max_draws`` candidates gave no new one."""
    if pick == "top":
        candidates = most_probable(choices, probs, max_pops=max_draws)
    elif pick == "draw":
        candidates = _draws(choices, probs, temperature, seed, max_draws)
    else:
        raise ValueError(f"pick={pick!r}: 'top' or 'draw'")
    out = [dict(first)]
    seen = {tuple(sorted(first.items()))}
    want = min(n, math.prod(len(v) for v in choices.values()))
    for sel in candidates:
        if len(out) >= want:
            break
        key = tuple(sorted(sel.items()))
        if key in seen or (fits is not None and not fits(sel)):
            continue
        seen.add(key)
        out.append(sel)
    return out


def _draws(choices, probs, temperature: float, seed: int, n: int):
    """``n`` selections drawn from the tempered ``probs`` (reproducible from ``seed``)."""
    p = _tempered(probs, temperature)
    g = generator(derive_seed(seed, 0, "race-draw"))
    for _ in range(n):
        yield {c: choices[c][int(torch.multinomial(p[c], 1, generator=g))] for c in choices}


def race_verdict(values: list[float], winner: int, noise: float) -> tuple[str | None, list[int]]:
    """``(verdict, tied)``: the contenders within ``noise`` of the winner's value
    (``tied``) and ``coin toss`` when there is one, ``ahead`` when none; ``None`` when
    the noise is unknown (0) or there is one contender. A non-finite value is never tied."""
    if noise <= 0 or len(values) < 2:
        return None, []
    w = values[winner]
    tied = [j for j, v in enumerate(values)
            if j != winner and math.isfinite(v) and abs(v - w) < noise]
    return ("coin toss" if tied else "ahead"), tied


def race(search, first: Mapping[str, Any]) -> tuple[dict, dict]:
    """Run the race of ``search`` (a :class:`~.loop.Search` at its end); returns the
    winner and the record that goes into arch.json (``race``), whose ``scratch`` is the
    winner's from-scratch result (the retraining when its budget is the same)."""
    from .report import train_from_scratch

    cfg, space = search.cfg, search.space
    steps = cfg.race_steps or cfg.retrain_steps
    probs = {k: v.tolist() for k, v in search.sampler.probs().items()}
    fits = search.fits if getattr(search, "budget", None) else None
    cands = contenders(first, space.choices, probs, cfg.race_archs, pick=cfg.race_pick,
                       temperature=cfg.race_temperature, seed=cfg.seed, fits=fits)
    metric, minimize = space.metric, space.minimize
    search.log(f"race: {len(cands)} contenders, {steps} steps each from scratch")
    entries, best = [], None
    for i, sel in enumerate(cands):
        res = train_from_scratch(space, search.data, sel, cfg, steps=steps,
                                 device=search.device, eval_set=search.eval_set,
                                 seed=derive_seed(cfg.seed, i, "race"),
                                 compile=search.compiler)
        v = float(res["val"][metric])
        score = v if minimize else -v
        if not math.isfinite(score):
            score = math.inf  # a diverged contender never wins
        entries.append({"arch": sel, "arch_str": space.describe(sel), metric: v,
                        "params": res["params"], "time_s": res["time_s"]})
        search.log(f"race [{i + 1}/{len(cands)}] {space.describe(sel)}: {metric} {v:.4f} "
                   f"({res['time_s']:.0f} s)")
        if best is None or score < best[0]:
            best = (score, i, res)
    if best is None or not math.isfinite(best[0]):
        from .config import SearchError

        raise SearchError("race: every contender diverged (non-finite validation metric)")
    _, i, res = best
    winner = dict(cands[i])
    scores = sorted(e[metric] if minimize else -e[metric] for e in entries)
    noise = float(cfg.race_noise)
    verdict, tied = race_verdict([e[metric] for e in entries], i, noise)
    rec = {
        "steps": steps,
        "pick": cfg.race_pick,
        "temperature": cfg.race_temperature,
        "contenders": entries,
        "winner": i,
        "argmax_won": i == 0,
        # the winner's lead over the runner-up, in the metric's units (0 with one contender)
        "margin": (abs(scores[1] - scores[0]) if len(scores) > 1 else 0.0),
        "noise": noise,
        "verdict": verdict,
        "tied": tied,
        "scratch": res,
    }
    return winner, rec

"""What a final selection would have derived from the searches already recorded: the
race's contender rules replayed offline on the recorded final distributions, scored on
the from-scratch reference. Trains nothing.

Why: the race (``select=race``) changes only what happens after the search, and every
record keeps the search's final per-choice probabilities (``probs``). So a contender rule
(how many, drawn or the most probable, at which temperature) can be compared on every
recorded search at no cost, before a single real run is spent on it.

The model of a race: each contender's value is its reference loss plus the seed noise of
a second training, ``N(0, noise)`` with ``noise`` the measured sd of the difference
between two trainings of one architecture (``race_noise``, 0.023 on the default space);
the lowest value wins and is scored by its reference loss (its percentile, as the
benchmark scores a run). Random rules and the noise are averaged over ``--draws``
replays. This is a model: a real race can differ (its trainings are not the reference's),
so a rule chosen here is confirmed with real runs before it becomes a default::

    python -m benchmarks.quality.simulate                    # tuning corpora
    python -m benchmarks.quality.simulate --split held-out   # report only; never choose here
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
from collections import defaultdict

from tangle_kernels.search import race
from tangle_kernels.search.runlog import read_jsonl

from .bench import ROOT, _key, percentile
from .corpora import CORPORA

_NOISE = 0.023


def _choices(space_ident: dict) -> dict[str, list]:
    return {n: list(v) for n, v in space_ident["choices"].items()}


def _argmax(choices, probs) -> dict:
    return {n: choices[n][max(range(len(probs[n])), key=lambda i: probs[n][i])] for n in choices}


def contenders(rule: tuple, choices, probs, rng) -> list[dict]:
    """The contender set of ``rule``, by the search's own code (``race.contenders``) where
    the rule is one of its picks: ("argmax",), ("draw", k, T), ("top", k), ("uniform", k)
    (k uniform draws: random search), ("top+uniform", k_top, k)."""
    kind = rule[0]
    first = _argmax(choices, probs)
    if kind == "argmax":
        return [first]
    if kind == "top":
        return race.contenders(first, choices, probs, rule[1], pick="top")
    if kind == "draw":
        return race.contenders(first, choices, probs, rule[1], pick="draw",
                               temperature=rule[2], seed=rng.randrange(1 << 30))
    total = math.prod(len(v) for v in choices.values())
    out, seen = [], set()

    def add(a):
        if _key(a) not in seen:
            seen.add(_key(a))
            out.append(a)

    if kind == "top+uniform":
        for a in race.contenders(first, choices, probs, rule[1], pick="top"):
            add(a)
    elif kind != "uniform":
        raise ValueError(rule)
    while len(out) < min(rule[-1], total):
        add({n: rng.choice(v) for n, v in choices.items()})
    return out


def replay(rule, choices, probs, ref: dict[str, float], noise: float, draws: int,
           seed: int) -> list[float]:
    """Percentiles of ``draws`` replays of a race by ``rule`` on one record."""
    losses = list(ref.values())
    rng = random.Random(seed)
    out = []
    for _ in range(draws):
        cs = [a for a in contenders(rule, choices, probs, rng) if _key(a) in ref]
        vals = [ref[_key(a)] + rng.gauss(0.0, noise) for a in cs]
        win = cs[min(range(len(cs)), key=lambda i: vals[i])]
        out.append(percentile(ref[_key(win)], losses))
    return out


RULES = [("argmax",), ("draw", 4, 1.0), ("draw", 4, 2.0), ("draw", 4, 4.0), ("top", 4),
         ("uniform", 4), ("top+uniform", 2, 4), ("draw", 6, 1.0), ("top", 6), ("uniform", 6)]


def _name(rule) -> str:
    if rule[0] == "draw":
        return f"argmax+draws k={rule[1]} T={rule[2]:g}"
    if rule[0] == "top+uniform":
        return f"top {rule[1]} + uniform, k={rule[2]}"
    return rule[0] if len(rule) == 1 else f"{rule[0]} k={rule[1]}"


def records(split: str) -> list[dict]:
    """Recorded searches with a final distribution on the corpora of ``split``, each with
    its corpus's reference and space choices."""
    base = os.path.join(ROOT, "benchmarks", "results", "search_quality")
    out = []
    for d in sorted(os.listdir(base)):
        name = d.rsplit("-", 1)[0]
        c = CORPORA.get(name)
        if c is None or c.split != split:
            continue
        ref_path, runs_path = (os.path.join(base, d, f) for f in ("reference.jsonl", "runs.jsonl"))
        if not (os.path.exists(ref_path) and os.path.exists(runs_path)):
            continue
        with open(os.path.join(base, d, "ident.json")) as f:
            choices = _choices(json.load(f)["space"])
        ref = {_key(r["arch"]): r["val_loss"] for r in read_jsonl(ref_path)}
        if len(ref) < math.prod(len(v) for v in choices.values()):
            continue
        seen = set()
        for r in read_jsonl(runs_path):
            if not r.get("probs") or r.get("method") in (None, "random-search"):
                continue
            if r["method"].startswith("spos"):  # no trained distribution
                continue
            steps = (r.get("config") or {}).get("steps") or r.get("steps")
            k = (r["method"], steps, r["seed"], json.dumps(r["probs"]))
            if k in seen:  # the same search recorded under two settings (race or not)
                continue
            seen.add(k)
            out.append({"corpus": name, "dir": d, "method": r["method"], "steps": steps,
                        "setting": r.get("config_hash") or "?", "ran": r.get("steps"),
                        "seed": r["seed"], "probs": r["probs"], "choices": choices, "ref": ref})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="tuning", choices=("tuning", "held-out"))
    p.add_argument("--noise", type=float, default=_NOISE)
    p.add_argument("--draws", type=int, default=400)
    p.add_argument("--json", default=None, help="also write the table here")
    a = p.parse_args(argv)
    recs = records(a.split)
    groups = defaultdict(list)
    for r in recs:
        # a corpus's duplicate folders (one text, two cache keys) count once
        groups[(r["method"], r["setting"])].append(r)
    rows = []
    for (m, setting), rs in sorted(groups.items()):
        uniq = {}
        for r in rs:
            uniq.setdefault((r["corpus"], r["seed"], json.dumps(r["probs"])), r)
        rs = list(uniq.values())
        corpora = sorted({r["corpus"] for r in rs})
        ran = sorted({r["ran"] for r in rs if r["ran"]})
        steps = f"{ran[0]}" if len(ran) == 1 else f"{ran[0]}-{ran[-1]}" if ran else "?"
        print(f"\n{m}, setting {setting}, {steps} steps: {len(rs)} searches on "
              f"{', '.join(corpora)}")
        print(f"  {'rule':34s} {'mean pct':>8s} {'P(top25)':>8s}")
        for rule in RULES:
            per = [replay(rule, r["choices"], r["probs"], r["ref"], a.noise, a.draws,
                          seed=hash((r["corpus"], r["seed"], rule)) & 0xFFFF) for r in rs]
            flat = [x for xs in per for x in xs]
            mean, top = statistics.fmean(flat), sum(x < 25 for x in flat) / len(flat)
            print(f"  {_name(rule):34s} {mean:8.1f} {top:8.2f}")
            rows.append({"method": m, "setting": setting, "steps": steps, "rule": _name(rule),
                         "searches": len(rs),
                         "corpora": corpora, "mean_percentile": round(mean, 2),
                         "p_top25": round(top, 3)})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"split": a.split, "noise": a.noise, "draws": a.draws, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

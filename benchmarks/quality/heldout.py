"""The held-out protocol's report: every corpus of ``corpora.py``, every method and
search setting recorded on it, the tuning and held-out means, and how far the decision
report's verdicts can be trusted.

Reads what ``search_quality.py --corpus NAME`` recorded (``reference.jsonl`` and
``runs.jsonl`` of ``benchmarks/results/search_quality/NAME-*``); trains nothing::

    python -m benchmarks.quality.heldout            # report, docs section
    python -m benchmarks.quality.heldout --no-docs

Per corpus and (method, setting): the seeds' percentiles (share of the space's
architectures trained from scratch that beat the derived one; under a ``max_params``
budget, of those within it), how many seeds land in
the top 25%, and the search's wall-clock. A setting is named by how it differs from the
space's current search defaults ("default" when it does not). Random search is the
reference's own trainings at the default DrNAS search's wall-clock of each seed.

Calibration of the decision report: for every recorded run and choice, whether the
chosen value is the best one from scratch with the run's other choices held fixed (its
"conditional best"), grouped by the report's verdict (confident / leaning / coin toss;
older records' ``decided`` is ``confident``). Calibration of the race: for every pair of
a race's winner and another contender, whether the seed-0 reference orders them the same
way, grouped by whether the race's gap was within its noise (``race_noise``) or beyond.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence

from tangle_kernels.search.runlog import read_jsonl

from .bench import (REPORT_ONLY, ROOT, _key, budget_label, in_budget, method_settings,
                    percentile, random_search_from_reference)
from .corpora import CORPORA, DEFAULT
from ..sections import git_commit as _commit

SECTION = "search-quality-heldout"


def _work_dirs(name: str) -> list[str]:
    base = os.path.join(ROOT, "benchmarks", "results", "search_quality")
    if not os.path.isdir(base):
        return []
    return sorted(os.path.join(base, d) for d in os.listdir(base)
                  if d.rsplit("-", 1)[0] == name and os.path.exists(
                      os.path.join(base, d, "reference.jsonl")))


def _defaults() -> dict:
    from tangle_kernels.search import SearchConfig, build_config
    from tangle_kernels.spaces import make_space

    d = build_config(make_space("nanogpt"), {}, []).to_dict()
    if d.get("select") == "race" and not d.get("race_steps"):
        d["race_steps"] = d["retrain_steps"]  # as the benchmark runs it (bench.py)
    dflt = SearchConfig().to_dict()
    return {k: v for k, v in d.items() if k not in dflt or dflt[k] != v}, dflt


def _full_defaults() -> dict:
    from tangle_kernels.search import build_config
    from tangle_kernels.spaces import make_space

    return build_config(make_space("nanogpt"), {}, []).to_dict()


def setting_label(cfg: dict, base: dict, dflt: dict) -> str:
    """How a run's config (its difference from SearchConfig's defaults) differs from
    the space's current defaults ``base``."""
    keys = sorted(set(cfg) | set(base))
    diff = []
    for k in keys:
        got = cfg.get(k, dflt.get(k))
        want = base.get(k, dflt.get(k))
        if got != want and k not in ("steps_note", "retrain_steps") + REPORT_ONLY:
            diff.append(f"{k}={got}")
    return " ".join(diff) or "default"


def load(names: Sequence[str]) -> dict:
    """corpus -> {"ref": key -> record, "rows": [run records with the setting label]}."""
    base, dflt = _defaults()
    out = {}
    for name in names:
        ref, last, runs = {}, {}, []
        for w in _work_dirs(name):  # folders of the same protocol (older cache keys) merge
            ident = json.load(open(os.path.join(w, "ident.json"), encoding="utf-8"))
            if ident.get("space", {}).get("name") != "nanogpt" or ident.get("retrain_steps") != 400:
                continue
            ref.update({r["key"]: r for r in read_jsonl(os.path.join(w, "reference.jsonl"))})
            for r in read_jsonl(os.path.join(w, "runs.jsonl")):
                if "config" not in r:
                    continue  # recorded before runs kept their settings
                runs.append(r)
        for r in runs:  # after every folder's reference is in (a budget's label needs it)
            cfg = method_settings(r["method"], r["config"])
            q = budget_label(ref, cfg.get("max_params"))
            if q:  # the budgeted question: one label on every corpus
                cfg = {**cfg, "max_params": q}
            r["setting"] = setting_label(cfg, base, dflt)
            last[(r["method"], r["setting"], r["seed"])] = r
        rows = list(last.values())
        for r in rows:
            k = _key(r["arch"])
            if k in ref:
                r["scratch_val"] = ref[k]["val_loss"]
                r["percentile"] = round(percentile(ref[k]["val_loss"], [
                    x["val_loss"] for x in in_budget(ref, r["config"]).values()]), 2)
        # random search at the wall-clock of each DrNAS run of the default and of every
        # budget (drawing only the architectures within it)
        for r in [r for r in rows if r["method"] == "drnas" and r["seed"] in (0, 1, 2)
                  and (r["setting"] == "default" or r["config"].get("max_params"))]:
            pool = in_budget(ref, r["config"])
            if pool:
                rs = random_search_from_reference(pool, r["search_time_s"], r["seed"])
                rs["setting"] = r["setting"]
                rows.append(rs)
        out[name] = {"ref": ref, "rows": rows, "n_ref": len(ref)}
    return out


def random_k(losses: Sequence[float], k: int, top: float = 25.0) -> dict:
    """Exact expectation for the best of ``k`` architectures drawn uniformly without
    replacement and trained from scratch (the race's trainings without the supernet):
    the mean percentile of the best and the probability that it is in the ``top``%."""
    from math import comb

    xs = sorted(losses)
    n = len(xs)
    k = min(k, n)
    mean = p_top = 0.0
    for i in range(n):  # P(the best drawn is the i-th best) = C(n-1-i, k-1) / C(n, k)
        p = comb(n - 1 - i, k - 1) / comb(n, k)
        pct = percentile(xs[i], xs)
        mean += p * pct
        p_top += p * (pct < top)
    return {"k": k, "mean": mean, "p_top": p_top}


def conditional_agreement(row: dict, ref: dict) -> dict[str, bool]:
    """Per choice of ``row``'s decision: is the chosen value the best from scratch with
    the other choices held at the derived architecture's?"""
    dec = (row.get("decision") or {}).get("choices") or {}
    arch = row["arch"]
    out = {}
    for n, d in dec.items():
        cands = []
        for r in ref.values():
            if all(r["arch"][m] == arch[m] for m in arch if m != n):
                cands.append(r)
        if len(cands) < 2:
            continue
        best = min(cands, key=lambda r: r["val_loss"])["arch"][n]
        verdict = d.get("verdict")
        out[n] = (d.get("chosen") == best, "confident" if verdict == "decided" else verdict)
    return out


def race_agreement(row: dict, ref: dict, noise: float) -> list[tuple[bool, str]]:
    """Per (winner, other contender) pair of ``row``'s race: does the reference order
    them as the race did, and was the race's gap ``within noise`` or ``beyond noise``?"""
    race = row.get("race") or {}
    cs = race.get("contenders") or []
    if len(cs) < 2:
        return []
    noise = race.get("noise") or noise
    metric = next(k for k in cs[0] if k not in ("arch", "arch_str", "params", "time_s"))
    w = cs[race["winner"]]
    out = []
    for j, c in enumerate(cs):
        kw, kc = _key(w["arch"]), _key(c["arch"])
        if j == race["winner"] or kw not in ref or kc not in ref:
            continue
        same = ref[kw]["val_loss"] <= ref[kc]["val_loss"]
        gap = abs(c[metric] - w[metric])
        out.append((same, "within noise" if gap < noise else "beyond noise"))
    return out


def summarize(data: dict, noise: float = 0.0) -> dict:
    table = defaultdict(dict)  # (method, setting) -> corpus -> row summary
    calib = defaultdict(lambda: defaultdict(lambda: [0, 0]))  # split -> verdict -> [agree, n]
    rcal = defaultdict(lambda: defaultdict(lambda: [0, 0]))  # split -> gap -> [agree, n]
    for name, d in data.items():
        split = CORPORA[name].split
        groups = defaultdict(list)
        for r in d["rows"]:
            if r.get("percentile") is None:
                continue
            groups[(r["method"], r["setting"])].append(r)
            for ok, verdict in conditional_agreement(r, d["ref"]).values():
                c = calib[split][verdict]
                c[0] += int(ok)
                c[1] += 1
            for ok, gap in race_agreement(r, d["ref"], noise):
                c = rcal[split][gap]
                c[0] += int(ok)
                c[1] += 1
        for key, rs in groups.items():
            rs.sort(key=lambda r: r["seed"])
            ps = [r["percentile"] for r in rs]
            table[key][name] = {
                "seeds": [r["seed"] for r in rs],
                "percentiles": ps,
                "mean": statistics.fmean(ps),
                "top25": sum(1 for p in ps if p < 25),
                "time_s": statistics.fmean(r["search_time_s"] for r in rs),
                "archs": [r["arch_str"] for r in rs],
                "race_won_by_argmax": [((r.get("race") or {}).get("argmax_won")) for r in rs],
            }
    means = {}
    for key, per in table.items():
        m = {}
        for split in ("tuning", "held-out"):
            vals = [v["mean"] for n, v in per.items() if CORPORA[n].split == split]
            m[split] = (statistics.fmean(vals), len(vals)) if vals else None
        means[key] = m
    return {"table": table, "means": means,
            "calibration": {s: {v: {"agree": a, "n": n} for v, (a, n) in c.items()}
                            for s, c in calib.items()},
            "race_calibration": {s: {v: {"agree": a, "n": n} for v, (a, n) in c.items()}
                                 for s, c in rcal.items()}}


def _calibration_table(cal: dict, what: str) -> list[str]:
    lines = [f"| corpora | {what} | agrees | of | share |", "|---|---|---|---|---|"]
    for split, per in sorted(cal.items()):
        for key, c in sorted(per.items()):
            share = 100 * c["agree"] / c["n"] if c["n"] else float("nan")
            lines.append(f"| {split} | {key} | {c['agree']} | {c['n']} | {share:.0f}% |")
    return lines


def render(data: dict, s: dict, names: Sequence[str]) -> str:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    lines = [
        f"Generated by `python -m benchmarks.quality.heldout` on {date} (commit {_commit()}, "
        "this CPU machine, 2 cores, one thread per run). Percentile: the share of the "
        "space's 54 architectures (trained from scratch, 400 steps, seed 0) that beat the "
        "derived one; top 25% = below 25. Corpora (`benchmarks/quality/corpora.py`): "
        + ", ".join(f"{n} ({CORPORA[n].split}, {data[n]['n_ref']} reference archs)"
                    for n in names) + ".",
        "",
        "| method | setting | " + " | ".join(names) + " | tuning mean | held-out mean |",
        "|---|---|" + "---|" * len(names) + "---|---|",
    ]

    def order(key):
        m = s["means"][key]
        return (m["held-out"] is None, m["tuning"][0] if m["tuning"] else 1e9)

    for key in sorted(s["table"], key=order):
        per = s["table"][key]
        cells = []
        for n in names:
            v = per.get(n)
            cells.append("" if v is None else
                         f"{'/'.join(f'{p:.0f}' for p in v['percentiles'])} ({v['top25']}/"
                         f"{len(v['percentiles'])})")
        m = s["means"][key]
        fm = lambda x: "" if x is None else f"{x[0]:.1f}% ({x[1]})"  # noqa: E731
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) +
                     f" | {fm(m['tuning'])} | {fm(m['held-out'])} |")
    n_ref = min(data[n]["n_ref"] for n in names)
    rk = random_k([float(i) for i in range(n_ref)], 4)  # ranks only: any corpus
    lines += [
        "",
        "Cells: the percentile of each seed (0/1/2) and, in brackets, how many are in the "
        "top 25%. Means: over the corpora of the split that have the row (their count in "
        "brackets). Random search draws as many from-scratch trainings as fit in the "
        "recorded wall-clock of the DrNAS run of its seed; those runs shared the 2 cores "
        "with another run (and at times the test suite), so that budget is generous. "
        f"Without a budget: the best of 4 uniform draws among {n_ref} trained from scratch "
        "(as many trainings as the race, no supernet) lands at percentile "
        f"{rk['mean']:.1f} in expectation and in the top 25% with probability "
        f"{rk['p_top']:.2f}, on any corpus (it depends on the ranks only).",
        "",
        "Calibration of the decision report (per run and choice: is the chosen value the "
        "best from scratch with the run's other choices fixed?):",
        "",
    ]
    lines += _calibration_table(s["calibration"], "verdict")
    if s.get("race_calibration"):
        lines += [
            "",
            "Calibration of the race (per pair of a race's winner and another contender: "
            "does the seed-0 reference order them the same way? Grouped by the race's gap "
            "against its noise):",
            "",
        ]
        lines += _calibration_table(s["race_calibration"], "gap")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heldout", description=__doc__.splitlines()[0])
    p.add_argument("--corpora", nargs="+", default=list(DEFAULT))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--docs", default=os.path.join(ROOT, "docs", "search-quality.md"))
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    data = load(args.corpora)
    names = [n for n in args.corpora if data[n]["ref"]]
    noise = float(_full_defaults().get("race_noise", 0.0))
    s = summarize({n: data[n] for n in names}, noise)
    md = render(data, s, names)
    print(md)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{date}-search-quality-heldout")
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write("# Search quality on the held-out protocol\n\n" + md + "\n")
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump({"commit": _commit(), "date": date,
                   "table": {f"{k[0]} | {k[1]}": v for k, v in s["table"].items()},
                   "calibration": s["calibration"],
                   "race_calibration": s["race_calibration"]}, f, indent=1)
    if not args.no_docs:
        import sys

        sys.path.insert(0, ROOT)
        from benchmarks.sections import write_section

        write_section(args.docs, SECTION, md, heading="Held-out corpora (generated)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

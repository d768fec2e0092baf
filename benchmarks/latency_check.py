"""Latency table check and the cost of a budget (issue 26), on one quiet machine.

1. The latency table of the nanoGPT space (default preset, batch ``--batch``) on
   ``--device``: how long it takes to build, and for every architecture of the space
   (or ``--archs`` random ones) the table's sum against the measured latency of the
   extracted plain model (same timer), as relative errors.
2. The wall-clock of a search under a budget against the same search without one
   (``--steps`` DrNAS steps, argmax, no retraining; interleaved ``--rounds`` times):
   ``--max-params`` and ``--max-latency-ms`` at the space's median, each in both
   budget modes (``derive``, the default, and ``lagrange``, the multiplier).

Writes ``benchmarks/results/<date>-latency-check.{md,json}``::

    python benchmarks/latency_check.py --threads 2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.sections import git_commit as _commit  # noqa: E402


def table_check(args) -> dict:
    import torch

    from tangle_kernels.nn.convert import extract
    from tangle_kernels.nn.cost import CostModel
    from tangle_kernels.nn.latency import _time_modules, add_latency
    from tangle_kernels.spaces import make_space

    sp = make_space("nanogpt")
    data = sp.make_data(None)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    net = sp.build_supernet(data).to(dev)
    x = data.batch("val", args.batch, torch.Generator().manual_seed(0), dev)[0]
    cm = CostModel(net, sp.choices, example=x)
    t0 = time.perf_counter()
    # measured here and cached (args.cache): the budgeted searches below price with it,
    # as a user's second search on one machine does
    info = add_latency(cm, net, x, device=dev, cache=args.cache)
    build_s = time.perf_counter() - t0
    sels = [dict(zip(sp.choices, c)) for c in itertools.product(*sp.choices.values())]
    if args.archs and args.archs < len(sels):
        sels = random.Random(0).sample(sels, args.archs)
    # every architecture's extracted model timed by the table's own timer, interleaved
    # (round r of all of them, then round r + 1), minutes after the table was built
    # Each architecture is extracted and timed twice (two instances, one interleaved
    # pass): the two timings' disagreement is the machine's noise floor, below which no
    # table can be shown right; the table is compared with their mean.
    plains = [extract(net, sel).to(dev).eval() for sel in sels for _ in range(2)]
    with torch.no_grad():
        both = _time_modules([(m, x) for m in plains], dev, 0.02)
    rows = []
    for i, sel in enumerate(sels):
        m1, m2 = both[2 * i], both[2 * i + 1]
        ms = 0.5 * (m1 + m2)
        t = cm.latency(sel)
        rows.append({"arch": sp.describe(sel), "measured_ms": ms, "repeat_ms": [m1, m2],
                     "repeat_err": abs(m1 / m2 - 1.0), "table_ms": t, "rel_err": t / ms - 1.0})
    # the machine's drift between the table and the check: the largest and smallest
    # architectures were timed whole in both (info["check"])
    drift = {}
    for end in ("max", "min"):
        a = info["check"][end]["arch"]
        row = next((r for r, sel in zip(rows, sels)
                    if {n: str(v) for n, v in sel.items()} == a), None)
        if row is not None:
            drift[end] = row["measured_ms"] / info["check"][end]["measured_ms"]
    errs = [abs(r["rel_err"]) for r in rows]
    return {"build_s": build_s, "info": info, "rows": rows, "drift": drift,
            "max_abs_err": max(errs), "mean_abs_err": statistics.fmean(errs),
            "within_20pct": sum(e <= 0.2 for e in errs), "n": len(rows),
            "repeat_mean_err": statistics.fmean(r["repeat_err"] for r in rows),
            "repeat_max_err": max(r["repeat_err"] for r in rows),
            "repeat_within_20pct": sum(r["repeat_err"] <= 0.2 for r in rows)}


def budget_cost(args) -> dict:
    import torch

    from tangle_kernels.nn.cost import CostModel
    from tangle_kernels.search import Search, SearchConfig
    from tangle_kernels.spaces import make_space

    sp = make_space("nanogpt")
    data = sp.make_data(None)
    cm = CostModel(sp.build_supernet(data), sp.choices)
    ps = sorted(cm.params(dict(zip(sp.choices, c))) for c in itertools.product(*sp.choices.values()))
    median_params = ps[len(ps) // 2]
    # "none again": the same search as "none", run again in each round: how far two
    # identical searches differ on this machine (the noise floor of the ratios). In the
    # derive mode a budgeted search runs the very loop of the unconstrained one.
    variants = {"none": {}, "none again": {}, "max_params": {"max_params": median_params},
                "max_params lagrange": {"max_params": median_params, "budget_mode": "lagrange"}}
    if args.latency_limit:
        variants["max_latency_ms"] = {"max_latency_ms": args.latency_limit}
        variants["max_latency_ms lagrange"] = {"max_latency_ms": args.latency_limit,
                                               "budget_mode": "lagrange"}
    times = {k: [] for k in variants}
    names = list(variants)
    with tempfile.TemporaryDirectory() as tmp:
        # round -1 is a warm-up (imports, the plot's first figure, allocator pools), not
        # timed; each round then starts at another variant, so that none is always first
        for r in range(-1, args.rounds):
            order = names if r < 0 else names[r % len(names):] + names[:r % len(names)]
            for k in order:
                kw = variants[k]
                cfg = SearchConfig(sampler="drnas", steps=args.steps if r >= 0 else 2,
                                   batch_size=32, lr=3e-3, arch_lr=3e-2,
                                   drnas_concentration=10.0, eval_batches=4,
                                   checkpoint_every=0, retrain_steps=0, **kw)
                out = os.path.join(tmp, f"{k}-{r}")
                s = Search(sp, data, cfg, out=out, device=args.device, progress=False,
                           log=lambda m: None)
                t0 = time.perf_counter()
                s.run()
                if r >= 0:
                    times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    fast = {k: min(v) for k, v in times.items()}
    return {"steps": args.steps, "rounds": args.rounds, "median_params": median_params,
            "latency_limit_ms": args.latency_limit, "times_s": times, "median_s": med,
            "ratio": {k: med[k] / med["none"] for k in med},
            "min_s": fast, "ratio_min": {k: fast[k] / fast["none"] for k in fast}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--archs", type=int, default=0, help="random archs to check (0: all)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cache_root = tempfile.mkdtemp(prefix="latency-check-")
    os.environ["TANGLE_CACHE"] = cache_root  # the searches' table: the one measured here
    from tangle_kernels.nn.latency import latency_cache_dir

    args.cache = latency_cache_dir()
    tc = table_check(args)
    big = max(tc["rows"], key=lambda r: r["measured_ms"])["table_ms"]
    small = min(tc["rows"], key=lambda r: r["measured_ms"])["table_ms"]
    args.latency_limit = round((big + small) / 2, 3)
    bc = budget_cost(args)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    rec = {"date": date, "commit": _commit(), "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "device": args.device, "table": tc, "budget": bc}
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{date}-latency-check")
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=1)
    chk = tc["info"]["check"]
    lines = [
        f"# Latency table and budget cost ({date}, commit {rec['commit']}, {args.device}, "
        f"{rec['threads']} threads, torch {rec['torch']})",
        "",
        f"nanoGPT space (default preset, batch {args.batch}): table built in "
        f"{tc['build_s']:.1f} s; mapped onto {len(chk)} whole models (the largest, the "
        f"smallest and {len(chk) - 2} drawn; least squares in the relative error): scale "
        f"{tc['info'].get('scale', 1.0):.3f}, rest {tc['info']['rest_ms']:.3f} ms "
        f"(max arch: measured {chk['max']['measured_ms']:.3f} ms, table "
        f"{chk['max']['table_ms']:.3f}; min arch: {chk['min']['measured_ms']:.3f} / "
        f"{chk['min']['table_ms']:.3f}).",
        "",
        f"Table sum vs the extracted model measured, {tc['n']} architectures: mean |error| "
        f"{100 * tc['mean_abs_err']:.1f}%, max {100 * tc['max_abs_err']:.1f}%, within 20%: "
        f"{tc['within_20pct']}/{tc['n']}. Machine drift between the table and the check "
        "(the same whole model timed in both): " + ", ".join(
            f"{k} arch {v:.2f}x" for k, v in tc["drift"].items()) + ".",
        "",
        "The noise floor: every architecture was extracted and timed twice in the same "
        "interleaved pass (the table is compared with the mean of both). The two timings "
        f"of one architecture disagree by {100 * tc['repeat_mean_err']:.1f}% on average, "
        f"at most {100 * tc['repeat_max_err']:.1f}%; within 20% of each other: "
        f"{tc['repeat_within_20pct']}/{tc['n']}.",
        "",
        f"Search wall-clock ({bc['steps']} DrNAS steps, argmax, median and fastest of "
        f"{bc['rounds']} "
        "interleaved rounds, after an untimed warm-up; each round starts at another variant):",
        "",
        "| budget | median s | ratio to none | fastest s | ratio to none |",
        "|---|---|---|---|---|",
    ]
    for k, v in bc["median_s"].items():
        kind = k.split()[0]
        if k == "none again":
            lines.append(f"| none, again (the noise floor) | {v:.1f} | {bc['ratio'][k]:.3f}x | "
                         f"{bc['min_s'][k]:.1f} | {bc['ratio_min'][k]:.3f}x |")
            continue
        lim = {"none": "", "max_params": f" {bc['median_params']:,}",
               "max_latency_ms": f" {bc['latency_limit_ms']:.3f} ms"}[kind]
        lim += " (multiplier)" if k.endswith("lagrange") else (" (derive)" if kind != "none" else "")
        lines.append(f"| {kind}{lim} | {v:.1f} | {bc['ratio'][k]:.3f}x | {bc['min_s'][k]:.1f} | "
                     f"{bc['ratio_min'][k]:.3f}x |")
    md = "\n".join(lines) + "\n"
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

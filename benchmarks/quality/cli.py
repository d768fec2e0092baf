"""``python benchmarks/search_quality.py``: the command line of the benchmark."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
from collections.abc import Sequence

from tangle_kernels.search.runlog import read_jsonl

from .bench import (ALL_METHODS, ROOT, Bench, budget_at, in_budget, log, percentile,
                    random_search_from_reference, _key)
from .report import plot_trajectories, summarize, write_docs_section, write_outputs

DESCRIPTION = "Search quality: does a sampler find a good architecture, and how good?"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="search_quality.py", description=DESCRIPTION)
    p.add_argument("--space", default="nanogpt")
    p.add_argument("--preset", default=None)
    p.add_argument("--choice", action="append", default=[], metavar="NAME=V1,V2")
    p.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a search setting (all runs)")
    p.add_argument("--method-set", action="append", default=[], metavar="METHOD:FIELD=VALUE",
                   help="a search setting of one method's runs only (not DrNAS's, which "
                   "sets the time budget), e.g. gdas:sandwich=max")
    p.add_argument("--data", default=None, help="text file (default: the embedded corpus)")
    p.add_argument("--corpus", default=None, metavar="NAME",
                   help="a corpus of the held-out protocol (benchmarks/quality/corpora.py; "
                   "instead of --data)")
    p.add_argument("--steps", type=int, default=None,
                   help="search steps of the default (drnas) run (default: the space's)")
    p.add_argument("--retrain-steps", type=int, default=400,
                   help="from-scratch training steps (the main command's: 400)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samplers", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    p.add_argument("--reference-seed", type=int, default=0)
    p.add_argument("--max-reference", type=int, default=60)
    p.add_argument("--reference-sample", type=int, default=40)
    p.add_argument("--budget-quantile", type=float, default=None, metavar="Q",
                   help="search under max_params = the Q-th percentile of the reference's "
                   "parameter counts (the budgeted question; needs the reference)")
    p.add_argument("--stage", choices=("all", "reference", "runs", "report"), default="all")
    p.add_argument("--no-train-reference", action="store_true",
                   help="use the reference records there are, train none")
    p.add_argument("--probe-steps", type=int, default=12)
    p.add_argument("--spos-eval-cost", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default=None)
    p.add_argument("--work", default=None, help="cache folder (reference.jsonl, runs.jsonl)")
    p.add_argument("--run-root", default=None, help="folder of the search runs' metrics")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--readme", default=os.path.join(ROOT, "docs", "search-quality.md"),
                   help="the Markdown file whose search-quality section is regenerated "
                   "(default docs/search-quality.md)")
    p.add_argument("--no-readme", action="store_true", help="do not regenerate that section")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the searches' final checkpoints (for benchmarks/quality/diagnose.py)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: tiny preset, few steps (not a measurement)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        if args.preset is None:
            args.preset = "tiny"
        args.hp = ["block_size=16", *args.hp]
        if args.steps is None:
            args.steps = 6
        if args.retrain_steps == 400:
            args.retrain_steps = 4
        args.set = ["batch_size=4", "eval_batches=2", "spos_budget=4", "spos_population=2",
                    "spos_eval_batches=1", *args.set]
        args.probe_steps = min(args.probe_steps, 4)
    if args.corpus:
        from .corpora import get, materialize

        if args.data:
            raise SystemExit("--corpus and --data: give one")
        c = get(args.corpus)
        args.data = materialize(c)
        args.corpus_ident = c.ident
        args.tag = args.tag or c.name
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    bench = Bench(args)
    ref = bench.reference() if args.stage in ("all", "reference") else \
        {r["key"]: r for r in read_jsonl(bench.ref_path)}
    if args.stage == "reference":
        return 0
    if not ref:
        raise SystemExit("no reference records: run the reference stage first")
    if args.budget_quantile is not None:
        if any(a.split("=", 1)[0].strip() == "max_params" for a in args.set):
            raise SystemExit("--budget-quantile and --set max_params=...: give one")
        try:
            lim = budget_at(ref, args.budget_quantile)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        log(f"budget: max_params={lim} (percentile {args.budget_quantile:g} of the "
            f"reference's {len(ref)} parameter counts)")
        args.set = [*args.set, f"max_params={lim}"]
        bench = Bench(args)  # the same cache folder (the search settings are not its key)
    rows: list[dict] = []
    if args.stage in ("all", "runs"):
        rows = bench.runs(ref)
    else:
        rows = [r for r in read_jsonl(bench.runs_path) if r["seed"] in args.seeds
                and r.get("config_hash") in bench.hashes_for(r["method"])
                and r["method"] in args.samplers]
        last = {(r["method"], r["seed"]): r for r in rows}
        rows = list(last.values())
    # fill percentiles of runs recorded before the reference held their arch
    # under a budget: among the reference architectures within it
    pool = in_budget(ref, bench.base_cfg)
    losses = [r["val_loss"] for r in pool.values()]
    for r in rows:
        k = _key(r["arch"])
        if k in ref:
            r["scratch_val"] = ref[k]["val_loss"]
            r["percentile"] = round(percentile(r["scratch_val"], losses), 2)
            r["rank"] = 1 + sum(1 for x in losses if x < r["scratch_val"])
    if "random-search" in args.samplers:
        for seed in args.seeds:
            b = [r for r in rows if r["method"] == "drnas" and r["seed"] == seed]
            if b:
                rows.append(random_search_from_reference(pool, b[0]["search_time_s"], seed))
    methods = [m for m in ALL_METHODS if m in args.samplers]
    rows.sort(key=lambda r: (methods.index(r["method"]), r["seed"]))
    summary = summarize(rows, methods)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    suffix = "" if bench.tag == "sonnets" else f"-{bench.tag}"
    os.makedirs(args.out, exist_ok=True)
    png = plot_trajectories(bench, rows, os.path.join(args.out,
                                                      f"{date}-search-quality{suffix}-alphas.png"))
    jp, mp = write_outputs(bench, ref, rows, summary, png, args)
    with open(mp, encoding="utf-8") as f:
        print(f.read())
    if not args.no_readme:
        mds = sorted(
            os.path.join(args.out, f) for f in os.listdir(args.out)
            if f.endswith(".md") and "-search-quality" in f and "quick" not in f
        )
        latest: dict[str, str] = {}
        for pth in mds:  # the latest report per tag
            t = os.path.basename(pth)[len("YYYY-MM-DD-search-quality"):]
            latest[t] = pth
        write_docs_section(sorted(latest.values()), args.readme)
    log(f"wrote {jp}, {mp}")
    return 0



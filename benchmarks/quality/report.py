"""The benchmark's report: summary per method, the paper's ordering, the .json and .md
files, the alpha trajectories and the generated section of docs/search-quality.md."""

from __future__ import annotations

import datetime as _dt
import math
import os
import statistics
from collections.abc import Sequence

from tangle_kernels.search.runlog import atomic_write, write_json

from .bench import ROOT, Bench

SECTION = "search-quality"
README_START = f"<!-- {SECTION}:start -->"
README_END = f"<!-- {SECTION}:end -->"


def summarize(rows: list[dict], methods: Sequence[str]) -> list[dict]:
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m and r["percentile"] is not None]
        if not rs:
            continue
        ps = [r["percentile"] for r in rs]
        out.append({
            "method": m,
            "seeds": len(rs),
            "pct_mean": round(statistics.mean(ps), 1),
            "pct_std": round(statistics.stdev(ps), 1) if len(ps) > 1 else 0.0,
            "pct_min": min(ps),
            "pct_max": max(ps),
            "top25": sum(1 for p in ps if p < 25),
            "val_mean": round(statistics.mean(r["scratch_val"] for r in rs), 4),
            "time_mean": round(statistics.mean(r["search_time_s"] for r in rs), 1),
            "steps": sorted({r["steps"] for r in rs if r.get("steps")}),
        })
    return out


def ordering_verdict(summary: list[dict]) -> str:
    """Does DrNAS beat SPOS + random / evolution (mean percentile over seeds)?"""
    s = {r["method"]: r for r in summary}
    if "drnas" not in s:
        return "DrNAS was not run: the paper's ordering is not tested."
    d = s["drnas"]
    parts, holds, clear = [], True, True
    for m in ("spos+random", "spos+evolution"):
        if m not in s:
            continue
        o = s[m]
        rel = "ahead of" if d["pct_mean"] < o["pct_mean"] else "not ahead of"
        holds &= d["pct_mean"] < o["pct_mean"]
        clear &= d["pct_max"] < o["pct_min"]  # every DrNAS seed beats every SPOS seed
        parts.append(f"{rel} {m} ({d['pct_mean']:.1f}% vs {o['pct_mean']:.1f}%)")
    if not parts:
        return "SPOS was not run: the paper's ordering is not tested."
    out = (f"DrNAS (mean percentile over {d['seeds']} seeds, lower is better) is "
           + "; ".join(parts) + ": the paper's ordering (DrNAS ahead of SPOS + "
           f"random/evolution) {'holds' if holds else 'does NOT hold'} here")
    if holds:
        out += (" (every DrNAS seed ranks above every SPOS seed)." if clear else
                " (but the ranges over seeds overlap).")
    else:
        out += "."
    best = min(summary, key=lambda r: r["pct_mean"])
    if best["method"] != "drnas":
        out += (f" Best method: {best['method']} ({best['pct_mean']:.1f}%).")
    return out


def write_outputs(bench: Bench, ref: dict, rows: list[dict], summary: list[dict],
                  png: str | None, args) -> tuple[str, str]:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    suffix = "" if bench.tag == "sonnets" else f"-{bench.tag}"
    base = os.path.join(args.out, f"{date}-search-quality{suffix}")
    losses = sorted(r["val_loss"] for r in ref.values())
    n_space = bench.space.num_architectures()
    import torch

    doc = {
        "date": date,
        "tag": bench.tag,
        "ident": bench.ident,
        "search_config": bench.base_cfg,
        "threads": args.threads,
        "torch": torch.__version__,
        "reference": {
            "n": len(ref),
            "space_size": n_space,
            "complete": len(ref) == min(n_space, args.max_reference if n_space <= args.max_reference else args.reference_sample),
            "best": losses[0] if losses else None,
            "q25": losses[max(0, math.ceil(0.25 * len(losses)) - 1)] if losses else None,
            "median": statistics.median(losses) if losses else None,
            "worst": losses[-1] if losses else None,
            "records": sorted(ref.values(), key=lambda r: r["val_loss"]),
        },
        "runs": rows,
        "summary": summary,
        "ordering": ordering_verdict(summary),
        "alphas_png": os.path.relpath(png, ROOT) if png else None,
    }
    write_json(base + ".json", doc, indent=1)
    md = render_md(doc, bench)
    atomic_write(base + ".md", lambda f: f.write(md))
    return base + ".json", base + ".md"


def render_md(doc: dict, bench: Bench) -> str:
    ref = doc["reference"]
    cfg = doc["search_config"]
    L = []
    L.append(f"### Search quality: {bench.space.name} on {doc['ident']['data']} ({doc['date']})")
    L.append("")
    L.append(
        f"Reference: {ref['n']} of {ref['space_size']} architectures trained from scratch "
        f"({doc['ident']['retrain_steps']} steps, batch {cfg['batch_size']}, lr {cfg['lr']}, "
        f"seed {doc['ident']['reference_seed']}, {cfg['eval_batches']} fixed validation "
        f"batches){'' if ref['complete'] else ' — INCOMPLETE'}: val loss best "
        f"{_f(ref['best'])}, top-25% cut {_f(ref['q25'])}, median {_f(ref['median'])}, worst "
        f"{_f(ref['worst'])}. Percentile = share of the reference that beats the derived "
        f"architecture (0% = the best; top 25% = below 25%). Searches at equal wall-clock "
        f"(the default DrNAS search of each seed, {cfg['steps']} steps), "
        f"{doc['threads']} CPU thread(s); random search = as many from-scratch trainings "
        f"as fit in that time (computed from the reference's trainings)."
    )
    L.append("")
    L.append("| method | seeds | percentile mean | spread (sd; min-max) | in top 25% | "
             "scratch val mean | search s | steps |")
    L.append("|---|---|---|---|---|---|---|---|")
    for s in doc["summary"]:
        L.append(f"| {s['method']} | {s['seeds']} | {s['pct_mean']:.1f}% | {s['pct_std']:.1f} "
                 f"({s['pct_min']:.1f}-{s['pct_max']:.1f}) | {s['top25']}/{s['seeds']} | "
                 f"{s['val_mean']:.4f} | {s['time_mean']:.0f} | "
                 f"{','.join(map(str, s['steps'])) or '-'} |")
    L.append("")
    L.append(f"**Ordering**: {doc['ordering']}")
    L.append("")
    L.append("Runs:")
    L.append("")
    L.append("| method | seed | derived architecture | scratch val | rank | percentile | "
             "max prob per choice | search s |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in doc["runs"]:
        dec = r.get("decided")
        mp = " ".join(f"{n} {v['max_prob']:.2f}" for n, v in dec.items()) if dec else "-"
        if r["method"] == "random-search":
            mp = f"{r['trained']} trained"
        L.append(f"| {r['method']} | {r['seed']} | {r['arch_str']} | {_f(r['scratch_val'])} | "
                 f"{r['rank']}/{ref['n']} | {_f(r['percentile'], 1)}% | {mp} | "
                 f"{r['search_time_s']:.0f} |")
    if doc.get("alphas_png"):
        L.append("")
        L.append(f"![alpha trajectories]({doc['alphas_png']})")
    L.append("")
    return "\n".join(L)


def _f(x, nd=4):
    return "-" if x is None else f"{x:.{nd}f}"


def plot_trajectories(bench: Bench, rows: list[dict], path: str) -> str | None:
    """One row of panels per sampler (first seed): probability of each value vs step."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except Exception:
        return None
    from tangle_kernels.search.plot import read_probs

    seed0 = bench.args.seeds[0]
    sel = [r for r in rows if r["seed"] == seed0 and r.get("decided") and r.get("metrics")]
    sel = [r for r in sel if os.path.exists(os.path.join(ROOT, r["metrics"]))]
    if not sel:
        return None
    names = list(bench.space.choices)
    fig, axes = plt.subplots(len(sel), len(names), figsize=(3.3 * len(names), 2.3 * len(sel)),
                             squeeze=False)
    for i, r in enumerate(sel):
        steps, probs = read_probs(os.path.join(ROOT, r["metrics"]))
        for j, n in enumerate(names):
            ax = axes[i][j]
            for v_i, v in enumerate(bench.space.choices[n]):
                ax.plot(steps, [p[v_i] for p in probs.get(n, [])], label=str(v), lw=1.2)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(n)
            if j == 0:
                ax.set_ylabel(f"{r['method']}\nprob")
            if i == len(sel) - 1:
                ax.set_xlabel("step")
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"alpha trajectories, seed {seed0} ({bench.tag})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def section_body(md_paths: Sequence[str], target: str) -> str:
    """The generated section: how to regenerate it and the latest report per tag (image
    links made relative to ``target``'s folder)."""
    rel = os.path.relpath(ROOT, os.path.dirname(os.path.abspath(target)))
    body = ["Regenerate: `python benchmarks/search_quality.py` (embedded corpus) and "
            "`python benchmarks/search_quality.py --data ../shared/data/tinyshakespeare.txt`."
            " Full records: `benchmarks/results/*-search-quality*.json`.", ""]
    for p in md_paths:
        with open(p, encoding="utf-8") as f:
            text = f.read().replace("### Search quality", "#### Search quality")
        if rel != ".":
            text = text.replace("](benchmarks/", f"]({rel}/benchmarks/")
        body.append(text)
    return "\n".join(body)


def write_docs_section(md_paths: Sequence[str], target: str) -> None:
    """Replace (or append) the ``search-quality`` section of ``target`` with the reports,
    through ``benchmarks/sections.py``, the one section writer."""
    from benchmarks import sections

    sections.write_section(target, SECTION, section_body(md_paths, target), heading="Search quality")

"""Why a search derived what it derived: the trained supernet's own ranking of every
architecture (inherited weights, one-hot) against the from-scratch reference.

Reads the searches of a benchmark work folder that kept their checkpoints
(``search_quality.py --keep-checkpoints``) and, per run: the rank correlation
(Spearman) of the supernet's inherited validation losses with the reference's, the
percentile of the supernet's own best architecture, the mean loss per value of each
choice under both (the weight-sharing bias shows as a choice whose order flips), and
the overfitting of the shared weights (last train loss against the architecture
step's validation loss, next to the from-scratch gap of the same architecture)::

    python -m benchmarks.quality.diagnose --corpus coriolanus [--method drnas] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Sequence

from tangle_kernels.search.runlog import read_jsonl

from .bench import ROOT, _key, percentile


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return num / den if den else 0.0


def diagnose_run(space, data, run_dir: str, ref: dict) -> dict:
    """The supernet of ``run_dir`` (its checkpoint and arch.json) against ``ref``."""
    from tangle_kernels.search import Search, SearchConfig

    with open(os.path.join(run_dir, "arch.json"), encoding="utf-8") as f:
        arch = json.load(f)
    cfg = SearchConfig.from_dict(arch["config"])
    s = Search(space, data, cfg, out=run_dir, resume=True, progress=False, log=lambda m: None)
    s.setup()
    try:
        keys = sorted(ref)
        sup = {k: float(s.evaluate_selection(ref[k]["arch"])[space.metric]) for k in keys}
    finally:
        s.rundir.release()
    scratch = [ref[k]["val_loss"] for k in keys]
    inh = [sup[k] for k in keys]
    best_sup = min(keys, key=sup.__getitem__)
    by_choice = {}
    for n, vals in space.choices.items():
        by_choice[n] = {
            str(v): {
                "supernet": statistics.fmean(sup[k] for k in keys if ref[k]["arch"][n] == v),
                "scratch": statistics.fmean(ref[k]["val_loss"] for k in keys
                                            if ref[k]["arch"][n] == v),
            } for v in vals
        }
    recs = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
            if r.get("kind") == "train"]
    tail = recs[-20:]
    train = statistics.fmean(r["train_loss"] for r in tail if "train_loss" in r) if tail else None
    val = [r["arch_loss"] for r in tail if "arch_loss" in r]
    dk = _key(arch["arch"])
    return {
        "run": os.path.relpath(run_dir, ROOT),
        "derived": arch["arch"],
        "derived_percentile": percentile(ref[dk]["val_loss"], scratch) if dk in ref else None,
        "spearman": spearman(inh, scratch),
        "supernet_best": ref[best_sup]["arch"],
        "supernet_best_percentile": percentile(ref[best_sup]["val_loss"], scratch),
        "by_choice": by_choice,
        "supernet_train_loss_last20": train,
        "supernet_arch_val_loss_last20": statistics.fmean(val) if val else None,
        "derived_scratch_train_loss": ref[dk]["train_loss"] if dk in ref else None,
        "derived_scratch_val_loss": ref[dk]["val_loss"] if dk in ref else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diagnose.py", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--method", default="drnas")
    p.add_argument("--config-hash", default=None, help="only the runs of this config")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    from tangle_kernels.spaces import make_space

    from .corpora import get, materialize

    torch.set_num_threads(1)
    c = get(args.corpus)
    space = make_space("nanogpt")
    data = space.make_data(materialize(c))
    base = os.path.join(ROOT, "benchmarks", "results", "search_quality")
    works = [d for d in os.listdir(base) if d.startswith(f"{c.name}-")]
    out = []
    for w in works:
        ref = {r["key"]: r for r in read_jsonl(os.path.join(base, w, "reference.jsonl"))}
        root = os.path.join(ROOT, "runs", "search_quality", w)
        if not os.path.isdir(root):
            continue
        for d in sorted(os.listdir(root)):
            rd = os.path.join(root, d)
            if not d.startswith(f"{args.method}-") or not os.path.exists(
                    os.path.join(rd, "checkpoint.pt")):
                continue
            if args.config_hash and args.config_hash not in d:
                continue
            r = diagnose_run(space, data, rd, ref)
            out.append(r)
            print(f"{d}: derived p{r['derived_percentile']:.0f}  spearman {r['spearman']:+.2f}  "
                  f"supernet-best p{r['supernet_best_percentile']:.0f}  train "
                  f"{r['supernet_train_loss_last20']:.3f} / arch-val "
                  f"{r['supernet_arch_val_loss_last20'] or float('nan'):.3f} (scratch "
                  f"{r['derived_scratch_train_loss']:.3f} / {r['derived_scratch_val_loss']:.3f})")
            for n, v in r["by_choice"].items():
                print("   ", n, "  ".join(f"{k}: sup {x['supernet']:.3f} scr {x['scratch']:.3f}"
                                         for k, x in v.items()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

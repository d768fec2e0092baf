"""The cost / quality front of one trained supernet (``tangle-search pareto`` and
``--pareto``).

For each budget of a list (default: the space's cost at the 10/25/50/75/90th
percentiles of its architectures, and no limit) the derived architecture is the most
probable one under the final distribution that fits it
(:func:`~.budget.constrained_argmax`, as a budgeted search derives); each is scored on
the run's fixed validation batches with the supernet's inherited weights (one-hot).
The front is the points no other point beats in both cost and loss. ``pareto.json``
holds every point (budget, architecture, cost, loss, on the front or not) and
``pareto.png`` plots them; ``tangle-search pareto OUT --extract I`` writes point I's
extracted plain model (``pareto-I.pt``, the inherited weights) and an arch.json for it
(``pareto-I.json``, read by ``tangle-search train``).

The supernet's loss ranks architectures by their shared weights, which can disagree
with training from scratch (docs/search-quality.md): the front is what this supernet
says, the race (``select=race``) or ``tangle-search train`` is how to check a point.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .budget import Budget, BudgetError, constrained_argmax

__all__ = ["default_budgets", "front", "plot_front", "KINDS"]

KINDS = ("params", "macs")
QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)


def _all_costs(cm, choices: Mapping[str, list], kind: str, limit: int = 200_000) -> list[int]:
    import itertools
    import random

    names = list(choices)
    n = math.prod(len(v) for v in choices.values())
    if n <= limit:
        sels = (dict(zip(names, v)) for v in itertools.product(*(choices[c] for c in names)))
    else:  # a uniform sample of the space
        rng = random.Random(0)
        sels = ({c: rng.choice(choices[c]) for c in names} for _ in range(limit))
    return sorted(cm.cost(s, kind) for s in sels)


def default_budgets(cm, choices: Mapping[str, list], kind: str = "params") -> list[float | None]:
    """The cost at the :data:`QUANTILES` of the space's architectures, then None (no
    limit)."""
    costs = _all_costs(cm, choices, kind)
    out: list[float | None] = []
    for q in QUANTILES:
        c = float(costs[min(len(costs) - 1, int(q * (len(costs) - 1) + 0.5))])
        if c not in out:
            out.append(c)
    return [*out, None]


def front(cm, probs: Mapping[str, Sequence[float]], score, budgets: Sequence[float | None],
          kind: str = "params", describe=None) -> list[dict]:
    """One point per distinct derived architecture of ``budgets`` (``score(sel)``: its
    loss, lower is better), sorted by cost; ``front`` marks the non-dominated ones."""
    if kind not in KINDS:
        raise BudgetError(f"kind {kind!r}: one of {', '.join(KINDS)}")
    points: dict[str, dict] = {}
    for b in budgets:
        if b is not None and not (b > 0 and math.isfinite(b)):
            raise BudgetError(f"budget {b}: must be positive and finite")
        budget = Budget({kind: float(b)}) if b is not None else Budget({})
        try:
            sel = constrained_argmax(cm, probs, budget)
        except BudgetError:
            continue  # nothing fits this budget: no point
        key = repr(sorted(sel.items()))
        if key in points:
            points[key]["budgets"].append(b)
            continue
        points[key] = {"arch": sel, "arch_str": describe(sel) if describe else str(sel),
                       kind: cm.cost(sel, kind), "loss": float(score(sel)), "budgets": [b]}
    pts = sorted(points.values(), key=lambda p: (p[kind], p["loss"]))
    best = math.inf
    for p in pts:  # ascending cost: on the front when it beats every cheaper point
        p["front"] = p["loss"] < best
        best = min(best, p["loss"])
    return pts


def plot_front(points: Sequence[dict], path: str, kind: str = "params",
               title: str = "") -> str | None:
    """``pareto.png``; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p[kind] for p in points]
    ys = [p["loss"] for p in points]
    ax.scatter(xs, ys, c=["C0" if p["front"] else "0.6" for p in points], zorder=3)
    fr = [p for p in points if p["front"]]
    ax.step([p[kind] for p in fr], [p["loss"] for p in fr], where="post", color="C0")
    for i, p in enumerate(points):
        ax.annotate(str(i), (p[kind], p["loss"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(kind)
    ax.set_ylabel("supernet validation loss (inherited weights)")
    ax.set_title(title or "cost / quality front of one supernet")
    fig.tight_layout()
    tmp = f"{path}.{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def search_front(search, kind: str = "params", budgets: Sequence[float | None] | None = None
                 ) -> dict[str, Any]:
    """The front of a set-up :class:`~.loop.Search` (after its steps, or loaded from its
    checkpoint): the record ``pareto.json`` holds."""
    from ..nn.cost import CostModel
    from .common import derive_seed, generator

    space = search.space
    example = None
    if kind == "macs":
        example = search.data.batch("val", 2, generator(derive_seed(search.cfg.seed, 0, "cost")),
                                    search.device)[0]
    cm = CostModel(search.model, space.choices, example=example)
    if budgets is None:
        budgets = default_budgets(cm, space.choices, kind)
    probs = {n: p.tolist() for n, p in search.sampler.probs().items()}
    metric = space.metric

    def score(sel):
        v = float(search.evaluate_selection(sel)[metric])
        return v if space.minimize else -v

    pts = front(cm, probs, score, budgets, kind, describe=space.describe)
    return {"kind": kind, "metric": metric if space.minimize else f"-{metric}",
            "budgets": list(budgets), "points": pts}


class LoadedRun:
    """A finished run's supernet and final distribution, read from its folder
    (``arch.json`` and ``checkpoint.pt``) without touching its files."""

    def __init__(self, out: str, *, device="cpu", data: str | None = None):
        import torch

        from ..spaces import get_space
        from .checkpoint import load_checkpoint
        from .common import eval_batches
        from .config import SearchConfig, SearchError
        from .inputs import read_arch_json
        from .samplers import sampler_from_config

        arch_path = os.path.join(out, "arch.json")
        if not os.path.isfile(arch_path):
            raise SearchError(f"{out}: no arch.json (a finished tangle-search run folder?)")
        name, space_cfg, _, rec = read_arch_json(arch_path)
        self.space = get_space(name).from_config(space_cfg)
        self.cfg = SearchConfig.from_dict(rec.get("config") or {})
        self.device = torch.device(device)
        self.data = self.space.make_data(data if data is not None else rec.get("data_arg"))
        ck = load_checkpoint(os.path.join(out, "checkpoint.pt"), map_location=self.device)
        torch.manual_seed(0)
        self.model = self.space.build_supernet(self.data).to(self.device)
        try:
            self.model.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise SearchError(f"{out}/checkpoint.pt does not fit the run's supernet (other "
                              f"data?): {str(e).splitlines()[0]}") from None
        self.sampler = sampler_from_config(self.cfg, self.space.choices, device=self.device,
                                           total_steps=int(rec.get("steps", self.cfg.steps)))
        self.sampler.load_state_dict(ck["alphas"])
        self.compiler = None
        self.eval_set = eval_batches(self.data, self.cfg, self.device)
        self.record = rec

    def evaluate_selection(self, selection, batches=None) -> dict:
        from .report import evaluate_selection

        return evaluate_selection(self, selection, batches)


def write_front(run, out: str, kind: str = "params", budgets=None) -> dict:
    """``pareto.json`` and ``pareto.png`` of ``run`` (a Search or :class:`LoadedRun`)."""
    from .runlog import write_json

    rec = search_front(run, kind, budgets)
    png = plot_front(rec["points"], os.path.join(out, "pareto.png"), kind,
                     title=f"{run.space.name}: {kind} vs supernet {rec['metric']}")
    rec["plot"] = os.path.basename(png) if png else None
    write_json(os.path.join(out, "pareto.json"), rec)
    return rec


def extract_point(run, rec: dict, i: int, out: str) -> tuple[str, str]:
    """Point ``i`` of ``rec`` as ``pareto-I.pt`` (the extracted plain model's state dict,
    inherited weights) and ``pareto-I.json`` (an arch.json ``tangle-search train`` reads)."""
    import torch

    from .config import SearchError
    from .runlog import atomic_write, write_json

    pts = rec["points"]
    if not 0 <= i < len(pts):
        raise SearchError(f"--extract {i}: the front has points 0..{len(pts) - 1}")
    sel = pts[i]["arch"]
    plain = run.space.extract(run.model, sel)
    pt = os.path.join(out, f"pareto-{i}.pt")
    atomic_write(pt, lambda f: torch.save(plain.state_dict(), f), binary=True)
    js = os.path.join(out, f"pareto-{i}.json")
    arch = {k: v for k, v in run.record.items()
            if k in ("space", "space_config", "config", "data_arg", "steps", "seed")}
    arch.update({"arch": sel, "arch_str": pts[i]["arch_str"], "pareto_point": pts[i]})
    write_json(js, arch)
    return pt, js

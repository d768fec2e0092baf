"""After the search: select, check, evaluate, extract, retrain, and write the results.

:func:`finish` is the end of a run (:class:`~.loop.Search` calls it): the sampler
selects the architecture (:meth:`Sampler.select`: the argmax of a trained sampler's
probabilities; SPOS scores selections on the trained supernet), every DDP rank must
have derived the same one, the supernet (inherited weights) and the extracted plain
model are evaluated on the fixed validation batches, the sampler says how decided it
was, the architecture is optionally trained from scratch (:func:`train_from_scratch`),
and rank 0 writes ``arch.json``, the ``final`` record of ``metrics.jsonl`` and
``alphas.png``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from ..nn.base import set_arch
from . import distributed as D
from .common import (
    compile_line,
    cosine_lr,
    derive_seed,
    eval_batches,
    eval_model,
    generator,
    make_w_optimizer,
    precision_context,
)
from .compiled import make_compiler
from .config import SearchConfig, SearchError
from .runlog import write_json
from .samplers import SelectionContext

__all__ = ["finish", "evaluate_selection", "train_from_scratch"]


@torch.no_grad()
def evaluate_selection(search, selection: Mapping[str, Any], batches=None) -> dict:
    """Metrics of ``search``'s supernet under the one-hot ``selection`` (inherited weights)."""
    set_arch(search.model, search.space.hard_arch(selection, device=search.device))
    try:
        with precision_context(search.cfg.precision, search.device):
            return search.space.evaluate(
                eval_model(search.model, search.compiler),
                batches if batches is not None else search.eval_set,
            )
    finally:
        set_arch(search.model, None)


def _selection_context(search) -> SelectionContext:
    cfg = search.cfg

    def score(sel, n_batches: int) -> float:
        batches = search.eval_set[:n_batches]
        if len(batches) < n_batches:
            batches = eval_batches(search.data, cfg, search.device, n_batches)
        v = float(search.evaluate_selection(sel, batches)[search.space.metric])
        return v if search.space.minimize else -v

    fits = best_within = None
    if getattr(search, "budget", None):
        from .budget import constrained_argmax

        fits = search.fits

        def best_within(probs):  # noqa: F811 (None without a budget)
            return constrained_argmax(search.cost_model, probs, search.budget)

    return SelectionContext(cfg=cfg, score=score, seed=derive_seed(cfg.seed, 0, "spos"),
                            log=search.log, fits=fits, best_within=best_within)


def _gather(search, selection) -> list[dict]:
    """Every rank's selection, alphas, last sample and weight sum (they must agree)."""
    gathered = D.all_gather_object(
        {
            "selection": selection,
            "alphas": {n: a.detach().cpu().tolist() for n, a in search.sampler.alphas.items()},
            "last_arch_sample": getattr(search, "_last_sample", None),
            "weights_sum": float(
                sum(p.detach().double().sum() for p in search.model.parameters())
            ),
        },
        search.dist,
    )
    if any(g["selection"] != gathered[0]["selection"] for g in gathered):
        raise SearchError(
            f"ranks derived different architectures: {[g['selection'] for g in gathered]}"
        )
    return gathered


def finish(search) -> dict:
    """Save the final checkpoint, select and report (see the module docstring)."""
    cfg, space, sampler = search.cfg, search.space, search.sampler
    search.save(search.total)
    from .budget import BudgetError, costs_of

    try:
        selection, history = sampler.select(_selection_context(search))
    except BudgetError as e:
        raise SearchError(f"budget: {e}") from None
    selection = space.check_selection(selection)
    race_rec = None
    if cfg.select == "race":
        from .race import race

        selection, race_rec = race(search, selection)
        selection = space.check_selection(selection)
    budget = getattr(search, "budget", None)
    if budget and not search.fits(selection):  # never report an architecture over budget
        raise SearchError(f"budget: the selected architecture {selection} does not fit "
                          f"{budget.to_dict()} (a bug: please report it)")
    gathered = _gather(search, selection)

    sup = search.evaluate_selection(selection)
    plain = space.extract(search.model, selection).to(search.device)
    with precision_context(cfg.precision, search.device):
        plain_metrics = space.evaluate(eval_model(plain, search.compiler), search.eval_set)
    result: dict[str, Any] = {
        "space": space.name,
        "space_config": space.config(),
        "data": getattr(search.data, "name", ""),
        "data_fingerprint": search.data_fingerprint,
        "sampler": cfg.sampler,
        "optimizer": cfg.sampler,  # the old key, for readers of older arch.json files
        "steps": search.total,
        "arch": selection,
        "arch_str": space.describe(selection),
        "val": plain_metrics,
        "val_supernet": sup,
        "params": space.param_count(plain),
        "params_supernet": space.param_count(search.model),
        "alphas": {n: a.detach().cpu().tolist() for n, a in sampler.alphas.items()},
        "probs": {n: p.tolist() for n, p in sampler.probs().items()},
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "world_size": search.dist.world_size,
        **search.meta,
    }
    if search.dist.enabled:
        result["distributed"] = {
            "world_size": search.dist.world_size,
            "rank_archs": [g["selection"] for g in gathered],
            "rank_alphas": [g["alphas"] for g in gathered],
            # the last architecture-step sample (noise drawn per rank from (seed, step))
            "rank_last_arch_sample": [g["last_arch_sample"] for g in gathered],
            "rank_weights_sum": [g["weights_sum"] for g in gathered],
            "ranks_agree": all(g == gathered[0] for g in gathered),
        }
    if budget:
        costs = costs_of(search.cost_model, selection, list(budget.limits))
        result["budget"] = budget.to_dict()
        result["costs"] = costs
        result["budget_margin"] = budget.margins(costs)
        if search.lagrangian is not None:
            result["budget_multipliers"] = search.lagrangian.state_dict()
        if search.cost_model.has_latency:  # how the table was made and its check
            result["latency_table"] = dict(search.cost_model.latency_info)
    if history is not None:
        result["spos_history"] = history
    result["decided"] = sampler.decision(history, cfg)
    if race_rec is not None:
        result["race"] = {k: v for k, v in race_rec.items() if k != "scratch"}
    if race_rec is not None and cfg.retrain_steps in (0, race_rec["steps"]):
        if cfg.retrain_steps:  # the winner was trained with the retraining's budget
            result["scratch"] = race_rec["scratch"]
    elif cfg.retrain_steps > 0 and search.dist.is_main:
        search.log(f"training the derived architecture from scratch ({cfg.retrain_steps} steps)")
        result["scratch"] = train_from_scratch(
            space,
            search.data,
            selection,
            cfg,
            steps=cfg.retrain_steps,
            device=search.device,
            progress=search.progress and search.dist.is_main,
            eval_set=search.eval_set,
            compile=search.compiler,
        )
    if search.compiler is not None:
        result["compile"] = search.compiler.summary()
        search.log(compile_line(result["compile"]))
    if search.dist.is_main:
        _write_outputs(search, result, selection, plain_metrics)
    return result


def _write_outputs(search, result: dict, selection, plain_metrics) -> None:
    write_json(search.arch_path, result)
    search.runlog.record(
        {
            "kind": "final",
            "step": search.total,
            "arch": selection,
            "val": plain_metrics,
            **({"scratch_val": result["scratch"]["val"]} if "scratch" in result else {}),
        }
    )
    from . import plot

    if search.sampler.trains_arch:
        ok = plot.plot_alphas(
            search.metrics_path,
            search.plot_path,
            search.space.choices,
            title=f"{search.space.name} / {search.cfg.sampler}",
        )
        if not ok and not plot.have_matplotlib():
            search.log("matplotlib is not installed: skipping alphas.png (pip install matplotlib)")
        result["plot"] = search.plot_path if ok else None


def train_from_scratch(
    space,
    data,
    selection: Mapping[str, Any],
    cfg: SearchConfig,
    *,
    steps: int,
    device: str | torch.device = "cpu",
    progress: bool = False,
    eval_set: list | None = None,
    seed: int | None = None,
    compile: Any = False,
) -> dict:
    """Train a freshly initialised plain model of ``selection`` (``space.build_plain``)
    for ``steps`` steps on the train split (same optimizer family and schedule as the
    search's weights); returns its validation metrics, parameter count and the last
    train loss. ``compile``: as :class:`Search`'s (or its :class:`Compiler`)."""
    if steps < 1:
        raise SearchError(f"retrain steps={steps}: must be >= 1")
    device = torch.device(device)
    compiler = make_compiler(compile, device)
    seed = cfg.seed if seed is None else seed
    selection = space.check_selection(selection)
    torch.manual_seed(derive_seed(seed, 0, "scratch-init"))
    model = space.build_plain(selection, data).to(device)
    opt = make_w_optimizer(model.parameters(), cfg)
    if eval_set is None:
        eval_set = eval_batches(data, cfg, device)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=steps, desc="from scratch", disable=not progress, dynamic_ncols=True, unit="step"
    )
    model.train()
    last = float("nan")
    t0 = time.perf_counter()
    with precision_context(cfg.precision, device):
        for step in range(steps):
            lr = cosine_lr(step, steps, cfg.lr, cfg.lr_min)
            for grp in opt.param_groups:
                grp["lr"] = lr
            torch.manual_seed(derive_seed(seed, step, "scratch-global"))
            g = generator(derive_seed(seed, step, "scratch-train"))
            batch = data.batch("train", cfg.batch_size, g, device)
            opt.zero_grad(set_to_none=True)
            loss = space.loss(model, batch) if compiler is None else compiler.loss(space.loss, model, batch)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            last = float(loss.detach())
            bar.set_postfix_str(f"loss {last:.3f}", refresh=False)
            bar.update(1)
        bar.close()
        metrics = space.evaluate(eval_model(model, compiler), eval_set)
    out = {
        "steps": steps,
        "val": metrics,
        "train_loss": last,
        "params": space.param_count(model),
        "time_s": round(time.perf_counter() - t0, 2),
    }
    if compiler is not None:
        out["compile"] = compiler.summary()
    return out

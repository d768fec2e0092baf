"""SPOS (Guo et al. 2020): uniform one-hot paths, then a search over the trained supernet."""

from __future__ import annotations

import math

import torch

from ...nn.arch import HardArch
from ..budget import BudgetError
from ..evolution import evolution, random_search
from .base import Option, Sampler, SelectionContext


class SPOSSampler(Sampler):
    """SPOS: each choice uniformly at random, one-hot, no architecture gradient. The
    architecture is selected afterwards by random search or evolution over the trained
    supernet (``tangle_kernels.search.evolution``)."""

    name = "spos"
    summary = "uniform one-hot paths, then evolution or random search (SPOS)"
    order = 4
    trains_arch = False
    hard = True
    options = (
        Option("spos_search", str, "evolution", "SPOS: how to select the architecture after "
               "training", flag="--spos-search", choices=("evolution", "random"),
               resume_free=True),
        Option("spos_budget", int, 50, "SPOS: number of architectures scored",
               flag="--spos-budget", check="at_least_1", resume_free=True),
        Option("spos_population", int, 10, "SPOS: evolution population", check="at_least_1",
               resume_free=True),
        Option("spos_eval_batches", int, 4, "SPOS: validation batches per score",
               check="at_least_1", resume_free=True),
    )

    def __init__(self, choices, **kw):
        kw["init_scale"] = 0.0
        super().__init__(choices, **kw)

    def sample(self, generator=None, step=0):
        weights, index = {}, {}
        for n, a in self.alphas.items():
            i = int(torch.randint(a.shape[0], (1,), generator=generator, device=a.device))
            w = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
            w[i] = 1.0
            weights[n], index[n] = w, i
        return HardArch(weights, index)

    def probs(self):
        return {n: torch.full_like(a.detach(), 1.0 / a.shape[0]) for n, a in self.alphas.items()}

    def select(self, ctx: SelectionContext):
        cfg = ctx.cfg
        fn = evolution if cfg.spos_search == "evolution" else random_search
        kw = {"population": cfg.spos_population} if fn is evolution else {}
        if fn is evolution and ctx.best_within is not None:  # one architecture known to fit
            uniform = {n: [1.0] * len(v) for n, v in self.choices.items()}
            kw["initial"] = [ctx.best_within(uniform)]
        ctx.log(f"SPOS: {cfg.spos_search} over the trained supernet ({cfg.spos_budget} evaluations)")
        # under a budget only the architectures that fit are scored: none of the
        # evaluations is spent on one that could not be chosen
        selection, best, hist = fn(
            self.choices,
            lambda sel: ctx.score(sel, cfg.spos_eval_batches),
            budget=cfg.spos_budget,
            seed=ctx.seed,
            fits=ctx.fits,
            **kw,
        )
        if selection is None:
            raise BudgetError(f"SPOS: no architecture that fits the budget was found among "
                              "the ones it drew (loosen the budget, or raise --spos-budget)")
        if not math.isfinite(float(best)):
            from ..config import SearchError  # (config imports the samplers)

            raise SearchError(f"SPOS: every one of the {len(hist)} architectures scored had a "
                              "non-finite supernet validation loss (the supernet diverged: "
                              "lower --lr, or check the data)")
        return selection, [{"arch": s, "score": v} for s, v in hist if math.isfinite(v)]

    def decision(self, history, cfg):
        """The supernet scores of the best and runner-up selections."""
        scores = sorted(float(h["score"]) for h in (history or []))
        return {
            "spos": {
                "search": cfg.spos_search,
                "scored": len(scores),
                "best": scores[0] if scores else None,
                "runner_up": scores[1] if len(scores) > 1 else None,
                "median": scores[len(scores) // 2] if scores else None,
            }
        }

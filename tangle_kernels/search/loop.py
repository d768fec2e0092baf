"""The bilevel search loop: supernet weights on the train split, architecture on val.

One step of :class:`Search` (first order, as DARTS' first-order variant, DrNAS, GDAS):

1. architecture step (skipped when the sampler trains no architecture, SPOS, and during
   ``warmup_steps``): draw an arch ``a = sampler.sample(noise)`` (differentiable in the
   alphas), ``L_val(w, a)`` on a validation batch, back-propagate into the alphas only
   (``backward(inputs=alphas)``: no weight gradients are computed), average the alpha
   gradients over DDP ranks, Adam step on the alphas;
2. weight step: a fresh arch sample (detached), ``L_train(w, a)`` on a train batch
   through the DDP wrapper (its gradient all-reduce), gradient clipping, an SGD or AdamW
   step on the weights with a cosine learning-rate schedule. ``sandwich`` (one-hot
   samplers): the same batch also through the sample with its sizes at their largest
   (and smallest), the gradients averaged (BigNAS's sandwich rule).

``unrolled=True`` (samplers with ``supports_unrolled``: DARTS, sparsemax) replaces step 1
by the second-order DARTS approximation (:func:`~.unrolled.unrolled_arch_grad`).

Divergence: a non-finite loss, gradient norm or architecture parameter stops the run
with one line (:class:`SearchDiverged`); nothing is derived from it and the last
checkpoint on disk (written before it) stays.

Determinism: every random draw of step ``s`` comes from generators seeded with
``derive_seed(seed, s, stream, rank)`` (data batches: per rank; architecture noise: the
same on every rank; the global torch RNG, used by dropout, reseeded per step), so a run
resumed from a checkpoint (model, optimizers, alphas, step) repeats, bit for bit on CPU,
what the uninterrupted run computes.

Outputs in ``out``: ``metrics.jsonl`` (one record per step, ``kind = train``; periodic
``eval`` records; a ``final`` record), ``checkpoint.pt`` (every ``checkpoint_every``
steps, at the end, and on Ctrl-C), ``arch.json`` and ``alphas.png`` (``report.py``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..nn.arch import HardArch, end_index, is_sized
from ..nn.base import set_arch
from ..nn.latency import attach, table_of
from . import distributed as D
from . import report
from .checkpoint import (
    CheckpointError,
    check_resume,
    data_fingerprint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .budget import fits as budget_fits
from .budget import setup as budget_setup
from .common import (
    cosine_lr,
    derive_seed,
    detach_arch,
    eval_batches,
    generator,
    make_w_optimizer,
    precision_context,
)
from .compiled import make_compiler
from .config import SearchConfig, SearchError
from .rundir import RunDir
from .runlog import RunLog
from .samplers import Sampler, sampler_from_config
from .unrolled import unrolled_arch_grad

__all__ = ["Search", "SearchDiverged", "run_search", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "tangle-search/1"


class SearchDiverged(SearchError):
    """A non-finite loss, gradient or architecture parameter stopped the run."""


class Search:
    """One search run (see the module docstring). ``run()`` returns the summary that is
    also written to ``arch.json``.

    Args:
        space: a :class:`~tangle_kernels.spaces.base.SearchSpace`.
        data: its :class:`~tangle_kernels.spaces.base.DataSource`.
        cfg: the :class:`SearchConfig`.
        out: output folder (created; the run holds a lock on it, ``rundir.py``).
        device: torch device (``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun).
        resume: continue from ``out/checkpoint.pt``.
        overwrite: start a new run even where one lives in ``out``.
        resume_other_data: resume on data other than the checkpoint's.
        progress: show a tqdm progress bar (rank 0).
        on_step: called as ``on_step(search, step)`` after each completed step.
        log: where rank 0's messages go (default: print / tqdm.write).
        meta: extra JSON-able entries for ``arch.json`` (the CLI stores its arguments).
        compile: run forward + loss under torch.compile (``compiled.py``).
    """

    def __init__(self, space, data, cfg: SearchConfig, *, out: str,
                 device: str | torch.device = "cpu", resume: bool = False,
                 overwrite: bool = False, resume_other_data: bool = False,
                 progress: bool = True, on_step: Callable[[Search, int], None] | None = None,
                 log: Callable[[str], None] | None = None, meta: Mapping[str, Any] | None = None,
                 compile: bool | str = False):
        cfg.check()
        self.space, self.data, self.cfg = space, data, cfg
        self.out = os.fspath(out)
        self.resume, self.overwrite, self.resume_other_data = resume, overwrite, resume_other_data
        self.progress = progress
        self.on_step = on_step
        self.meta = dict(meta or {})
        self.dist, self.device = D.init_from_env(device)
        self.ckpt_path = os.path.join(self.out, "checkpoint.pt")
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.arch_path = os.path.join(self.out, "arch.json")
        self.plot_path = os.path.join(self.out, "alphas.png")
        self.runlog = RunLog(self.metrics_path, main=self.dist.is_main, log=log)
        self.rundir = RunDir(self.out)
        # --compile is not part of the config (checkpoints are the same with or without it)
        self.compiler = make_compiler(compile, self.device, log=self.log)
        self._stop = False
        self.step = 0
        self._ready = False
        self.saved_step: int | None = None

    def log(self, msg: str) -> None:
        self.runlog.message(msg)

    def _record(self, rec: dict) -> None:
        self.runlog.record(rec)

    # ------------------------------------------------------------------- setup
    def total_steps(self) -> int:
        cfg = self.cfg
        if cfg.epochs is None:
            return cfg.steps
        n = self.data.split_size("train")
        return max(1, math.ceil(cfg.epochs * n / (cfg.batch_size * self.dist.world_size)))

    def setup(self) -> None:
        """Take the output folder, build the supernet, sampler and optimizers (and load
        the checkpoint with ``resume``); :meth:`run` calls it when it has not been called."""
        if self._ready:
            return
        cfg, dev = self.cfg, self.device
        if self.resume and not os.path.exists(self.ckpt_path):
            raise SearchError(f"--resume: no checkpoint in {self.out} (expected {self.ckpt_path})")
        if cfg.sandwich != "none" and not any(is_sized(v) for v in self.space.choices.values()):
            raise SearchError(f"sandwich={cfg.sandwich}: space {self.space.name!r} has no sized "
                              "choice (all numbers), so its largest and smallest architectures "
                              "are the sampled one: the step would train it twice; use "
                              "sandwich=none")
        if self.dist.is_main:
            self.rundir.acquire(resume=self.resume, overwrite=self.overwrite)
        self._ready = True
        self.total = self.total_steps()
        self.data_fingerprint = data_fingerprint(self.data)
        torch.manual_seed(derive_seed(cfg.seed, 0, "init"))
        self.model = self.space.build_supernet(self.data).to(dev)
        self.sampler: Sampler = sampler_from_config(
            cfg, self.space.choices, init_scale=cfg.arch_init_scale,
            generator=generator(derive_seed(cfg.seed, 0, "alpha")), device=dev,
            total_steps=self.total,
        )
        self._setup_budget()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise SearchError(f"space {self.space.name!r}: the supernet has no trainable weights")
        self.w_opt = make_w_optimizer(params, cfg)
        self.a_opt = (
            torch.optim.Adam(self.sampler.parameters(), lr=cfg.arch_lr,
                             betas=tuple(cfg.arch_betas), weight_decay=cfg.arch_weight_decay)
            if self.sampler.trains_arch else None
        )
        self.start = 0
        if self.resume:
            self._load()
        else:
            self.runlog.start()
        self.eval_set = eval_batches(self.data, cfg, dev)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.model, device_ids=[dev] if dev.type == "cuda" else None,
                           find_unused_parameters=self.sampler.find_unused())
        else:
            self.ddp = self.model

    def _setup_budget(self) -> None:
        """``--max-params`` / ``--max-macs`` (``budget.setup``)."""
        self.budget, self.cost_model, self.lagrangian = budget_setup(self)

    def fits(self, selection: Mapping[str, Any]) -> bool:
        """Whether ``selection`` is within the budget (True without one)."""
        return budget_fits(self, selection)

    # -------------------------------------------------------------- checkpoints
    def _state(self, step: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "total_steps": self.total,
            "config": self.cfg.to_dict(),
            "space": self.space.config(),
            "data": getattr(self.data, "name", ""),
            "data_fingerprint": self.data_fingerprint,
            "world_size": self.dist.world_size,
            "model": self.model.state_dict(),
            "w_opt": self.w_opt.state_dict(),
            "a_opt": self.a_opt.state_dict() if self.a_opt is not None else None,
            "alphas": self.sampler.state_dict(),
            "budget": self.lagrangian.state_dict() if self.lagrangian is not None else None,
            # the measured latency table (a resumed run prices as the interrupted one did)
            "latency_table": (json.dumps(table_of(self.cost_model))
                              if self.cost_model is not None and self.cost_model.has_latency
                              else None),
            "rng": rng_state(self.device),
            "torch": str(torch.__version__),
        }

    def save(self, step: int) -> None:
        """Atomic checkpoint of the state after ``step`` completed steps (rank 0)."""
        if self.dist.is_main:
            save_checkpoint(self._state(step), self.ckpt_path)
        self.saved_step = step

    def _load(self) -> None:
        try:
            ck = load_checkpoint(self.ckpt_path, map_location=self.device)
            check_resume(ck, self.ckpt_path, fmt=CHECKPOINT_FORMAT,
                         space_config=self.space.config(), cfg=self.cfg, total=self.total,
                         world_size=self.dist.world_size, fingerprint=self.data_fingerprint,
                         other_data=self.resume_other_data)
        except CheckpointError as e:
            raise SearchError(str(e)) from None
        try:
            self.model.load_state_dict(ck["model"])
            self.w_opt.load_state_dict(ck["w_opt"])
            if self.a_opt is not None and ck.get("a_opt") is not None:
                self.a_opt.load_state_dict(ck["a_opt"])
            self.sampler.load_state_dict(ck["alphas"])
            if self.lagrangian is not None and ck.get("budget") is not None:
                self.lagrangian.load_state_dict(ck["budget"])
            if ck.get("latency_table") and self.cost_model is not None and \
                    self.cost_model.has_latency:
                attach(self.cost_model, json.loads(ck["latency_table"]))
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SearchError(
                f"--resume: {self.ckpt_path} does not fit this run's supernet (other data, "
                f"e.g. another alphabet, or another space build): {first}"
            ) from None
        set_rng_state(ck["rng"], self.device)
        self.start = int(ck["step"])
        self.saved_step = self.start
        self.runlog.truncate(self.start)
        self.log(f"resumed from {self.ckpt_path} at step {self.start}/{self.total}")

    # --------------------------------------------------------------------- step
    def _batch(self, split: str, step: int):
        g = generator(derive_seed(self.cfg.seed, step, split, self.dist.rank))
        return self.data.batch(split, self.cfg.batch_size, g, self.device)

    def train_step(self, step: int) -> dict:
        """One search step (arch step, then weight step) in ``cfg.precision``."""
        with precision_context(self.cfg.precision, self.device):
            return self._train_step(step)

    def _train_step(self, step: int) -> dict:
        cfg = self.cfg
        lr = cosine_lr(step, self.total, cfg.lr, cfg.lr_min)
        for grp in self.w_opt.param_groups:
            grp["lr"] = lr
        noise = generator(derive_seed(cfg.seed, step, "arch"), self.device)
        torch.manual_seed(derive_seed(cfg.seed, step, "global", self.dist.rank))
        train_batch = self._batch("train", step)
        rec: dict = {"kind": "train", "step": step, "lr": lr}

        # 1. architecture step (validation split)
        if self.a_opt is not None and step >= cfg.warmup_steps:
            val_batch = self._batch("val", step)
            alphas = self.sampler.parameters()
            self.a_opt.zero_grad(set_to_none=True)
            if cfg.unrolled:
                lv, grads = unrolled_arch_grad(
                    self.model, self._loss, alphas, lambda: self.sampler.sample(noise, step),
                    train_batch, val_batch, xi=lr, weight_decay=cfg.weight_decay,
                )
                for a, g in zip(alphas, grads):
                    a.grad = g
            else:
                arch = self.sampler.sample(noise, step)
                self._last_sample = {n: v.detach().cpu().tolist() for n, v in arch.items()}
                set_arch(self.model, self.sampler.for_arch_step(arch))
                lv = self._loss(self.model, val_batch, weight_grads=False)
                obj = lv if self.lagrangian is None else lv + self.lagrangian.term(arch)
                obj.backward(inputs=alphas)
            set_arch(self.model, None)
            if cfg.unrolled and self.lagrangian is not None:  # the budget's term, a new sample
                self.lagrangian.term(self.sampler.sample(noise, step)).backward(inputs=alphas)
            D.average_grads(alphas, self.dist)
            self.a_opt.step()
            rec["arch_loss"] = float(lv.detach())
            if self.lagrangian is not None:
                rec.update(self.lagrangian.update(self.sampler.probs()))

        # 2. weight step (train split); with a sandwich, the same batch through the
        # sampled architecture at its extremes too, the gradients averaged
        sampled = detach_arch(self.sampler.sample(noise, step))
        archs = [sampled] + [sandwich_arch(sampled, self.sampler.choices, end)
                             for end in SANDWICH_ENDS[cfg.sandwich]]
        self.w_opt.zero_grad(set_to_none=True)
        for j, arch in enumerate(archs):
            set_arch(self.model, arch)
            lj = self._loss(self.ddp, train_batch)
            (lj / len(archs)).backward()
            if j == 0:
                loss = lj
            else:
                rec[f"train_loss_{SANDWICH_ENDS[cfg.sandwich][j - 1]}"] = float(lj.detach())
        set_arch(self.model, None)
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        else:
            gs = [p.grad for p in self.model.parameters() if p.grad is not None]
            gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs])) \
                if gs else torch.zeros(())
        self.w_opt.step()
        rec["train_loss"] = float(loss.detach())
        rec["_grad_norm"] = float(gnorm)
        rec.update(self.sampler.extra_metrics(step))
        return rec

    def _divergence(self, rec: dict) -> str | None:
        """What is not finite after a step, in one clause (None: all finite)."""
        for k, what in (("train_loss", "training loss"), ("arch_loss", "architecture loss"),
                        ("_grad_norm", "weight gradient norm")):
            if k in rec and not math.isfinite(rec[k]):
                return f"{what} {rec[k]}"
        bad = [n for n, a in self.sampler.alphas.items() if not bool(torch.isfinite(a).all())]
        if bad:
            return f"architecture parameters of {', '.join(bad)}"
        return None

    def evaluate_selection(self, selection: Mapping[str, Any], batches=None) -> dict:
        """Metrics of the supernet under the one-hot ``selection`` (inherited weights)."""
        return report.evaluate_selection(self, selection, batches)

    def _loss(self, model, batch, weight_grads: bool = True) -> torch.Tensor:
        """``space.loss(model, batch)``, compiled with ``compile``."""
        if self.compiler is None:
            return self.space.loss(model, batch)
        return self.compiler.loss(self.space.loss, model, batch, weight_grads=weight_grads)

    # --------------------------------------------------------------------- run
    def _on_sigint(self, signum, frame):  # pragma: no cover - exercised via os.kill in tests
        if self._stop:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop = True
        self.log("\ninterrupt: finishing the current step and writing a checkpoint "
                 "(Ctrl-C again to stop at once)")

    def request_stop(self) -> None:
        """Stop after the current step, writing a checkpoint (what Ctrl-C does)."""
        self._stop = True

    def run(self) -> dict:
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self.setup()
            self._loop()
            return self.finish()
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            if self.runlog.bar is not None:
                self.runlog.bar.close()
                self.runlog.bar = None
            self.rundir.release()

    def _loop(self) -> None:
        cfg = self.cfg
        from tqdm.auto import tqdm

        bar = self.runlog.bar = tqdm(
            total=self.total, initial=self.start, desc=f"search {self.space.name}/{cfg.sampler}",
            disable=not (self.progress and self.dist.is_main), dynamic_ncols=True, unit="step",
        )
        t0 = time.perf_counter()
        self.model.train()
        for step in range(self.start, self.total):
            self.step = step
            rec = self.train_step(step)
            problem = self._divergence(rec)
            if D.any_flag(problem is not None, self.dist, self.device):
                self._diverged(step, problem)
            del rec["_grad_norm"]
            sel = self.sampler.derive()
            if step % cfg.log_every == 0 or step == self.total - 1:
                rec["probs"] = {n: p.tolist() for n, p in self.sampler.probs().items()}
                rec["arch"] = sel
                rec["time"] = round(time.perf_counter() - t0, 3)
                self._record(rec)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < self.total:
                m = self.evaluate_selection(sel)
                self._record({"kind": "eval", "step": step, "arch": sel,
                              **{f"val_{k}": v for k, v in m.items()}})
                self.model.train()
            bar.set_postfix_str(f"loss {rec['train_loss']:.3f} | {self.space.describe(sel)}",
                                refresh=False)
            bar.update(1)
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < self.total:
                self.save(done)
            if self.on_step is not None:
                self.on_step(self, step)
            if D.any_flag(self._stop, self.dist, self.device):
                self.save(done)
                self.log(f"stopped at step {done}/{self.total}; checkpoint written to "
                         f"{self.ckpt_path} (continue with --resume)")
                raise KeyboardInterrupt
        self.step = self.total

    def _diverged(self, step: int, problem: str | None) -> None:
        kept = (f"the last good checkpoint is {self.ckpt_path} (step {self.saved_step})"
                if self.saved_step is not None else "no checkpoint was written before it")
        raise SearchDiverged(
            f"the search diverged at step {step}: non-finite {problem or 'values on another rank'}"
            f"; no architecture derived; {kept} (lower --lr / --arch-lr)"
        )

    def finish(self) -> dict:
        """Final checkpoint, selection and report (``report.finish``)."""
        return report.finish(self)

    def _decision(self, history) -> dict:
        return self.sampler.decision(history, self.cfg)


#: the extra architectures of each ``sandwich`` setting's weight step
SANDWICH_ENDS = {"none": (), "max": ("max",), "max-min": ("max", "min")}


def sandwich_arch(arch: Mapping[str, torch.Tensor], choices: Mapping[str, list],
                  end: str) -> HardArch:
    """The one-hot ``arch`` with every sized choice (``nn.arch.is_sized``) at its largest
    (``end="max"``) or smallest (``"min"``) value; another choice keeps its sampled one."""
    weights, index = {}, {}
    for n, v in arch.items():
        i = end_index(choices[n], end)
        if i is None:
            i = int(torch.argmax(v))
        w = torch.zeros_like(v)
        w[i] = 1.0
        weights[n], index[n] = w, i
    return HardArch(weights, index)


def run_search(space, data, cfg: SearchConfig, **kw) -> dict:
    """``Search(space, data, cfg, **kw).run()``."""
    return Search(space, data, cfg, **kw).run()

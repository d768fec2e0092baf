"""The bilevel search loop: supernet weights on the train split, architecture on val.

One step of :class:`Search` (first order, as DARTS' first-order variant, DrNAS, GDAS):

1. architecture step (skipped for SPOS and during ``warmup_steps``): draw an arch
   ``a = sampler.sample(noise)`` (differentiable in the alphas), ``L_val(w, a)`` on a
   validation batch, back-propagate into the alphas only
   (``backward(inputs=alphas)``: no weight gradients are computed), average the alpha
   gradients over DDP ranks, Adam step on the alphas;
2. weight step: a fresh arch sample (detached), ``L_train(w, a)`` on a train batch
   through the DDP wrapper (its gradient all-reduce), gradient clipping, an SGD or AdamW
   step on the weights with a cosine learning-rate schedule.

``unrolled=True`` (DARTS, sparsemax) replaces step 1 by the second-order DARTS
approximation (:func:`unrolled_arch_grad`): the gradient of ``L_val(w', a)`` with
``w' = w - xi * dL_train/dw`` (one virtual SGD step), its Hessian-vector term estimated
by finite differences.

Determinism: every random draw of step ``s`` comes from generators seeded with
``derive_seed(seed, s, stream, rank)`` (data batches: per rank; architecture noise: the
same on every rank; the global torch RNG, used by dropout, reseeded per step), so a run
resumed from a checkpoint (model, optimizers, alphas, step) repeats, bit for bit on CPU,
what the uninterrupted run computes.

Outputs in ``out``: ``metrics.jsonl`` (one record per step, ``kind = train``; periodic
``eval`` records; a ``final`` record), ``checkpoint.pt`` (every ``checkpoint_every``
steps, at the end, and on Ctrl-C), ``arch.json`` (the derived architecture, its metrics
and the final architecture parameters under ``alphas``) and ``alphas.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..nn.arch import HardArch
from ..nn.base import set_arch
from . import distributed as D
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .compiled import make_compiler
from .evolution import evolution, random_search
from .samplers import SAMPLERS, Sampler, decision_report, make_sampler

__all__ = [
    "SearchConfig",
    "SearchError",
    "Search",
    "run_search",
    "derive_seed",
    "detach_arch",
    "unrolled_arch_grad",
    "train_from_scratch",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "tangle-search/1"


class SearchError(ValueError):
    """A search that cannot run as configured; the CLI prints the message, exits 2."""


@dataclass
class SearchConfig:
    """Everything that determines a search run (saved in checkpoints and arch.json)."""

    optimizer: str = "drnas"  #: sampler: darts, sparsemax, drnas, gdas, spos
    steps: int = 200  #: search steps (one arch step + one weight step each)
    epochs: float | None = None  #: if set, steps = ceil(epochs * train size / global batch)
    batch_size: int = 32  #: per rank
    eval_batch_size: int | None = None  #: default: batch_size
    eval_batches: int = 8  #: fixed validation batches for evaluation
    eval_every: int = 0  #: evaluate the derived arch every N steps (0: at the end only)
    w_optimizer: str = "adamw"  #: adamw | sgd (weights)
    lr: float = 1e-3
    lr_min: float = 0.0  #: cosine schedule from lr to lr_min
    momentum: float = 0.9  #: SGD only
    weight_decay: float = 0.0
    grad_clip: float = 5.0  #: max grad norm of the weights (0: off)
    arch_lr: float = 3e-4  #: Adam on the alphas (DARTS: 3e-4, betas (0.5, 0.999), wd 1e-3)
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    arch_init_scale: float = 1e-3  #: alphas start at init_scale * N(0, 1)
    warmup_steps: int = 0  #: weight-only steps before the alphas start to move
    #: DrNAS: Dirichlet concentration = drnas_concentration * (elu(alpha) + 1) (paper: 1);
    #: larger = less sampling noise around the same mean
    drnas_concentration: float = 1.0
    unrolled: bool = False  #: second-order DARTS (darts, sparsemax only)
    tau_max: float = 10.0  #: GDAS temperature, annealed linearly ...
    tau_min: float = 0.1  #: ... to tau_min at the last step
    spos_search: str = "evolution"  #: SPOS stage 2: evolution | random
    spos_budget: int = 50  #: selections scored in stage 2
    spos_population: int = 10
    spos_eval_batches: int = 4
    retrain_steps: int = 0  #: train the derived arch from scratch for N steps (0: skip)
    seed: int = 0
    checkpoint_every: int = 100  #: steps between checkpoints (0: only at the end / Ctrl-C)
    log_every: int = 1  #: steps between metrics.jsonl records
    #: fp32 | tf32 (float32 weights, CUDA matmuls/convolutions on TF32 tensor cores)
    #: | bf16 (autocast forward in bfloat16; weights, grads and optimizer states float32)
    precision: str = "fp32"

    # Fields that may differ between a checkpoint and the run that resumes it.
    _RESUME_FREE = (
        "checkpoint_every",
        "eval_every",
        "log_every",
        "retrain_steps",
        "eval_batches",
        "eval_batch_size",
        "spos_search",
        "spos_budget",
        "spos_population",
        "spos_eval_batches",
        "epochs",
        "precision",
    )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["arch_betas"] = list(self.arch_betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "arch_betas" in kw:
            kw["arch_betas"] = tuple(kw["arch_betas"])
        return cls(**kw)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def check(self) -> None:
        """:class:`SearchError` naming the first bad field."""
        if self.optimizer not in SAMPLERS:
            raise SearchError(
                f"--optimizer {self.optimizer!r}: choose one of {', '.join(SAMPLERS)}"
            )
        if self.epochs is None and self.steps < 1:
            raise SearchError(f"--steps {self.steps}: must be >= 1")
        if self.epochs is not None and not self.epochs > 0:
            raise SearchError(f"--epochs {self.epochs}: must be > 0")
        for n in (
            "batch_size",
            "eval_batches",
            "spos_budget",
            "spos_population",
            "spos_eval_batches",
        ):
            if getattr(self, n) < 1:
                raise SearchError(f"{n}={getattr(self, n)}: must be >= 1")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise SearchError(f"eval_batch_size={self.eval_batch_size}: must be >= 1")
        for n in ("checkpoint_every", "eval_every", "warmup_steps", "retrain_steps"):
            if getattr(self, n) < 0:
                raise SearchError(f"{n}={getattr(self, n)}: must be >= 0")
        if self.log_every < 1:
            raise SearchError(f"log_every={self.log_every}: must be >= 1")
        if self.precision not in PRECISIONS:
            raise SearchError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.w_optimizer not in ("adamw", "sgd"):
            raise SearchError(f"w_optimizer={self.w_optimizer!r}: choose adamw or sgd")
        for n in ("lr", "arch_lr"):
            if not getattr(self, n) > 0:
                raise SearchError(f"{n}={getattr(self, n)}: must be > 0")
        if self.lr_min < 0 or self.lr_min > self.lr:
            raise SearchError(f"lr_min={self.lr_min}: must be in [0, lr={self.lr}]")
        if not (self.tau_max > 0 and self.tau_min > 0):
            raise SearchError(f"tau_max={self.tau_max}, tau_min={self.tau_min}: must be > 0")
        if not self.drnas_concentration > 0:
            raise SearchError(f"drnas_concentration={self.drnas_concentration}: must be > 0")
        if self.unrolled and self.optimizer not in ("darts", "sparsemax"):
            raise SearchError(
                f"--unrolled is the second-order DARTS update; it needs --optimizer darts or "
                f"sparsemax (a deterministic relaxation), not {self.optimizer!r}"
            )
        if self.spos_search not in ("evolution", "random"):
            raise SearchError(f"spos_search={self.spos_search!r}: choose evolution or random")


# ----------------------------------------------------------------------------- helpers


def derive_seed(seed: int, step: int, stream: str, rank: int = 0) -> int:
    """A 63-bit seed for random stream ``stream`` at ``step`` on ``rank`` (BLAKE2b of the
    four values: independent streams, reproducible from (seed, step) alone)."""
    h = hashlib.blake2b(f"{seed}:{step}:{stream}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    device = torch.device(device)
    g = torch.Generator(device=device) if device.type == "cuda" else torch.Generator()
    g.manual_seed(seed)
    return g


def detach_arch(arch: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The same arch without gradient (a :class:`HardArch` stays one)."""
    w = {n: v.detach() for n, v in arch.items()}
    return HardArch(w, arch.index) if isinstance(arch, HardArch) else w


def cosine_lr(step: int, total: int, lr: float, lr_min: float) -> float:
    """``lr_min + (lr - lr_min) * (1 + cos(pi * step / total)) / 2``."""
    if total <= 1:
        return lr
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _make_w_optimizer(params, cfg: SearchConfig) -> torch.optim.Optimizer:
    if cfg.w_optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def unrolled_arch_grad(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    alphas: Sequence[torch.Tensor],
    sample_arch: Callable[[], Mapping[str, torch.Tensor]],
    train_batch,
    val_batch,
    xi: float,
    weight_decay: float = 0.0,
    r: float = 0.01,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Second-order DARTS architecture gradient (Liu et al. 2019, eq. 7-8).

    ``w' = w - xi * (dL_train(w, a)/dw + weight_decay * w)`` (a virtual SGD step), then

        d/da L_val(w', a)  ~=  dL_val(w', a)/da
                               - xi * (dL_train(w+, a)/da - dL_train(w-, a)/da) / (2 eps)

    with ``w+- = w +- eps * dL_val(w', a)/dw'``, ``eps = r / ||dL_val/dw'||``.
    ``sample_arch()`` returns the (deterministic, differentiable) arch for the current
    alphas. The model's weights are restored before returning. Returns
    ``(L_val(w', a), [gradient per alpha])``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    alphas = list(alphas)
    backup = [p.detach().clone() for p in params]
    try:
        set_arch(model, detach_arch(sample_arch()))
        lt = loss_fn(model, train_batch)
        g = torch.autograd.grad(lt, params, allow_unused=True)
        with torch.no_grad():
            for p, gi in zip(params, g):
                if gi is not None:
                    p.sub_(xi * (gi + weight_decay * p))
        set_arch(model, sample_arch())
        lv = loss_fn(model, val_batch)
        grads = torch.autograd.grad(lv, alphas + params, allow_unused=True)
        da = [
            gi if gi is not None else torch.zeros_like(a)
            for gi, a in zip(grads[: len(alphas)], alphas)
        ]
        dw = [
            gi if gi is not None else torch.zeros_like(p)
            for gi, p in zip(grads[len(alphas) :], params)
        ]
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in dw)) if dw else torch.tensor(0.0)
        eps = r / (float(norm) + 1e-12)

        def arch_grad_at(sign: float) -> list[torch.Tensor]:
            with torch.no_grad():
                for p, b, d in zip(params, backup, dw):
                    p.copy_(b).add_(d, alpha=sign * eps)
            set_arch(model, sample_arch())
            loss = loss_fn(model, train_batch)
            gs = torch.autograd.grad(loss, alphas, allow_unused=True)
            return [gi if gi is not None else torch.zeros_like(a) for gi, a in zip(gs, alphas)]

        gp = arch_grad_at(+1.0)
        gn = arch_grad_at(-1.0)
        out = [d - xi * (p_ - n_) / (2.0 * eps) for d, p_, n_ in zip(da, gp, gn)]
        return lv.detach(), out
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
        set_arch(model, None)


PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def precision_context(precision: str, device):
    """The numeric mode of the forward passes inside (see ``SearchConfig.precision``):
    ``tf32`` turns on TF32 for CUDA matmuls and cuDNN convolutions (restored on exit),
    ``bf16`` enters ``torch.autocast(device.type, dtype=torch.bfloat16)``."""
    device = torch.device(device)
    if precision == "fp32":
        yield
        return
    if precision == "tf32":
        prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
        return
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    raise SearchError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")


def _eval_batches(data, cfg: SearchConfig, device, n: int | None = None) -> list:
    g = _generator(derive_seed(cfg.seed, 0, "eval"))
    bs = cfg.eval_batch_size or cfg.batch_size
    return [data.batch("val", bs, g, device) for _ in range(n or cfg.eval_batches)]


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(obj), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ search


class Search:
    """One search run (see the module docstring). ``run()`` returns the summary that is
    also written to ``arch.json``.

    Args:
        space: a :class:`~tangle_kernels.spaces.base.SearchSpace`.
        data: its :class:`~tangle_kernels.spaces.base.DataSource`.
        cfg: the :class:`SearchConfig`.
        out: output folder (created).
        device: torch device (``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun).
        resume: continue from ``out/checkpoint.pt``.
        progress: show a tqdm progress bar (rank 0).
        on_step: called as ``on_step(search, step)`` after each completed step.
        log: where rank 0's messages go (default: print / tqdm.write).
        meta: extra JSON-able entries for ``arch.json`` (the CLI stores its arguments).
    """

    def __init__(
        self,
        space,
        data,
        cfg: SearchConfig,
        *,
        out: str,
        device: str | torch.device = "cpu",
        resume: bool = False,
        progress: bool = True,
        on_step: Callable[[Search, int], None] | None = None,
        log: Callable[[str], None] | None = None,
        meta: Mapping[str, Any] | None = None,
        compile: bool | str = False,
    ):
        cfg.check()
        self.space, self.data, self.cfg = space, data, cfg
        self.out = os.fspath(out)
        self.resume = resume
        self.progress = progress
        self.on_step = on_step
        self._log = log
        self.meta = dict(meta or {})
        self.dist, self.device = D.init_from_env(device)
        # --compile: forward + loss under torch.compile (search/compiled.py); not part of
        # the config (checkpoints and resume are the same with or without it)
        self.compiler = make_compiler(compile, self.device, log=self.log)
        self.ckpt_path = os.path.join(self.out, "checkpoint.pt")
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.arch_path = os.path.join(self.out, "arch.json")
        self.plot_path = os.path.join(self.out, "alphas.png")
        self._stop = False
        self._bar = None
        self.step = 0
        self._ready = False

    # ----------------------------------------------------------------- logging
    def log(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        if self._log is not None:
            self._log(msg)
        elif self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def _record(self, rec: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(rec)) + "\n")

    # ------------------------------------------------------------------- setup
    def total_steps(self) -> int:
        cfg = self.cfg
        if cfg.epochs is None:
            return cfg.steps
        n = self.data.split_size("train")
        return max(1, math.ceil(cfg.epochs * n / (cfg.batch_size * self.dist.world_size)))

    def setup(self) -> None:
        """Build the supernet, sampler and optimizers (and load the checkpoint with
        ``resume``); :meth:`run` calls it when it has not been called."""
        if self._ready:
            return
        self._ready = True
        cfg, dev = self.cfg, self.device
        if self.dist.is_main:
            os.makedirs(self.out, exist_ok=True)
        self.total = self.total_steps()
        torch.manual_seed(derive_seed(cfg.seed, 0, "init"))
        self.model = self.space.build_supernet(self.data).to(dev)
        self.sampler: Sampler = make_sampler(
            cfg.optimizer,
            self.space.choices,
            init_scale=cfg.arch_init_scale,
            generator=_generator(derive_seed(cfg.seed, 0, "alpha")),
            device=dev,
            tau_max=cfg.tau_max,
            tau_min=cfg.tau_min,
            total_steps=self.total,
            concentration_scale=cfg.drnas_concentration,
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise SearchError(f"space {self.space.name!r}: the supernet has no trainable weights")
        self.w_opt = _make_w_optimizer(params, cfg)
        self.a_opt = (
            torch.optim.Adam(
                self.sampler.parameters(),
                lr=cfg.arch_lr,
                betas=tuple(cfg.arch_betas),
                weight_decay=cfg.arch_weight_decay,
            )
            if self.sampler.trains_arch
            else None
        )
        self.start = 0
        if self.resume:
            self._load()
        elif self.dist.is_main:
            open(self.metrics_path, "w").close()
        self.eval_set = _eval_batches(self.data, cfg, dev)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            find_unused = self.sampler.hard or cfg.optimizer == "sparsemax"
            self.ddp = DDP(
                self.model,
                device_ids=[dev] if dev.type == "cuda" else None,
                find_unused_parameters=find_unused,
            )
        else:
            self.ddp = self.model

    def _state(self, step: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "total_steps": self.total,
            "config": self.cfg.to_dict(),
            "space": self.space.config(),
            "data": getattr(self.data, "name", ""),
            "world_size": self.dist.world_size,
            "model": self.model.state_dict(),
            "w_opt": self.w_opt.state_dict(),
            "a_opt": self.a_opt.state_dict() if self.a_opt is not None else None,
            "alphas": self.sampler.state_dict(),
            "rng": rng_state(self.device),
            "torch": str(torch.__version__),
        }

    def save(self, step: int) -> None:
        """Atomic checkpoint of the state after ``step`` completed steps (rank 0)."""
        if self.dist.is_main:
            save_checkpoint(self._state(step), self.ckpt_path)

    def _load(self) -> None:
        try:
            ck = load_checkpoint(self.ckpt_path, map_location=self.device)
        except CheckpointError as e:
            raise SearchError(str(e)) from None
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise SearchError(
                f"{self.ckpt_path}: format {ck.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
            )
        if ck["space"] != self.space.config():
            raise SearchError(
                f"--resume: {self.ckpt_path} is a search of space {ck['space']}, not of "
                f"{self.space.config()}; use another --out or drop --resume"
            )
        saved = SearchConfig.from_dict(ck["config"]).to_dict()
        now = self.cfg.to_dict()
        diff = [k for k in now if k not in SearchConfig._RESUME_FREE and saved.get(k) != now.get(k)]
        if ck.get("total_steps") != self.total and "steps" not in diff:
            diff.append("steps")
        if diff:
            pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
            raise SearchError(
                f"--resume: the checkpoint's settings differ ({pairs}); resume with the "
                f"original arguments or start a new --out"
            )
        if ck.get("world_size", 1) != self.dist.world_size:
            raise SearchError(
                f"--resume: the checkpoint was written by {ck.get('world_size')} process(es), "
                f"this run has {self.dist.world_size}; data sampling would differ"
            )
        self.model.load_state_dict(ck["model"])
        self.w_opt.load_state_dict(ck["w_opt"])
        if self.a_opt is not None and ck.get("a_opt") is not None:
            self.a_opt.load_state_dict(ck["a_opt"])
        self.sampler.load_state_dict(ck["alphas"])
        set_rng_state(ck["rng"], self.device)
        self.start = int(ck["step"])
        if self.dist.is_main:
            self._truncate_metrics(self.start)
        self.log(f"resumed from {self.ckpt_path} at step {self.start}/{self.total}")

    def _truncate_metrics(self, step: int) -> None:
        """Keep the records of steps < ``step`` (those the resumed run does not redo)."""
        keep = []
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if rec.get("kind") in ("train", "eval") and int(rec.get("step", 0)) < step:
                        keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.metrics_path)

    # --------------------------------------------------------------------- step
    def _batch(self, split: str, step: int):
        g = _generator(derive_seed(self.cfg.seed, step, split, self.dist.rank))
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
        noise = _generator(derive_seed(cfg.seed, step, "arch"), self.device)
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
                    self.model,
                    self._loss,
                    alphas,
                    lambda: self.sampler.sample(noise, step),
                    train_batch,
                    val_batch,
                    xi=lr,
                    weight_decay=cfg.weight_decay,
                )
                for a, g in zip(alphas, grads):
                    a.grad = g
            else:
                arch = self.sampler.sample(noise, step)
                self._last_sample = {n: v.detach().cpu().tolist() for n, v in arch.items()}
                set_arch(self.model, arch)
                lv = self._loss(self.model, val_batch, weight_grads=False)
                lv.backward(inputs=alphas)
            set_arch(self.model, None)
            D.average_grads(alphas, self.dist)
            self.a_opt.step()
            rec["arch_loss"] = float(lv.detach())

        # 2. weight step (train split)
        set_arch(self.model, detach_arch(self.sampler.sample(noise, step)))
        self.w_opt.zero_grad(set_to_none=True)
        loss = self._loss(self.ddp, train_batch)
        loss.backward()
        set_arch(self.model, None)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.w_opt.step()
        rec["train_loss"] = float(loss.detach())
        rec.update(self.sampler.extra_metrics(step))
        return rec

    # ----------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate_selection(self, selection: Mapping[str, Any], batches=None) -> dict:
        """Metrics of the supernet under the one-hot ``selection`` (inherited weights)."""
        set_arch(self.model, self.space.hard_arch(selection, device=self.device))
        try:
            with precision_context(self.cfg.precision, self.device):
                return self.space.evaluate(
                    _eval_model(self.model, self.compiler), batches if batches is not None else self.eval_set
                )
        finally:
            set_arch(self.model, None)

    def _loss(self, model, batch, weight_grads: bool = True) -> torch.Tensor:
        """``space.loss(model, batch)``, compiled with ``compile``."""
        if self.compiler is None:
            return self.space.loss(model, batch)
        return self.compiler.loss(self.space.loss, model, batch, weight_grads=weight_grads)

    def _score(self, metrics: dict) -> float:
        v = float(metrics[self.space.metric])
        return v if self.space.minimize else -v

    # --------------------------------------------------------------------- run
    def _on_sigint(self, signum, frame):  # pragma: no cover - exercised via os.kill in tests
        if self._stop:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop = True
        self.log(
            "\ninterrupt: finishing the current step and writing a checkpoint "
            "(Ctrl-C again to stop at once)"
        )

    def request_stop(self) -> None:
        """Stop after the current step, writing a checkpoint (what Ctrl-C does)."""
        self._stop = True

    def run(self) -> dict:
        self.setup()
        handler_set = False
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
            handler_set = True
        try:
            self._loop()
        finally:
            if handler_set:
                signal.signal(signal.SIGINT, old_handler)
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        return self.finish()

    def _loop(self) -> None:
        cfg = self.cfg
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=self.total,
            initial=self.start,
            desc=f"search {self.space.name}/{cfg.optimizer}",
            disable=not (self.progress and self.dist.is_main),
            dynamic_ncols=True,
            unit="step",
        )
        t0 = time.perf_counter()
        self.model.train()
        for step in range(self.start, self.total):
            self.step = step
            rec = self.train_step(step)
            sel = self.sampler.derive()
            if step % cfg.log_every == 0 or step == self.total - 1:
                rec["probs"] = {n: p.tolist() for n, p in self.sampler.probs().items()}
                rec["arch"] = sel
                rec["time"] = round(time.perf_counter() - t0, 3)
                self._record(rec)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < self.total:
                m = self.evaluate_selection(sel)
                self._record(
                    {
                        "kind": "eval",
                        "step": step,
                        "arch": sel,
                        **{f"val_{k}": v for k, v in m.items()},
                    }
                )
                self.model.train()
            self._bar.set_postfix_str(
                f"loss {rec['train_loss']:.3f} | {self.space.describe(sel)}", refresh=False
            )
            self._bar.update(1)
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < self.total:
                self.save(done)
            if self.on_step is not None:
                self.on_step(self, step)
            if D.any_flag(self._stop, self.dist, self.device):
                self.save(done)
                self.log(
                    f"stopped at step {done}/{self.total}; checkpoint written to "
                    f"{self.ckpt_path} (continue with --resume)"
                )
                raise KeyboardInterrupt
        self.step = self.total

    # ------------------------------------------------------------------ finish
    def _decision(self, history) -> dict:
        """How decided the search was (``arch.json['decided']``): for a trained sampler
        the final probabilities per choice with their entropy (:func:`decision_report`);
        for SPOS the supernet scores of the best and runner-up selections."""
        if self.sampler.trains_arch:
            return decision_report(self.sampler.probs(), self.space.choices)
        scores = sorted(float(h["score"]) for h in (history or []))  # [{"arch", "score"}]
        return {
            "spos": {
                "search": self.cfg.spos_search,
                "scored": len(scores),
                "best": scores[0] if scores else None,
                "runner_up": scores[1] if len(scores) > 1 else None,
                "median": scores[len(scores) // 2] if scores else None,
            }
        }

    def finish(self) -> dict:
        cfg = self.cfg
        self.save(self.total)
        history = None
        if self.sampler.trains_arch:
            selection = self.sampler.derive()
        else:
            batches = self.eval_set[: cfg.spos_eval_batches]
            if len(batches) < cfg.spos_eval_batches:
                batches = _eval_batches(self.data, cfg, self.device, cfg.spos_eval_batches)
            score = lambda sel: self._score(self.evaluate_selection(sel, batches))  # noqa: E731
            fn = evolution if cfg.spos_search == "evolution" else random_search
            kw = {"population": cfg.spos_population} if fn is evolution else {}
            self.log(
                f"SPOS: {cfg.spos_search} over the trained supernet ({cfg.spos_budget} evaluations)"
            )
            selection, _, hist = fn(
                self.space.choices,
                score,
                budget=cfg.spos_budget,
                seed=derive_seed(cfg.seed, 0, "spos"),
                **kw,
            )
            history = [{"arch": s, "score": v} for s, v in hist]
        selection = self.space.check_selection(selection)

        # every rank must hold the same alphas and derive the same architecture
        gathered = D.all_gather_object(
            {
                "selection": selection,
                "alphas": {n: a.detach().cpu().tolist() for n, a in self.sampler.alphas.items()},
                "last_arch_sample": getattr(self, "_last_sample", None),
                "weights_sum": float(
                    sum(p.detach().double().sum() for p in self.model.parameters())
                ),
            },
            self.dist,
        )
        if any(g["selection"] != gathered[0]["selection"] for g in gathered):
            raise SearchError(
                f"ranks derived different architectures: {[g['selection'] for g in gathered]}"
            )

        sup = self.evaluate_selection(selection)
        plain = self.space.extract(self.model, selection).to(self.device)
        with precision_context(self.cfg.precision, self.device):
            plain_metrics = self.space.evaluate(_eval_model(plain, self.compiler), self.eval_set)
        result: dict[str, Any] = {
            "space": self.space.name,
            "space_config": self.space.config(),
            "data": getattr(self.data, "name", ""),
            "optimizer": cfg.optimizer,
            "steps": self.total,
            "arch": selection,
            "arch_str": self.space.describe(selection),
            "val": plain_metrics,
            "val_supernet": sup,
            "params": self.space.param_count(plain),
            "params_supernet": self.space.param_count(self.model),
            "alphas": {n: a.detach().cpu().tolist() for n, a in self.sampler.alphas.items()},
            "probs": {n: p.tolist() for n, p in self.sampler.probs().items()},
            "config": cfg.to_dict(),
            "seed": cfg.seed,
            "world_size": self.dist.world_size,
            **self.meta,
        }
        if self.dist.enabled:
            result["distributed"] = {
                "world_size": self.dist.world_size,
                "rank_archs": [g["selection"] for g in gathered],
                "rank_alphas": [g["alphas"] for g in gathered],
                # the last architecture-step sample (noise drawn per rank from (seed, step))
                "rank_last_arch_sample": [g["last_arch_sample"] for g in gathered],
                "rank_weights_sum": [g["weights_sum"] for g in gathered],
                "ranks_agree": all(g == gathered[0] for g in gathered),
            }
        if history is not None:
            result["spos_history"] = history
        result["decided"] = self._decision(history)
        if cfg.retrain_steps > 0 and self.dist.is_main:
            self.log(f"training the derived architecture from scratch ({cfg.retrain_steps} steps)")
            result["scratch"] = train_from_scratch(
                self.space,
                self.data,
                selection,
                cfg,
                steps=cfg.retrain_steps,
                device=self.device,
                progress=self.progress and self.dist.is_main,
                eval_set=self.eval_set,
                compile=self.compiler,
            )
        if self.compiler is not None:
            result["compile"] = self.compiler.summary()
            self.log(_compile_line(result["compile"]))
        if self.dist.is_main:
            _write_json(self.arch_path, result)
            self._record(
                {
                    "kind": "final",
                    "step": self.total,
                    "arch": selection,
                    "val": plain_metrics,
                    **({"scratch_val": result["scratch"]["val"]} if "scratch" in result else {}),
                }
            )
            from .plot import plot_alphas

            if self.sampler.trains_arch:
                ok = plot_alphas(
                    self.metrics_path,
                    self.plot_path,
                    self.space.choices,
                    title=f"{self.space.name} / {cfg.optimizer}",
                )
                if not ok:
                    from .plot import have_matplotlib

                    if not have_matplotlib():
                        self.log(
                            "matplotlib is not installed: skipping alphas.png "
                            "(pip install matplotlib)"
                        )
                result["plot"] = self.plot_path if ok else None
        return result


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
    opt = _make_w_optimizer(model.parameters(), cfg)
    if eval_set is None:
        eval_set = _eval_batches(data, cfg, device)
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
            g = _generator(derive_seed(seed, step, "scratch-train"))
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
        metrics = space.evaluate(_eval_model(model, compiler), eval_set)
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


def _eval_model(model: torch.nn.Module, compiler) -> torch.nn.Module:
    return model if compiler is None else compiler.module(model)


def _compile_line(c: dict) -> str:
    return (
        f"--compile: {c['graphs']} graph(s) compiled ({c['backend']}"
        f"{', mode ' + c['mode'] if c['mode'] else ''}), {c['compile_s']:.0f} s in first calls"
    )


def run_search(space, data, cfg: SearchConfig, **kw) -> dict:
    """``Search(space, data, cfg, **kw).run()``."""
    return Search(space, data, cfg, **kw).run()

"""The settings of a search run: :class:`SearchConfig` and its layering.

A run's settings come, each later layer overriding the earlier ones, from the
:class:`SearchConfig` defaults, the space's ``search_defaults``, an optional base (the
``config`` of an arch.json, for ``tangle-search train``), the explicit flags, and
``--set FIELD=VALUE`` pairs: :func:`build_config` is that layering, shared by the CLI and
the benchmarks.

The sampler's own settings (GDAS temperatures, DrNAS concentration, SPOS selection,
...) are fields too, declared by the samplers (``samplers/*.py``, :class:`Option`), so a
new sampler's option is a field, a ``--set`` name and a flag without touching this file.
The sampler field is ``sampler``; ``optimizer`` (its old name) is accepted as a keyword,
a property and in saved configs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .samplers import SAMPLERS, sampler_options

__all__ = ["SearchConfig", "SearchError", "PRECISIONS", "build_config", "parse_choices",
           "parse_assignments"]

PRECISIONS = ("fp32", "tf32", "bf16")
SELECTS = ("argmax", "race")
RACE_PICKS = ("top", "draw")
SANDWICHES = ("none", "max", "max-min")
BUDGET_MODES = ("derive", "lagrange")


class SearchError(ValueError):
    """A search that cannot run as configured; the CLI prints the message, exits 2."""


@dataclass
class _Core:
    """The settings every search has (the samplers' options are added below)."""

    sampler: str = "drnas"  #: darts, sparsemax, drnas, gdas, spos, ... (``SAMPLERS``)
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
    #: one-hot samplers (GDAS, SPOS): the weight step also trains the sampled architecture
    #: with every numeric choice at its largest (``max``), and at its smallest too
    #: (``max-min``): BigNAS's sandwich rule, so the widest slices are trained every step
    #: and not only when drawn (``none``: the sampled architecture only)
    sandwich: str = "none"
    unrolled: bool = False  #: second-order DARTS (samplers with ``supports_unrolled``)
    retrain_steps: int = 0  #: train the derived arch from scratch for N steps (0: skip)
    seed: int = 0
    checkpoint_every: int = 100  #: steps between checkpoints (0: only at the end / Ctrl-C)
    log_every: int = 1  #: steps between metrics.jsonl records
    #: fp32 | tf32 (float32 weights, CUDA matmuls/convolutions on TF32 tensor cores)
    #: | bf16 (autocast forward in bfloat16; weights, grads and optimizer states float32)
    precision: str = "fp32"
    #: budget (``budget.py``): the derived architecture has at most this many parameters
    max_params: float | None = None
    #: budget: at most this many MACs per sample (the spaces' MAC convention)
    max_macs: float | None = None
    #: budget: at most this many milliseconds per forward pass of ``latency_batch``
    #: validation samples on the search's device (a measured table, ``nn/latency.py``)
    max_latency_ms: float | None = None
    latency_batch: int = 1
    #: dual-ascent rate of the budget's Lagrange multipliers
    budget_rate: float = 1.0
    #: how a budget acts: ``derive``, the architecture search runs unconstrained and
    #: only the derivation (and the race's contenders) keeps to the limits; ``lagrange``,
    #: the expected cost is also constrained in the architecture objective (a multiplier
    #: per limit). ``derive`` was chosen on the tuning corpora (docs/search-quality.md)
    budget_mode: str = "derive"
    #: final selection (``race.py``): ``argmax`` of the final distribution, or ``race``:
    #: ``race_archs`` contenders, each trained from scratch for ``race_steps`` (0:
    #: ``retrain_steps``), the best on the validation batches kept. ``race_pick``: ``top``,
    #: the most probable architectures of the final distribution; ``draw``, the most
    #: probable and the others drawn from it (tempered by ``race_temperature``)
    select: str = "argmax"
    race_archs: int = 4
    race_pick: str = "top"
    race_temperature: float = 1.0
    race_steps: int = 0
    #: the spread of the race's metric between two from-scratch trainings of one
    #: architecture (seeds differ): a winner ahead by less is reported as a coin toss
    #: (0: unknown, no verdict). The nanoGPT space's default is measured (its search_defaults)
    race_noise: float = 0.0

    @property
    def optimizer(self) -> str:
        """The sampler's name (the old name of :attr:`sampler`)."""
        return self.sampler

    @optimizer.setter
    def optimizer(self, value: str) -> None:
        self.sampler = value

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["arch_betas"] = list(self.arch_betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchConfig:
        """From a saved config (unknown keys ignored; ``optimizer`` read as ``sampler``)."""
        d = dict(d)
        if "optimizer" in d and "sampler" not in d:
            d["sampler"] = d["optimizer"]
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "arch_betas" in kw:
            kw["arch_betas"] = tuple(kw["arch_betas"])
        return cls(**kw)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def resume_free(cls) -> tuple[str, ...]:
        """Fields that may differ between a checkpoint and the run that resumes it."""
        return _RESUME_FREE + tuple(n for n, (o, _) in sampler_options().items() if o.resume_free)

    def check(self) -> None:
        """:class:`SearchError` naming the first bad field."""
        self._check_types()
        if self.sampler not in SAMPLERS:
            raise SearchError(f"--sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.epochs is None and self.steps < 1:
            raise SearchError(f"--steps {self.steps}: must be >= 1")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise SearchError(f"--epochs {self.epochs}: must be > 0 and finite")
        for n in ("batch_size", "eval_batches"):
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
            v = getattr(self, n)
            if not (v > 0 and math.isfinite(v)):
                raise SearchError(f"{n}={v}: must be > 0 and finite")
        for n in ("lr_min", "momentum", "weight_decay", "grad_clip", "arch_weight_decay",
                  "arch_init_scale"):
            v = getattr(self, n)
            if not math.isfinite(v):
                raise SearchError(f"{n}={v}: must be finite")
        if self.latency_batch < 1:
            raise SearchError(f"latency_batch={self.latency_batch}: must be >= 1")
        for n in ("max_params", "max_macs", "max_latency_ms"):
            v = getattr(self, n)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise SearchError(f"--{n.replace('_', '-')} {v}: must be positive and finite")
        if self.select not in SELECTS:
            raise SearchError(f"select={self.select!r}: choose one of {', '.join(SELECTS)}")
        if self.race_archs < 1 or self.race_steps < 0:
            raise SearchError(f"race_archs={self.race_archs}, race_steps={self.race_steps}: "
                              "need race_archs >= 1 and race_steps >= 0")
        if not (self.race_noise >= 0 and math.isfinite(self.race_noise)):
            raise SearchError(f"race_noise={self.race_noise}: must be >= 0 and finite")
        if self.sandwich not in SANDWICHES:
            raise SearchError(f"sandwich={self.sandwich!r}: choose one of {', '.join(SANDWICHES)}")
        if self.sandwich != "none" and not SAMPLERS[self.sampler].hard:
            hard = ", ".join(n for n, c in SAMPLERS.items() if c.hard)
            raise SearchError(f"sandwich={self.sandwich} adds the largest (and smallest) "
                              f"architecture to a one-hot weight step ({hard}); "
                              f"--sampler {self.sampler} trains a mixture of every candidate "
                              "already: use sandwich=none")
        if self.race_pick not in RACE_PICKS:
            raise SearchError(f"race_pick={self.race_pick!r}: choose one of "
                              f"{', '.join(RACE_PICKS)}")
        if not (self.race_temperature > 0 and math.isfinite(self.race_temperature)):
            raise SearchError(f"race_temperature={self.race_temperature}: must be > 0 and finite")
        if self.select == "race":
            if not SAMPLERS[self.sampler].trains_arch:
                raise SearchError(f"select=race draws its contenders from trained architecture "
                                  f"parameters; --sampler {self.sampler} has none (it selects "
                                  "with its own stage): use select=argmax")
            if self.race_steps == 0 and self.retrain_steps == 0:
                raise SearchError("select=race trains its contenders from scratch: set "
                                  "race_steps=N or --retrain-steps N")
        if self.budget_mode not in BUDGET_MODES:
            raise SearchError(f"budget_mode={self.budget_mode!r}: choose one of "
                              f"{', '.join(BUDGET_MODES)}")
        if not (self.budget_rate > 0 and math.isfinite(self.budget_rate)):
            raise SearchError(f"budget_rate={self.budget_rate}: must be > 0 and finite")
        if self.lr_min < 0 or self.lr_min > self.lr:
            raise SearchError(f"lr_min={self.lr_min}: must be in [0, lr={self.lr}]")
        for n, (opt, _) in sampler_options().items():
            problem = opt.validate(getattr(self, n))
            if problem:
                raise SearchError(problem)
        cls = SAMPLERS[self.sampler]
        if self.unrolled and not cls.supports_unrolled:
            able = ", ".join(n for n, c in SAMPLERS.items() if c.supports_unrolled)
            raise SearchError(
                f"--unrolled is the second-order DARTS update; it needs --sampler {able} "
                f"(a deterministic relaxation), not {self.sampler!r}"
            )


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_types(self) -> None:
    """Each field of its declared type (a ``--set`` value is parsed, so it may not be)."""
    opts = sampler_options()
    for f in dataclasses.fields(self):
        v = getattr(self, f.name)
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if f.name in opts:
            t = opts[f.name][0].type.__name__
        parts = [p.strip() for p in t.split("|")]
        if v is None and "None" in parts:
            continue
        allowed = tuple(c for p in parts for c in _TYPES.get(p, ()))
        if not allowed:
            continue
        if isinstance(v, bool) and bool not in allowed:
            ok = False
        elif allowed == (bool,) and v in (0, 1):
            ok = True
        else:
            ok = isinstance(v, allowed)
        if not ok:
            raise SearchError(f"{f.name}={v!r}: expected {' or '.join(parts)}, got "
                              f"{type(v).__name__}")
    b = self.arch_betas
    if not (isinstance(b, (tuple, list)) and len(b) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1
                    for x in b)):
        raise SearchError(f"arch_betas={b!r}: expected two numbers in [0, 1)")


_Core._check_types = _check_types

_RESUME_FREE = (
    "checkpoint_every",
    "eval_every",
    "log_every",
    "retrain_steps",
    "eval_batches",
    "eval_batch_size",
    "epochs",
    "precision",
    "select",
    "race_archs",
    "race_pick",
    "race_temperature",
    "race_steps",
    "race_noise",
)


def _make_config_class():
    fields = [
        (o.name, o.type, dataclasses.field(default=o.default))
        for o, _ in sampler_options().values()
    ]
    cls = dataclasses.make_dataclass(
        "SearchConfig",
        fields,
        bases=(_Core,),
        namespace={"__doc__": "Everything that determines a search run (saved in checkpoints "
                   "and arch.json): the core settings and every sampler's options."},
    )
    cls.__module__ = __name__
    init = cls.__init__

    def __init__(self, *args, optimizer: str | None = None, **kw):
        if optimizer is not None:
            if kw.get("sampler", optimizer) != optimizer:
                raise TypeError(f"sampler={kw['sampler']!r} and optimizer={optimizer!r} differ")
            kw["sampler"] = optimizer
        init(self, *args, **kw)

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    return cls


SearchConfig = _make_config_class()
#: kept for code that read the tuple (``SearchConfig.resume_free()`` is the API)
SearchConfig._RESUME_FREE = SearchConfig.resume_free()


def default_select(d: Mapping[str, Any]) -> str:
    """The final selection of settings ``d`` whose ``select`` was not asked for: a
    space's default race is a race among the trained distribution's candidates at the
    retraining's budget, so a sampler without one (SPOS) keeps its own selection stage
    and a run without training from scratch (``race_steps``, ``retrain_steps`` 0) the
    argmax."""
    sel = d.get("select", "argmax")
    if sel == "race" and (
            (d.get("sampler") in SAMPLERS and not SAMPLERS[d["sampler"]].trains_arch)
            or (not d.get("race_steps") and not d.get("retrain_steps"))):
        return "argmax"
    return sel


def build_config(
    space=None,
    flags: Mapping[str, Any] | None = None,
    sets: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> SearchConfig:
    """SearchConfig: defaults <- ``space.search_defaults`` <- ``base`` <- ``flags`` (None
    values skipped; ``optimizer`` read as ``sampler``; ``steps`` clears ``epochs``) <-
    ``sets`` (``--set`` pairs: a :class:`SearchError` for an unknown field), checked. A
    space's default ``select=race`` becomes ``argmax`` for a sampler without trained
    architecture parameters (SPOS) and without a from-scratch budget (``race_steps`` and
    ``retrain_steps`` 0); asked for explicitly, it is refused there."""
    def renamed(layer):  # the old name of the sampler field
        layer = dict(layer or {})
        if "optimizer" in layer:
            layer.setdefault("sampler", layer.pop("optimizer"))
        return layer

    d = SearchConfig().to_dict()
    d.update(renamed(getattr(space, "search_defaults", None)))
    d.update(renamed(base))
    fl = {k: v for k, v in (flags or {}).items() if v is not None}
    if "optimizer" in fl:
        fl.setdefault("sampler", fl.pop("optimizer"))
    d.update(fl)
    if fl.get("steps") is not None:  # --steps and --epochs exclude each other
        d["epochs"] = None
    names = SearchConfig.field_names()
    for k, v in (sets or {}).items():
        if k == "optimizer":
            k = "sampler"
        if k not in names:
            raise SearchError(f"--set {k}: not a search setting (settings: {', '.join(names)})")
        d[k] = v
    d.pop("optimizer", None)
    explicit = set(renamed(base)) | set(fl) | {("sampler" if k == "optimizer" else k)
                                                for k in (sets or {})}
    if "select" not in explicit:
        d["select"] = default_select(d)
    try:
        cfg = SearchConfig.from_dict(d)
    except TypeError as e:
        raise SearchError(f"bad search settings: {e}") from None
    try:
        cfg.check()
    except TypeError as e:  # a --set value of the wrong type ("abc" < 1)
        raise SearchError(f"bad search settings: {e}") from None
    return cfg


def parse_choices(items) -> dict:
    """``["NAME=V1,V2", ...]`` (``--choice``) -> ``{NAME: [V1, V2]}`` (values parsed)."""
    from ..spaces.base import parse_assignment, parse_value

    out = {}
    for it in items:
        name, vals = parse_assignment(it, what="--choice")
        values = [parse_value(v) for v in vals.split(",") if v.strip()]
        if not values:
            raise SearchError(f"--choice {it!r}: no values")
        out[name] = values
    return out


def parse_assignments(items, what: str = "--hp") -> dict:
    """``["NAME=VALUE", ...]`` (``--hp``, ``--set``) -> ``{NAME: VALUE}`` (values parsed)."""
    from ..spaces.base import parse_assignment, parse_value

    out = {}
    for it in items:
        name, val = parse_assignment(it, what=what)
        out[name] = parse_value(val)
    return out

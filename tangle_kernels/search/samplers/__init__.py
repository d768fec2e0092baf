"""Architecture samplers, one file per sampler, found by this registry.

=========  ===================================================  =====================
sampler    arch[name] for alpha = alpha[name]                    architecture gradient
=========  ===================================================  =====================
darts      softmax(alpha)                                        exact
sparsemax  sparsemax(alpha) (Martins & Astudillo 2016)           exact (zeros possible)
drnas      w ~ Dirichlet(elu(alpha) + 1), reparameterised        pathwise (implicit)
gdas       one_hot(argmax(alpha + g)), g ~ Gumbel(0, 1), with    straight-through via
           the straight-through estimator of softmax((alpha+g)/tau)  softmax((alpha+g)/tau)
spos       uniform one-hot                                       none
snas       softmax((alpha + g) / tau), g ~ Gumbel(0, 1)          pathwise (soft)
=========  ===================================================  =====================

Adding a sampler is one file in this folder: a :class:`Sampler` subclass with a unique
``name``, its ``options`` and capabilities (``base.py``). Every module here is imported
and every Sampler subclass it defines is registered; the CLI flags, the
:class:`~tangle_kernels.search.config.SearchConfig` fields and their validation, and the
tests' sampler lists come from :data:`SAMPLERS`.

Randomness (Dirichlet and Gumbel noise, SPOS draws) comes from an explicit
``torch.Generator`` the caller passes in: the search loop seeds it from (seed, step),
so every DDP rank draws the same architecture noise and a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..decision import decision_report, entropy, format_decision
from .base import Option, Sampler, SelectionContext, linear_tau
from .darts import DartsSampler
from .drnas import DrNASSampler
from .gdas import GDASSampler
from .snas import SNASSampler
from .sparsemax import SparsemaxSampler, sparsemax
from .spos import SPOSSampler

__all__ = [
    "Option",
    "Sampler",
    "SelectionContext",
    "DartsSampler",
    "SparsemaxSampler",
    "DrNASSampler",
    "GDASSampler",
    "SPOSSampler",
    "SNASSampler",
    "SAMPLERS",
    "make_sampler",
    "sampler_options",
    "sparsemax",
    "linear_tau",
    "entropy",
    "decision_report",
    "format_decision",
]

_BASE_KWARGS = ("init_scale", "generator", "device")


def _discover() -> dict[str, type[Sampler]]:
    found: dict[str, type[Sampler]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(mod).values():
            if (isinstance(obj, type) and issubclass(obj, Sampler) and obj is not Sampler
                    and obj.__module__ == mod.__name__):
                if obj.name in found and found[obj.name] is not obj:
                    raise ImportError(f"two samplers named {obj.name!r}")
                found[obj.name] = obj
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


#: name -> sampler class, in registry order
SAMPLERS: dict[str, type[Sampler]] = _discover()


def sampler_options() -> dict[str, tuple[Option, type[Sampler]]]:
    """Every sampler option by name, with the sampler that owns it."""
    out: dict[str, tuple[Option, type[Sampler]]] = {}
    for cls in SAMPLERS.values():
        for o in cls.options:
            if o.name in out:
                raise ImportError(f"option {o.name!r} declared by two samplers")
            out[o.name] = (o, cls)
    return out


def make_sampler(name: str, choices, **kw) -> Sampler:
    """``SAMPLERS[name](choices, **kw)``; keywords of other samplers (their options'
    ``kwarg`` and ``run_kwargs``) are dropped."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown optimizer (sampler) {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls = SAMPLERS[name]
    allowed = {*_BASE_KWARGS, *cls.run_kwargs, *(o.kwarg for o in cls.options if o.kwarg)}
    return cls(choices, **{k: v for k, v in kw.items() if k in allowed})


def sampler_from_config(cfg, choices, **kw) -> Sampler:
    """The sampler of ``cfg.sampler`` with its options read from ``cfg`` (``kw``: the base
    and run keywords)."""
    cls = SAMPLERS[cfg.sampler]
    opts = {o.kwarg: getattr(cfg, o.name) for o in cls.options if o.kwarg}
    return make_sampler(cfg.sampler, choices, **kw, **opts)

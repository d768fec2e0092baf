"""The sampler interface: what a sampler declares and what the search loop asks of it.

A sampler turns per-choice parameters ``alpha[name]`` into an *arch* (each choice name
-> a 1-D weight vector over that choice's values, ``tangle_kernels.nn.arch``) and
declares, as class attributes, everything the loop and the CLI need to know about it:

- ``options``: its settings (:class:`Option`): each becomes a :class:`SearchConfig`
  field, a ``--set`` name and, with ``flag``, a command-line flag;
- capabilities: ``trains_arch`` (an architecture step at all), ``hard`` (one-hot archs),
  ``supports_unrolled`` (second-order DARTS needs a deterministic relaxation),
  ``ddp_find_unused`` (a sampled arch may leave weights unused under DDP);
- its final selection: :meth:`Sampler.select` (argmax of the probabilities; SPOS
  searches the trained supernet) and :meth:`Sampler.decision` (how decided it was).

The loop never tests a sampler's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Option", "Sampler", "SelectionContext", "linear_tau"]


@dataclass(frozen=True)
class Option:
    """One setting of a sampler (a :class:`SearchConfig` field of the same name).

    ``kwarg``: the constructor keyword it is passed as (None: read from the config by
    :meth:`Sampler.select` only); ``flag``: its command-line flag (None: ``--set`` only);
    ``check``: ``"positive"``, ``"at_least_1"`` or None; ``choices``: allowed values;
    ``resume_free``: may differ between a checkpoint and the run that resumes it.
    """

    name: str
    type: type
    default: Any
    help: str = ""
    kwarg: str | None = None
    flag: str | None = None
    check: str | None = None
    choices: tuple | None = None
    resume_free: bool = False

    def validate(self, value) -> str | None:
        """The problem with ``value`` in one clause, or None."""
        if self.choices is not None and value not in self.choices:
            return f"{self.name}={value!r}: choose {' or '.join(map(str, self.choices))}"
        if self.check == "positive" and not (isinstance(value, (int, float)) and value > 0
                                             and math.isfinite(value)):
            return f"{self.name}={value}: must be positive and finite"
        if self.check == "at_least_1" and not value >= 1:
            return f"{self.name}={value}: must be >= 1"
        return None


@dataclass
class SelectionContext:
    """What :meth:`Sampler.select` may use: the run's config, ``score(selection,
    n_batches)`` (lower is better, the supernet with inherited weights on the first
    ``n_batches`` validation batches), the run's seed for selection draws and a logger."""

    cfg: Any
    score: Callable[[Mapping[str, Any], int], float]
    seed: int
    log: Callable[[str], None]
    #: under a budget: whether a selection fits it (None: no budget)
    fits: Callable[[Mapping[str, Any]], bool] | None = None
    #: under a budget: the most probable selection of ``probs`` that fits it
    best_within: Callable[[Mapping[str, Any]], dict] | None = None


def linear_tau(step: int, total_steps: int, tau_max: float, tau_min: float) -> float:
    """Linear annealing: ``tau_max`` at step 0, ``tau_min`` at step ``total_steps - 1``."""
    if total_steps <= 1:
        return float(tau_min)
    frac = min(max(step, 0), total_steps - 1) / (total_steps - 1)
    return float(tau_max + (tau_min - tau_max) * frac)


class Sampler:
    """Holds one parameter vector per choice and samples archs from it.

    ``choices`` maps a choice name to its values; ``alphas`` is a dict name -> 1-D
    ``nn.Parameter`` in the order of ``choices`` (any choice name is allowed, dots
    included), initialised to ``init_scale * randn`` drawn from ``generator`` (DARTS
    uses 1e-3; 0 gives zeros). Subclasses implement :meth:`sample` and :meth:`probs`;
    random draws iterate over the choices in that order.
    """

    name = "base"
    #: one line for ``--help`` and the docs
    summary = ""
    #: position in the registry (CLI choices, error messages)
    order = 100
    #: the sampler's settings (SearchConfig fields, --set names, flags)
    options: tuple[Option, ...] = ()
    #: run-provided keywords the constructor takes (e.g. ``total_steps``)
    run_kwargs: tuple[str, ...] = ()
    #: whether the architecture parameters are trained by gradient (False for SPOS)
    trains_arch = True
    #: whether sampled archs are one-hot (:class:`HardArch`)
    hard = False
    #: whether the second-order (unrolled) DARTS update applies (deterministic archs)
    supports_unrolled = False
    #: whether a sampled arch may leave weights without gradient (DDP's
    #: ``find_unused_parameters``); default: one-hot samplers
    ddp_find_unused: bool | None = None

    def __init__(
        self,
        choices: Mapping[str, Sequence],
        *,
        init_scale: float = 1e-3,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ):
        if not choices:
            raise ValueError("choices: empty (a search space needs at least one choice)")
        self.choices = {n: list(v) for n, v in choices.items()}
        alphas = {}
        for n, v in self.choices.items():
            if len(v) == 0:
                raise ValueError(f"choices[{n!r}]: no values")
            a = (
                init_scale * torch.randn(len(v), generator=generator)
                if init_scale
                else torch.zeros(len(v))
            )
            alphas[n] = torch.nn.Parameter(a.to(device), requires_grad=self.trains_arch)
        self.alphas: dict[str, torch.nn.Parameter] = alphas

    @classmethod
    def find_unused(cls) -> bool:
        return cls.hard if cls.ddp_find_unused is None else cls.ddp_find_unused

    # ------------------------------------------------------------------ API
    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable architecture parameters (empty for SPOS)."""
        return list(self.alphas.values()) if self.trains_arch else []

    def sample(self, generator: torch.Generator | None = None, step: int = 0) -> dict:
        """An arch for one forward pass (differentiable in ``alphas`` unless SPOS)."""
        raise NotImplementedError

    def probs(self) -> dict[str, torch.Tensor]:
        """The current per-choice probabilities (detached), for logging, plots and derive."""
        raise NotImplementedError

    def for_arch_step(self, arch: dict) -> dict:
        """The arch the architecture step's forward pass runs ``arch`` as (the sample
        itself; GDAS with ``gdas_grad=superposed``: its values on the superposed path)."""
        return arch

    def derive(self) -> dict[str, object]:
        """``{name: value}``: argmax of :meth:`probs` per choice (first index on ties)."""
        out = {}
        for n, p in self.probs().items():
            out[n] = self.choices[n][int(torch.argmax(p))]
        return out

    def select(self, ctx: SelectionContext) -> tuple[dict, list | None]:
        """The final architecture and the history of scored selections (None: none
        scored). Trained samplers: :meth:`derive`; under a budget the most probable
        architecture that fits it."""
        if ctx.best_within is not None:
            return ctx.best_within({n: p.tolist() for n, p in self.probs().items()}), None
        return self.derive(), None

    def decision(self, history: list | None, cfg) -> dict:
        """How decided the search was (``arch.json['decided']``): the final probabilities
        per choice with their entropy (:func:`~.decision.decision_report`)."""
        from ..decision import decision_report

        return decision_report(self.probs(), self.choices)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: a.detach().clone() for n, a in self.alphas.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.alphas) ^ set(state)
        if missing:
            raise ValueError(f"sampler state: choices differ ({sorted(missing)})")
        with torch.no_grad():
            for n, a in self.alphas.items():
                if a.shape != state[n].shape:
                    raise ValueError(
                        f"sampler state[{n!r}]: shape {tuple(state[n].shape)} != {tuple(a.shape)}"
                    )
                a.copy_(state[n])

    def to(self, device) -> Sampler:
        """Move the alphas to ``device`` in place (before creating their optimizer)."""
        with torch.no_grad():
            for a in self.alphas.values():
                a.data = a.data.to(device)
        return self

    def extra_metrics(self, step: int) -> dict[str, float]:
        """Sampler-specific values logged each step (GDAS: the temperature)."""
        return {}

"""Architecture samplers: turn per-choice parameters ``alpha[name]`` into an *arch*.

An arch maps each choice name to a 1-D weight vector over that choice's values
(``tangle_kernels.nn.arch``); entangled layers mix their candidates with the outer
product of the vectors they depend on.

=========  ===================================================  =====================
sampler    arch[name] for alpha = alpha[name]                    architecture gradient
=========  ===================================================  =====================
darts      softmax(alpha)                                        exact
sparsemax  sparsemax(alpha) (Martins & Astudillo 2016)           exact (zeros possible)
drnas      w ~ Dirichlet(elu(alpha) + 1), reparameterised        pathwise (implicit)
gdas       one_hot(argmax(alpha + g)), g ~ Gumbel(0, 1), with    straight-through via
           the straight-through estimator of softmax((alpha+g)/tau)  softmax((alpha+g)/tau)
spos       uniform one-hot                                       none
=========  ===================================================  =====================

Randomness (Dirichlet and Gumbel noise, SPOS draws) comes from an explicit
``torch.Generator`` the caller passes in: the search loop seeds it from (seed, step),
so every DDP rank draws the same architecture noise and a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..nn.arch import HardArch

__all__ = [
    "Sampler",
    "DartsSampler",
    "SparsemaxSampler",
    "DrNASSampler",
    "GDASSampler",
    "SPOSSampler",
    "SAMPLERS",
    "make_sampler",
    "sparsemax",
    "linear_tau",
    "entropy",
    "decision_report",
    "format_decision",
]


def sparsemax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean projection of ``z`` onto the probability simplex.

    ``p_i = max(z_i - tau, 0)`` with ``tau`` chosen so that ``sum p = 1``: sort ``z``
    descending, ``k* = max{k : 1 + k z_(k) > sum_{j<=k} z_(j)}``,
    ``tau = (sum_{j<=k*} z_(j) - 1) / k*``. Written with differentiable torch ops, so
    autograd yields the sparsemax Jacobian ``diag(s) - s s^T / |s|`` (s = support).
    """
    zs, _ = torch.sort(z, dim=dim, descending=True)
    n = z.shape[dim]
    shape = [1] * z.dim()
    shape[dim] = n
    k = torch.arange(1, n + 1, device=z.device, dtype=z.dtype).view(shape)
    cs = zs.cumsum(dim)
    support = (1 + k * zs) > cs
    ksup = support.sum(dim=dim, keepdim=True).clamp_min(1)
    tau = (cs.gather(dim, ksup - 1) - 1) / ksup.to(z.dtype)
    return torch.clamp(z - tau, min=0)


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
    #: whether the architecture parameters are trained by gradient (False for SPOS)
    trains_arch = True
    #: whether sampled archs are one-hot (:class:`HardArch`)
    hard = False

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

    def derive(self) -> dict[str, object]:
        """``{name: value}``: argmax of :meth:`probs` per choice (first index on ties)."""
        out = {}
        for n, p in self.probs().items():
            out[n] = self.choices[n][int(torch.argmax(p))]
        return out

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


class DartsSampler(Sampler):
    """DARTS: ``softmax(alpha)`` per choice."""

    name = "darts"

    def sample(self, generator=None, step=0):
        return {n: F.softmax(a, dim=0) for n, a in self.alphas.items()}

    def probs(self):
        return {n: F.softmax(a.detach(), dim=0) for n, a in self.alphas.items()}


class SparsemaxSampler(Sampler):
    """DARTS with sparsemax: sparse weights that sum to 1 (some candidates get 0)."""

    name = "sparsemax"

    def sample(self, generator=None, step=0):
        return {n: sparsemax(a) for n, a in self.alphas.items()}

    def probs(self):
        return {n: sparsemax(a.detach()) for n, a in self.alphas.items()}


def _dirichlet_rsample(
    concentration: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Reparameterised Dirichlet sample ``g / sum(g)``, ``g_i ~ Gamma(c_i, 1)``.

    ``torch._standard_gamma`` takes an explicit generator and has an implicit
    reparameterisation gradient (d g / d c), so the sample is differentiable in c.
    The generator must live on the concentration's device.
    """
    g = torch._standard_gamma(concentration, generator=generator)
    tiny = torch.finfo(g.dtype).tiny
    g = g.clamp_min(tiny)
    return g / g.sum()


class DrNASSampler(Sampler):
    """DrNAS: ``w ~ Dirichlet(scale * (elu(alpha) + 1))`` with reparameterised samples;
    the reported probabilities are the Dirichlet mean ``c / sum(c)`` (independent of
    ``scale``).

    ``concentration_scale`` (DrNAS: 1) sets the sampling noise only: at ``alpha = 0`` the
    paper's Dirichlet(1, ..., 1) is uniform over the simplex, so each architecture step
    sees a random mixture and the alpha gradient is mostly noise until the
    concentrations have grown, which takes thousands of steps; a larger scale draws
    mixtures near the mean (variance ~ 1 / (scale * sum(c)))."""

    name = "drnas"

    def __init__(self, choices, *, concentration_scale: float = 1.0, **kw):
        super().__init__(choices, **kw)
        if not concentration_scale > 0:
            raise ValueError(f"concentration_scale={concentration_scale}: must be > 0")
        self.concentration_scale = float(concentration_scale)

    def concentration(self, a: torch.Tensor) -> torch.Tensor:
        return self.concentration_scale * (F.elu(a) + 1.0)

    def sample(self, generator=None, step=0):
        return {
            n: _dirichlet_rsample(self.concentration(a), generator) for n, a in self.alphas.items()
        }

    def probs(self):
        out = {}
        for n, a in self.alphas.items():
            c = self.concentration(a.detach())
            out[n] = c / c.sum()
        return out


class GDASSampler(Sampler):
    """GDAS: hard Gumbel-softmax. Forward: exactly one-hot ``one_hot(argmax(alpha + g))``;
    backward: the gradient of ``softmax((alpha + g) / tau)`` (straight-through), with
    ``tau`` annealed linearly from ``tau_max`` to ``tau_min`` over ``total_steps``."""

    name = "gdas"
    hard = True

    def __init__(
        self, choices, *, tau_max: float = 10.0, tau_min: float = 0.1, total_steps: int = 1, **kw
    ):
        super().__init__(choices, **kw)
        if not (tau_max > 0 and tau_min > 0):
            raise ValueError(
                f"GDAS temperatures must be positive (tau_max={tau_max}, tau_min={tau_min})"
            )
        self.tau_max, self.tau_min, self.total_steps = (
            float(tau_max),
            float(tau_min),
            int(total_steps),
        )

    def tau(self, step: int) -> float:
        return linear_tau(step, self.total_steps, self.tau_max, self.tau_min)

    def sample(self, generator=None, step=0):
        tau = self.tau(step)
        weights, index = {}, {}
        for n, a in self.alphas.items():
            u = torch.rand(a.shape, generator=generator, device=a.device, dtype=a.dtype)
            # Gumbel(0,1) = -log(-log U); clamp keeps U strictly inside (0, 1).
            eps = torch.finfo(a.dtype).tiny
            g = -torch.log(-torch.log(u.clamp(eps, 1.0 - 1e-7)))
            soft = F.softmax((a + g) / tau, dim=0)
            i = int(torch.argmax(a.detach() + g))
            hard = torch.zeros_like(soft)
            hard[i] = 1.0
            # hard + (soft - soft) is exactly ``hard`` in value (x - x == 0 in IEEE
            # arithmetic), while its gradient is the gradient of ``soft``.
            weights[n] = hard + (soft - soft.detach())
            index[n] = i
        return HardArch(weights, index)

    def probs(self):
        return {n: F.softmax(a.detach(), dim=0) for n, a in self.alphas.items()}

    def extra_metrics(self, step):
        return {"tau": self.tau(step)}


class SPOSSampler(Sampler):
    """SPOS: each choice uniformly at random, one-hot, no architecture gradient. The
    architecture is selected afterwards by random search or evolution over the trained
    supernet (``tangle_kernels.search.evolution``)."""

    name = "spos"
    trains_arch = False
    hard = True

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


SAMPLERS: dict[str, type[Sampler]] = {
    "darts": DartsSampler,
    "sparsemax": SparsemaxSampler,
    "drnas": DrNASSampler,
    "gdas": GDASSampler,
    "spos": SPOSSampler,
}


def make_sampler(name: str, choices, **kw) -> Sampler:
    """``SAMPLERS[name](choices, **kw)``; GDAS-only and DrNAS-only keywords are dropped for
    the others."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls = SAMPLERS[name]
    if cls is not GDASSampler:
        for k in ("tau_max", "tau_min", "total_steps"):
            kw.pop(k, None)
    if cls is not DrNASSampler:
        kw.pop("concentration_scale", None)
    return cls(choices, **kw)


def entropy(p: torch.Tensor) -> float:
    """Shannon entropy (nats) of a probability vector, zeros allowed."""
    p = p.detach().double()
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum()) if nz.numel() else 0.0


#: margin (top probability minus the runner-up's) under which a choice is a coin toss,
#: and under which it is only a lean
COIN_TOSS_MARGIN = 0.05
DECIDED_MARGIN = 0.2


def decision_report(probs: Mapping[str, Sequence[float]], choices: Mapping[str, Sequence]) -> dict:
    """How decided a search was, per choice: the final probabilities, the chosen value,
    its probability and margin over the runner-up, the entropy (nats) and the entropy
    relative to the uniform one (``norm_entropy``: 1 = uniform, 0 = one-hot), and a verdict:
    ``coin toss`` (margin < 0.05), ``leaning`` (< 0.2) or ``decided``. ``overall``: the
    summed entropy, its share of the uniform one, the probability of the derived
    architecture (the product of the chosen probabilities) and the weakest choice."""
    import math

    per: dict[str, dict] = {}
    for n, p in probs.items():
        p = [float(x) for x in (p.tolist() if isinstance(p, torch.Tensor) else p)]
        k = len(p)
        order = sorted(range(k), key=lambda i: -p[i])
        top = p[order[0]]
        margin = top - p[order[1]] if k > 1 else 1.0
        h = entropy(torch.tensor(p))
        hmax = math.log(k) if k > 1 else 0.0
        verdict = (
            "coin toss"
            if k > 1 and margin < COIN_TOSS_MARGIN
            else "leaning"
            if k > 1 and margin < DECIDED_MARGIN
            else "decided"
        )
        per[n] = {
            "chosen": list(choices[n])[order[0]],
            "probs": {str(v): round(x, 4) for v, x in zip(choices[n], p)},
            "max_prob": round(top, 4),
            "margin": round(margin, 4),
            "entropy": round(h, 4),
            "norm_entropy": round(h / hmax, 4) if hmax else 0.0,
            "verdict": verdict,
        }
    h_all = sum(v["entropy"] for v in per.values())
    hmax_all = sum(math.log(len(choices[n])) for n in per if len(choices[n]) > 1)
    weakest = min(per, key=lambda n: per[n]["margin"]) if per else None
    return {
        "choices": per,
        "overall": {
            "entropy": round(h_all, 4),
            "max_entropy": round(hmax_all, 4),
            "norm_entropy": round(h_all / hmax_all, 4) if hmax_all else 0.0,
            "arch_prob": round(math.prod(v["max_prob"] for v in per.values()), 5),
            "weakest": weakest,
            "coin_tosses": [n for n, v in per.items() if v["verdict"] == "coin toss"],
        },
    }


def format_decision(report: Mapping) -> list[str]:
    """Human-readable lines of :func:`decision_report` (the CLI prints them)."""
    lines = []
    for n, v in report["choices"].items():
        ps = " ".join(f"{k}:{x:.2f}" for k, x in v["probs"].items())
        lines.append(
            f"{n}={v['chosen']}: p {v['max_prob']:.2f} (margin {v['margin']:.2f}, entropy "
            f"{v['norm_entropy']:.0%} of uniform) [{ps}] {v['verdict']}"
        )
    o = report["overall"]
    msg = (
        f"overall: entropy {o['entropy']:.2f} of {o['max_entropy']:.2f} nats "
        f"({o['norm_entropy']:.0%} of uniform); probability of the derived architecture "
        f"{o['arch_prob']:.3f}"
    )
    if o["coin_tosses"]:
        msg += f"; COIN TOSS on {', '.join(o['coin_tosses'])}: the search did not decide these"
    lines.append(msg)
    return lines

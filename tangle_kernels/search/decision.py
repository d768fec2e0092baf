"""How decided a search was: entropy and margins of the final probabilities.

The verdicts describe the probabilities, not the truth: ``confident`` means the sampler
put a clear margin on one value, not that the value is right. On the held-out protocol
(docs/search-quality.md, "Calibration") confident choices of the nanoGPT space agreed
with the from-scratch best about as often as chance, which is why the space's default
final selection is a race (race.py): the probabilities choose the contenders, the
trainings choose the winner. (Records written before the rename say ``decided``.)

NaN is NaN here: a probability vector with a non-finite entry has no chosen value and
the verdict ``not finite`` (never ``confident``), so a diverged search cannot pass as a
confident one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["entropy", "decision_report", "format_decision", "COIN_TOSS_MARGIN", "CONFIDENT_MARGIN",
           "DECIDED_MARGIN"]

#: margin (top probability minus the runner-up's) under which a choice is a coin toss,
#: and under which it is only a lean
COIN_TOSS_MARGIN = 0.05
CONFIDENT_MARGIN = 0.2
DECIDED_MARGIN = CONFIDENT_MARGIN  # the old name


def entropy(p: torch.Tensor) -> float:
    """Shannon entropy (nats) of a probability vector, zeros allowed; NaN if any entry is
    not finite or negative."""
    p = torch.as_tensor(p).detach().double()
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        return float("nan")
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum()) if nz.numel() else 0.0


def _r(x: float, nd: int) -> float:
    return x if not math.isfinite(x) else round(x, nd)


def decision_report(probs: Mapping[str, Sequence[float]], choices: Mapping[str, Sequence]) -> dict:
    """How decided a search was, per choice: the final probabilities, the chosen value,
    its probability and margin over the runner-up, the entropy (nats) and the entropy
    relative to the uniform one (``norm_entropy``: 1 = uniform, 0 = one-hot), and a verdict:
    ``coin toss`` (margin < 0.05), ``leaning`` (< 0.2) or ``confident`` (``not finite``
    when a probability is NaN or infinite: then ``chosen`` is None). ``overall``: the
    summed entropy, its share of the uniform one, the probability of the derived
    architecture (the product of the chosen probabilities), the weakest choice and the
    non-finite choices."""
    per: dict[str, dict] = {}
    for n, p in probs.items():
        p = [float(x) for x in (p.tolist() if isinstance(p, torch.Tensor) else p)]
        k = len(p)
        finite = all(math.isfinite(x) for x in p)
        h = entropy(torch.tensor(p))
        hmax = math.log(k) if k > 1 else 0.0
        if finite:
            order = sorted(range(k), key=lambda i: -p[i])
            top = p[order[0]]
            margin = top - p[order[1]] if k > 1 else 1.0
            verdict = (
                "coin toss"
                if k > 1 and margin < COIN_TOSS_MARGIN
                else "leaning"
                if k > 1 and margin < CONFIDENT_MARGIN
                else "confident"
            )
            chosen = list(choices[n])[order[0]]
        else:
            top = margin = float("nan")
            verdict, chosen = "not finite", None
        per[n] = {
            "chosen": chosen,
            "probs": {str(v): _r(x, 4) for v, x in zip(choices[n], p)},
            "max_prob": _r(top, 4),
            "margin": _r(margin, 4),
            "entropy": _r(h, 4),
            "norm_entropy": _r(h / hmax, 4) if hmax else (0.0 if math.isfinite(h) else h),
            "verdict": verdict,
        }
    h_all = sum(v["entropy"] for v in per.values())
    hmax_all = sum(math.log(len(choices[n])) for n in per if len(choices[n]) > 1)
    bad = [n for n, v in per.items() if v["verdict"] == "not finite"]
    weakest = (bad[0] if bad else min(per, key=lambda n: per[n]["margin"])) if per else None
    return {
        "choices": per,
        "overall": {
            "entropy": _r(h_all, 4),
            "max_entropy": round(hmax_all, 4),
            "norm_entropy": _r(h_all / hmax_all, 4) if hmax_all else (0.0 if not bad else h_all),
            "arch_prob": _r(math.prod(v["max_prob"] for v in per.values()), 5),
            "weakest": weakest,
            "coin_tosses": [n for n, v in per.items() if v["verdict"] == "coin toss"],
            "not_finite": bad,
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
    if o.get("not_finite"):
        msg += f"; NOT FINITE on {', '.join(o['not_finite'])}: the search diverged"
    lines.append(msg)
    return lines

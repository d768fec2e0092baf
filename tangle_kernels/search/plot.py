"""``alphas.png``: each choice's probabilities over the search (matplotlib optional)."""

from __future__ import annotations

import json

from .runlog import atomic_write

__all__ = ["plot_alphas", "have_matplotlib"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except Exception:
        return False
    return True


def read_probs(metrics_path: str) -> tuple[list[int], dict[str, list[list[float]]]]:
    """Steps and per-choice probability rows from the ``probs`` of ``metrics.jsonl``."""
    steps: list[int] = []
    probs: dict[str, list[list[float]]] = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            if rec.get("kind") != "train" or "probs" not in rec:
                continue
            steps.append(int(rec["step"]))
            for n, p in rec["probs"].items():
                probs.setdefault(n, []).append(p)
    return steps, probs


def plot_alphas(
    metrics_path: str,
    png_path: str,
    choices: dict[str, list],
    *,
    title: str = "",
) -> bool:
    """Write one panel per choice (probability of each value vs step) to ``png_path``.
    Returns False, writing nothing, when matplotlib is not installed."""
    if not have_matplotlib():
        return False
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps, probs = read_probs(metrics_path)
    names = [n for n in choices if n in probs]
    if not names or not steps:
        return False
    ncols = min(len(names), 3)
    nrows = (len(names) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, n in zip(axes.flat, names):
        rows = probs[n]
        for j, v in enumerate(choices[n]):
            ax.plot(steps, [r[j] for r in rows], label=str(v), lw=1.5)
        ax.set_title(n)
        ax.set_xlabel("step")
        ax.set_ylabel("probability")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda f: fig.savefig(f, dpi=100, format="png"), binary=True,
                     suffix=".png")
    finally:
        plt.close(fig)
    return True

"""Sweep over the number of candidates K (1, 3, 9, 27, 64): forward+backward time and
peak memory of ours vs the padded-sum reference vs torch.compile of it (and the
mask-sum formulation), on one 2-D weight with K prefix candidates
(:func:`benchmarks.shapes.sweep_layout`). Expected: ours flat in K (one weight-sized
output plus the gradient), the reference growing linearly (K padded temporaries
kept for backward).

``plot(records, path)`` draws time and peak memory against K as a PNG (matplotlib is
optional: without it no plot is drawn and the reason is returned).
"""

from __future__ import annotations

import pytest

from benchmarks import harness

_ST = harness.settings()


@pytest.mark.parametrize(("K", "provider"), harness.sweep_params(_ST),
                         ids=[f"K{k}-{p}" for k, p in harness.sweep_params(_ST)])
def test_sweep_k(benchmark, bench, K, provider):
    benchmark.group = f"sweep K={K}"
    bench.record(harness.run_sweep(K, provider, bench.settings, benchmark))


def plot(records: list[dict], path: str) -> str | None:
    """Draw the sweep records to ``path``; returns None, or why nothing was drawn."""
    rows = [r for r in records if r.get("suite") == "sweep_k" and r.get("status") == "ok"]
    if not rows:
        return "no sweep records"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"matplotlib unavailable ({type(e).__name__}: {e})"
    provs = sorted({r["provider"] for r in rows}, key=lambda p: (not p.startswith("ours"), p))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for p in provs:
        pts = sorted((r["K"], r["median_s"], r["peak_bytes"]) for r in rows if r["provider"] == p)
        ks = [k for k, _, _ in pts]
        ax1.plot(ks, [t * 1e3 for _, t, _ in pts], marker="o", label=p)
        ax2.plot(ks, [(m or 0) / 2**20 for _, _, m in pts], marker="o", label=p)
    shape = rows[0]["shape"]
    dev = rows[0]["device"]
    for ax, title in ((ax1, "fwd+bwd time (ms)"), (ax2, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=3)
        ax.set_xticks(sorted({r["K"] for r in rows}))
        ax.set_xticklabels([str(k) for k in sorted({r["K"] for r in rows})])
        ax.set_xlabel("K (candidates)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(f"superpose of a {shape[0]}x{shape[1]} {rows[0]['dtype']} weight vs K ({dev})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None

"""Interleaved supernet-step timing: the providers of one supernet case, side by side in
ONE process, round-robin, so that a shared or noisy machine slows them alike.

    python benchmarks/step_ab.py --case nanogpt-tinyshakespeare --providers "ours[cpu],plain,floor"
    python benchmarks/step_ab.py --case nanogpt --rounds 40 \
        --providers "ours[cpu],plain,floor,compiled-ours,compiled-plain"

The sequential suites (``run.py``) time one provider after another; on a shared machine the step time of the SAME
provider drifts between minutes by more than the differences they measure. Here every round runs each
provider once (in an order rotated every round) and the ratio of two providers is the
median over rounds of their per-round time ratio (drift cancels within a round). The
steps are those of ``bench_supernet.py`` (``providers.make_supernet``); compiled
providers compile in their first call (reported as ``first_call_s``, not timed).
Peak memory: ``benchmarks.memory.peak_extra_bytes`` of one more step after the rounds.

Writes ``benchmarks/results/<date>-step-ab-<case>.json`` and ``.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sections import git_commit as _commit  # noqa: E402


def measure(case_name: str, provs: list[str], rounds: int, device: str = "cpu", log=print) -> dict:
    import torch

    from benchmarks import memory, providers, shapes

    cases = {c.name: c for p in ("smoke", "quick", "full") for c in shapes.supernet_cases(device, p)}
    if case_name not in cases:
        raise SystemExit(f"step_ab: unknown case {case_name!r} (cases: {', '.join(sorted(cases))})")
    case = cases[case_name]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    benches, first = {}, {}
    for p in provs:
        try:
            benches[p] = providers.make_supernet(case, p, device)
        except providers.Unavailable as e:
            log(f"step_ab: {p}: unavailable ({e})")
            continue
        t0 = time.perf_counter()
        benches[p].fn()  # compiles the compiled providers
        sync()
        first[p] = time.perf_counter() - t0
        benches[p].fn()
        sync()
        log(f"step_ab: {p}: ready (first call {first[p]:.1f} s)")
    names = list(benches)
    times: dict[str, list[float]] = {p: [] for p in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for p in order:
            t0 = time.perf_counter()
            benches[p].fn()
            sync()
            times[p].append(time.perf_counter() - t0)
        if (r + 1) % max(1, rounds // 5) == 0:
            log(f"step_ab: round {r + 1}/{rounds}")
    peaks = {p: memory.peak_extra_bytes(benches[p].fn, device) for p in names}
    items = {p: benches[p].items for p in names}
    recs = {}
    for p in names:
        recs[p] = {"median_s": statistics.median(times[p]), "min_s": min(times[p]), "times_s": times[p],
                   "first_call_s": first[p], "peak_extra_bytes": peaks[p],
                   "items_per_s": items[p] / statistics.median(times[p])}
    ratios = {}
    for a in names:
        for b in names:
            if a != b:
                ratios[f"{a}/{b}"] = statistics.median(x / y for x, y in zip(times[a], times[b]))
    return {"case": case_name, "device": device, "rounds": rounds, "unit": case.unit,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": _commit(),
            "date": _dt.date.today().isoformat(), "providers": recs, "time_ratios": ratios}


def markdown(res: dict) -> str:
    names = list(res["providers"])
    ref = [n for n in ("plain", "floor", "compiled-plain", "plain-fused", "floor-fused") if n in names]
    lines = [f"#### Interleaved step timing: {res['case']} ({res['device']}, {res['date']}, commit "
             f"`{res['commit']}`)", "",
             f"{res['rounds']} rounds, every provider once per round (order rotated), "
             f"{res['threads']} threads, torch {res['torch']}. time/X = median over rounds of the "
             "per-round step-time ratio; peak = extra bytes allocated during one step.", "",
             "| provider | median ms/step | min ms | " + " | ".join(f"time/{n}" for n in ref)
             + " | peak extra MiB | " + " | ".join(f"mem/{n}" for n in ref) + " | first call s |",
             "|" + "---|" * (5 + 2 * len(ref))]
    for n in names:
        r = res["providers"][n]
        tr = [("" if n == m else f"{res['time_ratios'][f'{n}/{m}']:.2f}") for m in ref]
        mr = [("" if n == m else f"{r['peak_extra_bytes'] / max(1, res['providers'][m]['peak_extra_bytes']):.2f}")
              for m in ref]
        lines.append(f"| {n} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} | " + " | ".join(tr)
                     + f" | {r['peak_extra_bytes'] / 2**20:.1f} | " + " | ".join(mr)
                     + f" | {r['first_call_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="nanogpt-tinyshakespeare",
                    help="a supernet case of benchmarks/shapes.py (the full profile's when names repeat)")
    ap.add_argument("--providers", default="ours[cpu],plain,floor")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(args.case, [p.strip() for p in args.providers.split(",") if p.strip()], args.rounds,
                  args.device, log=lambda m: print(m, file=sys.stderr, flush=True))
    if not res["providers"]:
        print("step_ab: no provider could run", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{res['date']}-step-ab-{res['case']}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"step_ab: wrote {stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

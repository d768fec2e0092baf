"""Where does a supernet training step spend its time? (a diagnostic, not a suite)

    python benchmarks/profile_step.py [--device cuda] [--space nanogpt] [--preset paper]
        [--batch 32] [--providers ours[cuda],plain] [--top 15]

Builds the step exactly as bench_supernet.py does (providers.make_supernet), runs it
twice to warm up, then once under torch.profiler and prints the top operators by
self device time (CUDA) or self CPU time, and the step's wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import providers, shapes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--space", default="nanogpt")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--providers", default=None, help="comma list (default: ours[auto],reference,plain)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    auto = "ours[triton]" if args.device == "cuda" else "ours[cpu]"
    provs = args.providers.split(",") if args.providers else [auto, "reference", "plain"]
    unit = "tokens" if args.space == "nanogpt" else "images"
    case = shapes.SupernetCase(args.space, args.space, args.batch, unit,
                               preset_candidates=(args.preset,) if args.preset else ())
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for p in provs:
        try:
            b = providers.make_supernet(case, p, args.device)
        except providers.Unavailable as e:
            print(f"== {p}: unavailable ({e})")
            continue
        for _ in range(2):
            b.fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            b.fn()
        sync()
        dt = (time.perf_counter() - t0) / 3
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=acts) as prof:
            b.fn()
            sync()
        key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(f"== {p}: {dt * 1e3:.1f} ms/step, {b.items / dt:,.0f} {unit}/s, "
              f"params {b.extra.get('params')}, preset {b.extra.get('preset')}")
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60))
        except Exception as e:  # older/newer column names
            print(f"(profiler table failed: {e})")
            print(prof.key_averages().table(row_limit=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())

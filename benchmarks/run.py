"""Run the benchmark suites and write the results: ONE command.

    python benchmarks/run.py [--device cpu|cuda] [--quick] [--suites superpose,layers,...]

runs the pytest-benchmark suites (bench_superpose.py, bench_layers.py,
bench_supernet.py, sweep_k.py) in one pytest process, then writes

- ``benchmarks/results/<date>-<device>[-quick].json``: ``{"meta": ..., "records": [...]}``,
  one record per (suite, case, provider, mode) with suite, case, provider, mode, shape,
  K, dtype, device, status, median_s, peak_bytes, and the derived bytes_per_s,
  items_per_s, speedup_vs_reference / _compiled_reference / _plain (the other's time
  over this one's: > 1 is faster), mem_vs_* (this peak over the other's), bw_vs_copy
  (bytes/s over the measured ``copy_`` bandwidth of the same weight);
- ``<date>-<device>[-quick].md``: the markdown tables and the targets with their verdicts;
- ``sweep_k-<device>.png``: time and peak memory against K (when matplotlib exists);
- the README.md section between ``<!-- bench:start -->`` and ``<!-- bench:end -->``:
  rebuilt from the latest full run of each device found in the results folder (full
  runs only, unless ``--readme``; never with ``--no-readme``).

A provider or space that cannot run appears as ``unavailable (reason)``; measurements
that would start after the time budget (``--budget-s``) as ``skipped (time budget)``.
Exit status: 0, or 1 when a measurement failed (error records, printed).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH_DIR = ROOT / "benchmarks"
RESULTS = BENCH_DIR / "results"
README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SUITE_FILES = {  # run in this order (the time budget cuts from the end)
    "superpose": "bench_superpose.py",
    "supernet": "bench_supernet.py",
    "sweep_k": "sweep_k.py",
    "layers": "bench_layers.py",
}
DEFAULT_BUDGET = {("cpu", "full"): 780, ("cpu", "quick"): 120, ("cuda", "full"): 230,
                  ("cuda", "quick"): 120, ("cpu", "smoke"): 120, ("cuda", "smoke"): 120}
REF_PROVIDERS = {"reference": "reference", "compiled-reference": "compiled_reference", "plain": "plain",
                 "compiled-plain": "compiled_plain", "floor": "floor",
                 "floor-fused": "floor_fused"}


# ------------------------------------------------------------------ derive
def derive(records: list[dict]) -> list[dict]:
    """Add rates and ratios to the ok records (in place; returns ``records``)."""
    ok = {(r["suite"], r["case"], r["mode"], r["provider"]): r for r in records if r.get("status") == "ok"}
    for r in records:
        if r.get("status") != "ok" or not r.get("median_s"):
            continue
        t = r["median_s"]
        if r["suite"] in ("superpose", "sweep_k") and r.get("bytes"):
            r["bytes_per_s"] = r["bytes"] / t
        if r.get("flops"):
            r["flops_per_s"] = r["flops"] / t
        if r.get("items"):
            r["items_per_s"] = r["items"] / t
        if r["suite"] == "supernet" and r["provider"].startswith("compiled-") and r.get("first_call_s"):
            r["compile_s"] = max(0.0, r["first_call_s"] - t)  # the first call compiled
        for prov, key in REF_PROVIDERS.items():
            o = ok.get((r["suite"], r["case"], r["mode"], prov))
            if o is None or o is r or not o.get("median_s"):
                continue
            r[f"speedup_vs_{key}"] = o["median_s"] / t
            if r.get("peak_bytes") is not None and o.get("peak_bytes"):
                r[f"mem_vs_{key}"] = r["peak_bytes"] / o["peak_bytes"]
            if r.get("peak_total_bytes") and o.get("peak_total_bytes"):
                r[f"mem_total_vs_{key}"] = r["peak_total_bytes"] / o["peak_total_bytes"]
        if r["suite"] == "superpose" and r.get("bytes"):
            c = ok.get(("superpose", r["case"], "fwd", "copy"))
            if c is not None and c.get("median_s") and c.get("bytes"):
                copy_bw = c["bytes"] / c["median_s"]
                r["copy_bytes_per_s"] = copy_bw
                r["bw_vs_copy"] = r["bytes_per_s"] / copy_bw
                r["time_vs_copy_floor"] = t / (r["bytes"] / copy_bw)
    return records


# ------------------------------------------------------------------ targets
def _compiled_targets(records, add) -> None:
    """tangle-search --compile on the nanoGPT supernet step: compiled ours at least as
    fast as eager ours, and compiled ours / compiled plain no worse than eager ours /
    eager plain (the ratio of tokens/s)."""
    c = _get(records, "supernet", "nanogpt", "step", "compiled-ours")
    e = _best_ours(records, "supernet", "nanogpt", "step")
    ok = c is not None and c.get("status") == "ok" and e is not None and c.get("median_s")
    rec = dict(c, vs_eager=e["median_s"] / c["median_s"]) if ok else c
    add("nanoGPT supernet step, compiled ours vs eager ours (>= 1x)", rec, "vs_eager", 1.0,
        why_missing=None if c is not None else "compiled-ours not measured")
    rel = None
    if ok and c.get("speedup_vs_compiled_plain") and e.get("speedup_vs_plain"):
        rel = dict(c, rel=c["speedup_vs_compiled_plain"] / e["speedup_vs_plain"])
    add("nanoGPT supernet step, (compiled ours / compiled plain) vs (eager ours / eager plain) "
        "tokens/s (>= 1x)", rel if rel is not None else c, "rel", 1.0,
        why_missing=None if c is not None else "compiled-ours not measured")


def _get(records, suite, case, mode, provider):
    for r in records:
        if (r["suite"], r["case"], r["mode"], r["provider"]) == (suite, case, mode, provider):
            return r
    return None


def _best_ours(records, suite, case, mode):
    rs = [r for r in records if r["suite"] == suite and r["case"] == case and r["mode"] == mode
          and r["provider"].startswith("ours[") and r.get("status") == "ok"]
    return min(rs, key=lambda r: r["median_s"]) if rs else None


def targets(records: list[dict], device: str) -> list[dict]:
    """The issue's targets, each with the measured ratio and a verdict (pass / MISS /
    n/a when the measurement is missing)."""
    out = []

    def add(name, rec, key, goal, ge=True, fmt="{:.2f}x", why_missing=None):
        val = rec.get(key) if rec else None
        if val is None:
            status = rec.get("status") if rec else None
            out.append({"target": name, "measured": None, "goal": goal, "verdict": "n/a",
                        "note": why_missing or (status if status and status != "ok" else "not measured")})
            return
        ok = val >= goal if ge else val <= goal
        text = fmt(val) if callable(fmt) else fmt.format(val)
        out.append({"target": name, "measured": val, "goal": goal, "verdict": "pass" if ok else "MISS",
                    "text": f"{text} ({rec['provider']})", "provider": rec["provider"], "case": rec["case"]})

    if device == "cpu":
        r = _get(records, "superpose", "gpt2_mlp_up", "fwd+bwd", "ours[cpu]")
        add("superpose fwd+bwd, ours[cpu] vs reference, 768x3072 K=9 (>= 5x)", r, "speedup_vs_reference", 5.0)
        add("superpose fwd+bwd, ours[cpu] vs copy floor, 768x3072 K=9 (<= 2x the floor)", r,
            "time_vs_copy_floor", 2.0, ge=False)
        r = _get(records, "superpose", "conv_256_k27", "fwd+bwd", "ours[cpu]")
        add("superpose fwd+bwd, ours[cpu] vs reference, 256x256x7x7 K=27 (>= 5x)", r, "speedup_vs_reference", 5.0)
        for case in ("nanogpt", "conv-macro"):
            r = _best_ours(records, "supernet", case, "step")
            add(f"supernet step {case}, ours vs the padded-sum supernet (> 1x)", r, "speedup_vs_reference", 1.0)
        r = _best_ours(records, "supernet", "nanogpt-tinyshakespeare", "step")
        add("nanoGPT Tiny Shakespeare supernet step, ours vs the plain max-size GPT tokens/s (>= 0.75x)",
            r, "speedup_vs_plain", 0.75)
        add("nanoGPT Tiny Shakespeare supernet step, ours vs the floor: step time (<= 1.05x)", r,
            "speedup_vs_floor", 1 / 1.05, fmt=lambda v: f"{1 / v:.2f}x the floor's time")
        add("nanoGPT Tiny Shakespeare supernet step, peak memory vs the plain max-size GPT (<= 1.10x)",
            r, "mem_vs_plain", 1.10, ge=False)
        add("nanoGPT Tiny Shakespeare supernet step, ours vs the floor with the same fused attention: "
            "step time (<= 1.10x)", r, "speedup_vs_floor_fused", 1 / 1.10,
            fmt=lambda v: f"{1 / v:.2f}x floor-fused's time")
        _compiled_targets(records, add)
    else:
        for case in ("big_mlp", "gpt2_mlp_up"):
            for mode in ("fwd", "fwd+bwd"):
                r = _best_ours(records, "superpose", case, mode)
                add(f"superpose {mode} {case}: bandwidth vs copy_ (>= 85%)", r, "bw_vs_copy", 0.85,
                    fmt="{:.0%}")
                add(f"superpose {mode} {case}: vs reference (>= 10x)", r, "speedup_vs_reference", 10.0)
                add(f"superpose {mode} {case}: vs torch.compile(reference) (>= 2x)", r,
                    "speedup_vs_compiled_reference", 2.0)
        r = _get(records, "layers", "linear_gpt2_mlp_up", "fwd+bwd", "ours[triton]")
        add("fused linear fwd+bwd (triton) vs plain F.linear, 768->3072 K=9 (time <= 1.10x)", r,
            "speedup_vs_plain", 1 / 1.10, fmt=lambda v: f"{1 / v:.2f}x the time of F.linear")
        r = _get(records, "layers", "linear_gpt2_mlp_up", "fwd+bwd", "ours[cuda]")
        add("linear fwd+bwd, automatic path (superpose[cuda] + cuBLAS) vs plain F.linear, 768->3072 K=9 "
            "(time <= 1.10x)", r, "speedup_vs_plain", 1 / 1.10, fmt=lambda v: f"{1 / v:.2f}x the time of F.linear")
        r = _best_ours(records, "supernet", "nanogpt", "step")
        add("nanoGPT supernet step tokens/s vs the plain max-size GPT (>= 0.9x)", r, "speedup_vs_plain", 0.9)
        add("nanoGPT supernet step peak memory vs the plain max-size GPT (<= 1.1x)", r,
            "mem_total_vs_plain", 1.1, ge=False)
    # memory flatness in K (both devices): ours' peak at the largest K over its peak at K=1
    sw = [r for r in records if r["suite"] == "sweep_k" and r.get("status") == "ok"]
    ours_sw = sorted((r for r in sw if r["provider"].startswith("ours[")), key=lambda r: r["K"])
    if ours_sw:
        prov = ours_sw[0]["provider"]
        mine = [r for r in ours_sw if r["provider"] == prov]
        lo, hi = mine[0], mine[-1]
        n_w = hi["bytes"] / 5  # bytes of one weight (fwd+bwd traffic is 5 weights)
        extra = (hi["peak_bytes"] - lo["peak_bytes"]) / n_w
        out.append({"target": f"sweep: {prov} peak memory flat in K (K={hi['K']} minus K={lo['K']} "
                              f"<= 1 weight-sized tensor)",
                    "measured": extra, "goal": 1.0, "verdict": "pass" if extra <= 1.0 else "MISS",
                    "text": f"{extra:+.2f} weights", "provider": prov, "case": hi["case"]})
    else:
        out.append({"target": "sweep: ours' peak memory flat in K", "measured": None, "goal": 1.0,
                    "verdict": "n/a", "note": "no sweep records"})
    return out


# ----------------------------------------------------------------- markdown
def _ms(t):
    return "" if t is None else (f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.1f}")


def _x(v):
    return "" if v is None else f"{v:.2f}x"


def _mib(b):
    return "" if b is None else f"{b / 2**20:.1f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _status_cell(r):
    return r["status"] if r.get("status") != "ok" else ""


def markdown(meta: dict, records: list[dict], tgts: list[dict], *, level: int = 3,
             compact: bool = False) -> str:
    """The report of one run: header, targets, one table per suite, what was not run.
    ``compact`` (the README): op and layer tables show forward+backward rows only, and
    what was not measured is summarised in one line."""
    h = "#" * level
    ok = [r for r in records if r.get("status") == "ok"]
    if compact:
        ok = [r for r in ok if r["suite"] not in ("superpose", "layers") or r["mode"] == "fwd+bwd"
              or r["provider"] == "copy"]
    parts = [
        f"{h} {meta['device_name']} ({meta['device']}), {meta['date']}, profile {meta['profile']}",
        "",
        f"torch {meta['torch']}, triton {meta.get('triton')}, python {meta['python']}, "
        f"{meta['threads']} CPU threads; timer: {meta['timer']}; peak memory: {meta['mem_method']} "
        f"(peak bytes allocated during one call on top of what was live before). "
        f"Ratios `x` = the other's time / ours (> 1: faster); `mem` = our peak / the other's. "
        f"Run took {meta['wall_s']:.0f} s. Raw records: `{meta['json']}`."
        + (f" Code: commit `{meta['commit']}`." if meta.get("commit") else ""),
        "",
        *([f"> {meta['note']}", ""] if meta.get("note") else []),
        f"{h}# Targets",
        "",
        _table(["target", "measured", "verdict"],
               [[t["target"], t.get("text") or t.get("note", ""),
                 {"pass": "pass", "MISS": "**MISS**", "n/a": "n/a"}[t["verdict"]]] for t in tgts]),
        "",
    ]
    sp = [r for r in ok if r["suite"] == "superpose"]
    if sp:
        rows = []
        for r in sp:
            rows.append([r["case"], f"K={r['K']}", r["mode"], r["provider"], _ms(r["median_s"]),
                         f"{r.get('bytes_per_s', 0) / 1e9:.1f}", "" if r.get("bw_vs_copy") is None else f"{r['bw_vs_copy']:.0%}",
                         _x(r.get("speedup_vs_reference")), _x(r.get("speedup_vs_compiled_reference")),
                         _mib(r.get("peak_bytes")), _x(r.get("mem_vs_reference"))])
        parts += [f"{h}# Superpose op ({sp[0]['dtype']}{', fwd+bwd and copy_' if compact else ''})", "",
                  "GB/s counts the minimal traffic (fwd: read W, write W_mix; fwd+bwd: also read G "
                  "and W, write dW); % copy = that rate over `copy_` of the same weight.", "",
                  _table(["case", "K", "mode", "provider", "ms", "GB/s", "% copy", "x ref",
                          "x compiled", "peak MiB", "mem/ref"], rows), ""]
    ly = [r for r in ok if r["suite"] == "layers"]
    if ly:
        rows = []
        for r in ly:
            rows.append([r["case"], f"K={r['K']}", r["mode"], r["provider"], _ms(r["median_s"]),
                         f"{r.get('flops_per_s', 0) / 1e9:.0f}", _x(r.get("speedup_vs_reference")),
                         _x(r.get("speedup_vs_compiled_reference")),
                         "" if r.get("speedup_vs_plain") is None else f"{1 / r['speedup_vs_plain']:.3f}",
                         _mib(r.get("peak_bytes")), _x(r.get("mem_vs_plain"))])
        parts += [f"{h}# Layers ({ly[0]['dtype']}{', fwd+bwd' if compact else ''})", "",
                  "time/plain = our time over the plain max-size layer's (the limit: 1.00).", "",
                  _table(["case", "K", "mode", "provider", "ms", "GFLOP/s", "x ref", "x compiled",
                          "time/plain", "peak MiB", "mem/plain"], rows), ""]
    sn = [r for r in ok if r["suite"] == "supernet"]
    if sn:
        rows = []
        for r in sn:
            rows.append([r["case"], r["provider"], _ms(r["median_s"]),
                         f"{r.get('items_per_s', 0):,.0f} {r.get('unit', '')}/s",
                         _x(r.get("speedup_vs_reference")),
                         _x(r.get("speedup_vs_compiled_plain") if r["provider"] == "compiled-ours"
                            else r.get("speedup_vs_plain")),
                         "" if not r.get("speedup_vs_floor") else f"{1 / r['speedup_vs_floor']:.2f}",
                         "" if not r.get("speedup_vs_floor_fused") else f"{1 / r['speedup_vs_floor_fused']:.2f}",
                         "" if r.get("compile_s") is None else f"{r['compile_s']:.1f}",
                         _mib(r.get("peak_bytes")), _mib(r.get("peak_total_bytes")),
                         _x(r.get("mem_vs_plain") if r.get("mem_total_vs_plain") is None else r.get("mem_total_vs_plain"))])
        parts += [f"{h}# Supernet training step", "",
                  "One step: forward, backward to the weights and the architecture logits (soft "
                  "arch = softmax), AdamW step. x plain = throughput relative to the plain max-size "
                  "model (compiled-ours: to compiled-plain); mem/plain uses the total peak on CUDA, "
                  "the extra peak on CPU. compiled-*: forward + loss under torch.compile as "
                  "`tangle-search --compile` runs them; compile s = the first call minus one step "
                  "(not in ms/step). floor (nanoGPT): the plain max-size GPT with one extra "
                  "attention call per additional head count in every layer, the least any soft "
                  "relaxation of the heads choice costs with torch's attention; time/floor = step "
                  "time over the floor's. floor-fused (CPU): the floor with its attention calls through "
                  "the fused CPU attention kernel ours runs with dropout (the like-for-like floor).", "",
                  _table(["space", "provider", "ms/step", "throughput", "x ref", "x plain", "time/floor",
                          "time/floor-fused", "compile s",
                          "peak extra MiB", "peak total MiB", "mem/plain"], rows), ""]
    sw = [r for r in ok if r["suite"] == "sweep_k"]
    if sw:
        provs = list(dict.fromkeys(r["provider"] for r in sw))
        ks = sorted({r["K"] for r in sw})
        rows = []
        for K in ks:
            row = [str(K)]
            for p in provs:
                r = next((x for x in sw if x["K"] == K and x["provider"] == p), None)
                row.append("" if r is None else f"{_ms(r['median_s'])} ms / {_mib(r['peak_bytes'])} MiB")
            rows.append(row)
        png = meta.get("png")
        parts += [f"{h}# K sweep (fwd+bwd, {sw[0]['shape'][0]}x{sw[0]['shape'][1]}, {sw[0]['dtype']})", "",
                  _table(["K"] + provs, rows), ""]
        if png:
            parts += [f"![K sweep]({png})", ""]
        elif meta.get("png_note"):
            parts += [f"(no plot: {meta['png_note']})", ""]
    notok = [r for r in records if r.get("status") != "ok"]
    if notok and compact:
        kinds = sorted({r["status"].split(" (")[0] for r in notok})
        parts += [f"Not measured: {len(notok)} records ({', '.join(kinds)}); see the full report "
                  f"`{meta['json'].replace('.json', '.md')}`.", ""]
    elif notok:
        seen: dict = {}
        for r in notok:
            key = (r["suite"], r["provider"], r["status"])
            seen.setdefault(key, []).append(f"{r['case']}/{r['mode']}")
        rows = [[s, p, st, ", ".join(sorted(set(c)))[:200]] for (s, p, st), c in seen.items()]
        parts += [f"{h}# Not measured", "", _table(["suite", "provider", "status", "cases"], rows), ""]
    return "\n".join(parts)


def replace_section(text: str, body: str) -> str:
    """``text`` with everything between the bench markers replaced by ``body``."""
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"README: the markers {START} ... {END} are missing or out of order")
    return text[: i + len(START)] + "\n" + body.strip() + "\n" + text[j:]


def readme_body(results_dir: Path, current: Path | None = None) -> str:
    """The README section: the latest full run of each device in ``results_dir`` (or
    ``current``, a results JSON of any profile, for its device)."""
    parts = ["Regenerate: `python benchmarks/run.py --device cpu` (and `--device cuda` on a GPU "
             "machine; `scripts/gpu_lane.sh` does it). Full tables and raw records: "
             "`benchmarks/results/`.", ""]
    found = False
    for dev in ("cpu", "cuda"):
        files = sorted(p for p in results_dir.glob(f"*-{dev}.json"))
        if current is not None and current.name.split("-")[3] == dev:
            files = [current]
        if not files:
            continue
        found = True
        data = json.loads(files[-1].read_text())
        parts.append(markdown(data["meta"], data["records"], data["targets"], level=3, compact=True))
        parts.append("")
    if not found:
        parts.append("(no full benchmark run recorded yet)")
    return "\n".join(parts)


# ---------------------------------------------------------------------- run
def _git_commit() -> str | None:
    """The measured code: short commit, ``+dirty`` with uncommitted changes (None
    outside a git checkout)."""
    import subprocess

    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True, timeout=10)
        if c.returncode != 0:
            return None
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, timeout=10)
        return c.stdout.strip() + ("+dirty" if d.stdout.strip() else "")
    except Exception:
        return None


def _meta(device: str, profile: str) -> dict:
    import torch

    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        timer = "triton.testing.do_bench (CUDA events, L2 flushed, median) in pytest-benchmark pedantic"
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        timer = "pytest-benchmark pedantic (perf_counter, median)"
    from benchmarks import memory

    return {"device": device, "device_name": name, "profile": profile, "commit": _git_commit(),
            "torch": torch.__version__,
            "triton": tv, "python": platform.python_version(),
            "threads": int(os.environ.get("TANGLE_BENCH_THREADS") or torch.get_num_threads()),
            "timer": timer, "mem_method": memory.METHOD[device]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--quick", action="store_true", help="a ~2 minute subset")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one round (CI smoke test)")
    ap.add_argument("--suites", default=",".join(SUITE_FILES), help="comma list of " + ", ".join(SUITE_FILES))
    ap.add_argument("--budget-s", type=float, default=None,
                    help="no measurement starts after this many seconds (default by device/profile)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--readme", action="store_true", help="also update README for quick/smoke runs")
    ap.add_argument("--no-readme", action="store_true", help="never touch README.md")
    ap.add_argument("--readme-only", action="store_true", help="rebuild the README section from results")
    ap.add_argument("-k", default=None, help="pytest -k filter")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.readme_only:
        README.write_text(replace_section(README.read_text(), readme_body(out)))
        print(f"updated {README}")
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("run.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITE_FILES]
    if bad:
        ap.error(f"--suites: unknown {bad}; choose from {list(SUITE_FILES)}")
    out.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    stem = f"{date}-{device}" + ("" if profile == "full" else f"-{profile}")
    recfile = out / f".{stem}.records.jsonl"
    recfile.unlink(missing_ok=True)
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET[(device, profile)]
    t_start = time.time()
    env = dict(os.environ)
    env.update(TANGLE_BENCH_DEVICE=device, TANGLE_BENCH_PROFILE=profile,
               TANGLE_BENCH_RECORDS=str(recfile), TANGLE_BENCH_DEADLINE=str(t_start + budget),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    env.pop("TANGLE_KERNELS_BACKEND", None)
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    if args.threads:
        env["TANGLE_BENCH_THREADS"] = str(args.threads)
    files = [str(BENCH_DIR / SUITE_FILES[s]) for s in suites]
    cmd = [sys.executable, "-m", "pytest", *files, "-p", "no:cacheprovider", "-q", "-rN",
           "--rootdir", str(ROOT), "-o", "addopts=", "-o", "python_files=bench_*.py sweep_k.py",
           "--benchmark-columns=median,rounds", "--benchmark-sort=name", "--benchmark-group-by=group",
           "--durations=15"]
    if args.k:
        cmd += ["-k", args.k]
    print("run.py:", " ".join(cmd), flush=True)
    # hard stop: budget + time for the measurements in flight (and a compile or two)
    hard = budget + (60 if device == "cuda" else 90)
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=hard)
    except subprocess.TimeoutExpired:
        print(f"run.py: the suites ran past {hard:.0f} s; stopping them (records so far are kept)",
              file=sys.stderr)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = -9
    wall = time.time() - t_start
    records = []
    if recfile.exists():
        records = [json.loads(line) for line in recfile.read_text().splitlines() if line.strip()]
        recfile.unlink()
    derive(records)
    meta = _meta(device, profile)
    meta.update(date=date, wall_s=wall, pytest_rc=rc, json=f"benchmarks/results/{stem}.json",
                suites=suites, budget_s=budget)
    png = None
    if "sweep_k" in suites:
        from benchmarks import sweep_k

        png_path = out / f"sweep_k-{device}{'' if profile == 'full' else '-' + profile}.png"
        note = sweep_k.plot(records, str(png_path))
        if note is None:
            png = png_path.name
            meta["png"] = f"benchmarks/results/{png}" if out.resolve() == RESULTS.resolve() else str(png_path)
        else:
            meta["png_note"] = note
    tg = targets(records, device)
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    jpath.write_text(json.dumps({"meta": meta, "targets": tg, "records": records}, indent=1, default=str))
    md = markdown(meta, records, tg, level=2)
    mpath.write_text(md + "\n")
    print(md)
    print(f"\nrun.py: wrote {jpath} and {mpath} ({len(records)} records, {wall:.0f} s)")
    if not args.no_readme and (profile == "full" or args.readme) and out.resolve() == RESULTS.resolve():
        try:
            README.write_text(replace_section(README.read_text(),
                                              readme_body(out, None if profile == "full" else jpath)))
            print(f"run.py: updated the benchmark section of {README}")
        except (OSError, ValueError) as e:
            print(f"run.py: README not updated: {e}", file=sys.stderr)
    errors = [r for r in records if str(r.get("status", "")).startswith("error")]
    for r in errors:
        print(f"run.py: ERROR {r['suite']}/{r['case']}/{r['provider']}/{r['mode']}: {r['status']}",
              file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

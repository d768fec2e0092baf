"""The measuring core shared by the suites, run.py and the smoke test.

One measurement = one (suite, case, provider, mode): build the provider's callable
(:mod:`benchmarks.providers`), call it once (compilation, autotuning and caches
happen here; the time of that call is recorded as ``first_call_s``), check its
output against the padded-sum reference, time it, then measure its peak memory
(:mod:`benchmarks.memory`). The result is one flat *record* (see :data:`RECORD_KEYS`).

Timing:
- CPU: ``benchmark.pedantic`` of pytest-benchmark (``time.perf_counter`` around each
  call, one call per round, gradients reset before each round outside the timed
  region); the rounds are sized from the first warm call to fill the profile's
  time target. The median is reported.
- CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call,
  gradients reset, median) run inside ``benchmark.pedantic`` with one round; without
  triton, CUDA events around each call.
- Without pytest-benchmark (smoke test): ``time.perf_counter`` around ``rounds`` calls.

Settings come from the environment, set by run.py: ``TANGLE_BENCH_DEVICE`` (cpu,
cuda), ``TANGLE_BENCH_PROFILE`` (full, quick, smoke), ``TANGLE_BENCH_RECORDS`` (the
JSON-lines file each record is appended to), ``TANGLE_BENCH_DEADLINE`` (a Unix time
after which remaining measurements are recorded as ``skipped (time budget)``).
"""

from __future__ import annotations

import math
import os
import statistics
import time
import traceback
from dataclasses import dataclass

import torch

from . import memory, providers, shapes

RECORD_KEYS = (
    "suite", "case", "provider", "mode", "shape", "K", "dtype", "device", "status",
    "median_s", "peak_bytes",
)
"""Keys every record has (``median_s`` / ``peak_bytes`` are None unless status is ok)."""

SUITES = ("superpose", "layers", "supernet", "sweep_k")


@dataclass(frozen=True)
class Settings:
    device: str = "cpu"
    profile: str = "full"
    target_s: float = 0.6     # CPU: time spent timing one measurement
    min_rounds: int = 3
    max_rounds: int = 50
    warmup_ms: float = 10.0   # CUDA do_bench
    rep_ms: float = 50.0
    deadline: float | None = None
    records: str | None = None


def settings() -> Settings:
    dev = os.environ.get("TANGLE_BENCH_DEVICE", "cpu")
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"TANGLE_BENCH_DEVICE: expected cpu or cuda, got {dev!r}")
    prof = os.environ.get("TANGLE_BENCH_PROFILE", "full")
    dl = os.environ.get("TANGLE_BENCH_DEADLINE")
    kw = dict(device=dev, profile=prof, deadline=float(dl) if dl else None,
              records=os.environ.get("TANGLE_BENCH_RECORDS") or None)
    if prof == "quick":
        kw.update(target_s=0.25, min_rounds=2, max_rounds=20, rep_ms=30.0)
    elif prof == "smoke":
        kw.update(target_s=0.0, min_rounds=1, max_rounds=1, warmup_ms=1.0, rep_ms=2.0)
    elif prof != "full":
        raise ValueError(f"TANGLE_BENCH_PROFILE: expected one of {shapes.PROFILES}, got {prof!r}")
    return Settings(**kw)


def dtype_name(dtype: torch.dtype, device: str, matmul: bool = False) -> str:
    name = str(dtype).replace("torch.", "")
    if matmul and device == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        name += " (tf32 matmul)"
    return name


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset(tensors) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t.grad = None


# ------------------------------------------------------------------ timing
def measure(fn, grads, st: Settings, benchmark=None) -> dict:
    """Median seconds of ``fn()`` (see the module docstring for the method)."""
    if st.device == "cuda":
        return _measure_cuda(fn, grads, st, benchmark)
    _reset(grads)
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    rounds = st.min_rounds if warm <= 0 else int(min(st.max_rounds, max(st.min_rounds, math.ceil(st.target_s / warm))))
    if benchmark is not None:
        benchmark.pedantic(fn, setup=lambda: _reset(grads), rounds=rounds, warmup_rounds=0, iterations=1)
        s = benchmark.stats.stats
        return {"median_s": s.median, "min_s": s.min, "iqr_s": s.iqr, "rounds": rounds,
                "timer": "pytest-benchmark pedantic (perf_counter, 1 call/round)"}
    times = []
    for _ in range(rounds):
        _reset(grads)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "iqr_s": None,
            "rounds": rounds, "timer": "perf_counter"}


def _measure_cuda(fn, grads, st: Settings, benchmark) -> dict:
    grads = [t for t in grads if isinstance(t, torch.Tensor)]
    out: dict = {}

    def run():
        try:
            from triton.testing import do_bench
        except Exception:
            do_bench = None
        if do_bench is not None:
            ms = do_bench(fn, warmup=st.warmup_ms, rep=st.rep_ms, grad_to_none=grads or None,
                          return_mode="median")
            out.update(median_s=ms / 1e3, timer="triton.testing.do_bench (CUDA events, L2 flushed, median)")
            return
        times = []
        for _ in range(max(3, st.min_rounds)):
            _reset(grads)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        out.update(median_s=statistics.median(times), timer="CUDA events (median)")

    if benchmark is not None:
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    else:
        run()
    out.setdefault("rounds", None)
    return out


# ----------------------------------------------------------------- records
def base_record(suite, case, provider, mode, shape, K, dtype, device, **extra) -> dict:
    rec = {"suite": suite, "case": case, "provider": provider, "mode": mode,
           "shape": list(shape) if shape is not None else None, "K": K, "dtype": dtype,
           "device": device, "status": "ok", "median_s": None, "peak_bytes": None}
    rec.update(extra)
    return rec


def _past_deadline(st: Settings) -> bool:
    return st.deadline is not None and time.time() > st.deadline


def _rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _tolerance(dtype: torch.dtype, device: str, matmul: bool) -> float:
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2
    if matmul and device == "cuda":
        return 5e-3  # tf32 GEMMs
    return 1e-4 if matmul else 1e-5


def run_bench(rec: dict, make, st: Settings, benchmark=None, *, check: bool = True,
              matmul: bool = False, dtype=torch.float32) -> dict:
    """Fill ``rec`` by building ``make()`` and measuring it; never raises for an
    unavailable provider (status ``unavailable (...)``) or a failure (``error (...)``)."""
    if _past_deadline(st):
        rec["status"] = "skipped (time budget)"
        return rec
    why = shapes.skip_reason(rec["suite"], rec["provider"], st.device)
    if why:
        rec["status"] = why
        return rec
    if rec["provider"].startswith("compiled-"):
        key = f"sweep_K{rec['K']}" if rec["suite"] == "sweep_k" else rec["case"]
        if not shapes.compiles(key, st.device, st.profile):
            rec["status"] = "skipped (compile budget: shapes._COMPILE)"
            return rec
    try:
        bench = make()
    except providers.Unavailable as e:
        rec["status"] = f"unavailable ({e})"
        return rec
    except Exception as e:
        rec["status"] = f"error ({type(e).__name__}: {e})"
        rec["traceback"] = traceback.format_exc(limit=6)
        return rec
    try:
        _reset(bench.grads)
        _sync(st.device)
        t0 = time.perf_counter()
        bench.fn()
        _sync(st.device)
        rec["first_call_s"] = time.perf_counter() - t0
        if check and bench.extra.get("comparable", True) and "out" in bench.extra and rec["mode"] == "fwd":
            out = bench.extra["out"]()  # grad mode as timed (no recompile of compiled code)
            with torch.no_grad():
                err = _rel_err(out, bench.extra["reference_out"]())
            del out
            rec["max_rel_err"] = err
            tol = _tolerance(dtype, st.device, matmul)
            if not err <= tol:
                rec["status"] = f"error (wrong result: max relative error {err:.2e} > {tol:.0e} vs the padded-sum)"
                return rec
        rec.update(measure(bench.fn, bench.grads, st, benchmark))
        _reset(bench.grads)
        rec["peak_bytes"], total = memory.peak_bytes(bench.fn, st.device)
        rec["mem_method"] = memory.METHOD[st.device]
        if total is not None and rec["suite"] == "supernet":
            rec["peak_total_bytes"] = total
        _reset(bench.grads)
    except Exception as e:
        rec["status"] = f"error ({type(e).__name__}: {e})"
        rec["traceback"] = traceback.format_exc(limit=8)
        rec["median_s"] = None
        return rec
    mode = rec["mode"]
    rec["bytes"] = bench.bytes_fwd if mode == "fwd" else bench.bytes_fwdbwd
    if bench.flops_fwd:
        rec["flops"] = bench.flops_fwd * (1 if mode == "fwd" else 3)
    if bench.items:
        rec["items"] = bench.items
    for k in ("preset", "params", "note"):
        if k in bench.extra:
            rec[k] = bench.extra[k]
    return rec


# ------------------------------------------------------------------ suites
def op_params(st: Settings) -> list[tuple]:
    out = []
    for case in shapes.op_cases(st.device, st.profile):
        for prov in providers.op_providers(st.device):
            for mode in providers.MODES:
                if prov == "copy" and mode != "fwd":
                    continue
                out.append((case.name, prov, mode))
    return out


def run_op(case_name: str, provider: str, mode: str, st: Settings, benchmark=None,
           dtype=torch.float32) -> dict:
    case = shapes.OPS[case_name]
    rec = base_record("superpose", case.name, provider, mode, case.shape, case.K,
                      dtype_name(dtype, st.device), st.device)
    return run_bench(rec, lambda: providers.make_op(case, provider, mode, st.device, dtype), st,
                     benchmark, check=provider != "copy", dtype=dtype)


def layer_params(st: Settings) -> list[tuple]:
    return [(c.name, p, m) for c in shapes.layer_cases(st.device, st.profile)
            for p in providers.layer_providers(st.device) for m in providers.MODES]


def _layer_case(name: str, st: Settings) -> shapes.LayerCase:
    table = shapes.LAYERS["cuda" if st.device == "cuda" and st.profile != "smoke" else "cpu"]
    return table[name]


def run_layer(case_name: str, provider: str, mode: str, st: Settings, benchmark=None,
              dtype=torch.float32) -> dict:
    case = _layer_case(case_name, st)
    oc = case.op_case
    if case.kind == "linear":
        desc = {"tokens": case.tokens}
    elif case.kind == "conv":
        desc = {"batch": case.batch, "hw": case.hw, "groups": case.groups}
    else:
        desc = {"batch": case.batch, "seq": case.seq, "embeds": list(case.attn[0]),
                "heads": list(case.attn[1]), "head_dim": case.attn[2]}
    rec = base_record("layers", case.name, provider, mode, oc.shape, oc.K,
                      dtype_name(dtype, st.device, matmul=True), st.device, kind=case.kind, input=desc)
    return run_bench(rec, lambda: providers.make_layer(case, provider, mode, st.device, dtype), st,
                     benchmark, matmul=True, dtype=dtype)


def supernet_params(st: Settings) -> list[tuple]:
    return [(c.name, p) for c in shapes.supernet_cases(st.device, st.profile)
            for p in providers.supernet_providers(st.device)]


def run_supernet(case_name: str, provider: str, st: Settings, benchmark=None) -> dict:
    case = next(c for c in shapes.supernet_cases(st.device, st.profile) if c.name == case_name)
    rec = base_record("supernet", case.name, provider, "step", None, None,
                      dtype_name(torch.float32, st.device, matmul=True), st.device,
                      unit=case.unit, batch=case.batch)
    try:
        space, _ = providers.make_space(case)
        rec["K"] = space.num_architectures()
    except providers.Unavailable:
        pass
    except Exception:
        pass
    return run_bench(rec, lambda: providers.make_supernet(case, provider, st.device), st,
                     benchmark, check=False)


SWEEP_PROVIDERS_BY_DEVICE = {"cpu": ("ours[cpu]", "reference", "compiled-reference", "masksum"),
                             "cuda": ("ours[triton]", "ours[cuda]", "reference", "compiled-reference", "masksum")}


def sweep_params(st: Settings) -> list[tuple]:
    _, ks = shapes.sweep_case(st.device, st.profile)
    return [(K, p) for K in ks for p in SWEEP_PROVIDERS_BY_DEVICE[st.device]]


def run_sweep(K: int, provider: str, st: Settings, benchmark=None, dtype=torch.float32) -> dict:
    shape, _ = shapes.sweep_case(st.device, st.profile)
    name = f"sweep_{shape[0]}x{shape[1]}_K{K}"
    if name not in shapes.OPS:
        shapes.OPS[name] = shapes.OpCase(name, shape, lambda: shapes.sweep_layout(shape, K),
                                         f"K sweep: {K} prefix candidates")
    rec = base_record("sweep_k", name, provider, "fwd+bwd", shape, K,
                      dtype_name(dtype, st.device), st.device)
    return run_bench(rec, lambda: providers.make_op(shapes.OPS[name], provider, "fwd+bwd", st.device, dtype),
                     st, benchmark, dtype=dtype)

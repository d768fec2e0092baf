"""A measured latency table for a :class:`~tangle_kernels.nn.cost.CostModel`: every
entangled layer's plain module, for every assignment of its own choices, timed on the
device the user names with the input it sees in the supernet, summed per architecture
and in expectation exactly as the parameters and MACs are.

Why a table and not a formula: latency is what the device does, not a count (the same
MACs run at very different speeds as a matmul, an attention or a small LayerNorm).
Why per layer: the architectures of a space are a product of few per-layer options, so
a table of a few dozen timings prices all of them, and the expectation under the
per-choice probabilities is the same multilinear polynomial as for the other costs
(differentiable, exact for the table).

A sum of layer timings misses what lies between the entangled layers (activations,
residual additions, the Python overhead of the module calls), and inside a repeated
block that grows with the depth. So every block of a (top-level)
:class:`~tangle_kernels.nn.DepthMixer` is timed whole, extracted for every assignment
of the choices its layers use, and priced when the depth reaches it; its layers are not
timed alone. What remains outside the blocks (the embedding lookups, the top-level
forward, and what between the layers grows with the model: activations, residual
additions) is measured once: the extracted plain models of the largest, the smallest
and ``fit_archs`` (6) seeded random architectures are timed whole, interleaved with the
table's own timings, and the table is mapped onto them, ``scale * sum + rest_ms`` with
the least squared relative error (``info["scale"]``, ``info["rest_ms"]``; the tables
are stored scaled, so every cost is a plain sum plus ``rest_ms``). ``info["check"]``
keeps each of them (measured, unscaled table, remainder).

Each timing: a few warm-up calls, then rounds of enough calls to last ``min_time``
seconds, the fastest round (CUDA synchronised around each round). All the timings of
one table are interleaved (:func:`time_many`: round r of every module, then round r + 1),
so the machine's slow moments fall on all of them alike and the table's entries are
comparable with each other, which is what a sum of them needs. Under
``torch.no_grad`` in eval mode, at the batch of ``example`` (a product's latency is
usually batch 1: pass a batch of one). The table is cached as JSON under
``$TANGLE_CACHE/latency`` (default ``~/.cache/tangle_kernels/latency``), keyed by the
supernet's structure, the choices, the input, the device, the torch version and the
thread count; a stale or unreadable cache file is measured again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .arch import end_index
from .cost import CostError, CostModel

__all__ = ["add_latency", "attach", "table_of", "time_many", "time_ms", "latency_cache_dir"]

VERSION = 3


def latency_cache_dir() -> str:
    root = os.environ.get("TANGLE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tangle_kernels")
    return os.path.join(root, "latency")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calls_for(fn, device: torch.device, min_time: float, warmup: int) -> int:
    """Warm ``fn`` up; the number of calls that lasts at least ``min_time`` seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        t = time.perf_counter() - t0
        if t >= min_time or n >= 1 << 16:
            return n
        n = max(n * 2, int(n * min_time / max(t, 1e-9)) + 1)


def time_many(fns, device: torch.device | str = "cpu", *, min_time: float = 0.005,
              rounds: int = 7, warmup: int = 3) -> list[float]:
    """Milliseconds per call of each of ``fns`` (see the module docstring): calls per
    round calibrated per function, then ``rounds`` passes that time every function once
    in turn (a slow moment of the machine falls on all of them alike, not on the few
    that happened to run then), the fastest round of each. The fastest, not the median:
    on a shared CPU the noise (preemption, another tenant, a frequency dip) only ever
    adds time."""
    device = torch.device(device)
    calls = [_calls_for(fn, device, min_time, warmup) for fn in fns]
    best = [math.inf] * len(fns)
    for _ in range(max(1, rounds)):
        for i, fn in enumerate(fns):
            n = calls[i]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            best[i] = min(best[i], (time.perf_counter() - t0) / n)
    return [1e3 * b for b in best]


def time_ms(fn, device: torch.device | str = "cpu", *, min_time: float = 0.005,
            rounds: int = 7, warmup: int = 3) -> float:
    """Milliseconds per call of ``fn()``: :func:`time_many` of one function."""
    return time_many([fn], device, min_time=min_time, rounds=rounds, warmup=warmup)[0]


def _time_module(m: nn.Module, x: Any, device: torch.device, min_time: float) -> float:
    """Milliseconds of ``m(x)`` alone."""
    return _time_modules([(m, x)], device, min_time)[0]


def _time_modules(pairs, device: torch.device, min_time: float) -> list[float]:
    """Milliseconds of each ``m(x)`` of ``pairs``, interleaved (every timing of the table
    goes through here)."""
    return time_many([lambda m=m, x=x: m(x) for m, x in pairs], device, min_time=min_time)


def _layout(m: nn.Module) -> tuple[int, int] | None:
    """``(dim, width)`` of the input feature axis ``m`` expects (dim -1: channels last),
    from its first layer that says; None when none does."""
    from . import plain

    for sub in m.modules():
        if isinstance(sub, nn.Linear):
            return -1, sub.in_features
        if isinstance(sub, plain.SelfAttention):
            return -1, sub.embed_dim
        if isinstance(sub, nn.LayerNorm):
            return -1, int(sub.normalized_shape[-1])
        if isinstance(sub, nn.Conv2d):
            return 1, sub.in_channels
        if isinstance(sub, nn.BatchNorm2d):
            return 1, sub.num_features
    return None


def _input_for(m: nn.Module, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device, g: torch.Generator, path: str) -> torch.Tensor:
    if not dtype.is_floating_point:  # token ids (an embedding)
        hi = getattr(m, "num_embeddings", None)
        if hi is None:
            raise CostError(f"latency: {path} takes integer inputs but is not an embedding")
        return torch.randint(0, hi, shape, generator=g).to(device)
    lay = _layout(m)
    if lay is None:
        raise CostError(f"latency: cannot tell the input width of {path} "
                        f"({type(m).__name__}); no Linear, Conv2d or norm layer in it")
    dim, width = lay
    shape = list(shape)
    shape[dim] = width
    return torch.randn(shape, generator=g, dtype=dtype).to(device)


def _blocks(supernet: nn.Module) -> list[tuple[str, Any, int, nn.Module]]:
    """``(unit path prefix, mixer, j, block)`` of every block of the DepthMixers not
    inside another mixer (their paths as CostModel names its units)."""
    from .mixers import DepthMixer, OpMixer

    out = []

    def walk(m, path):
        if isinstance(m, DepthMixer):
            out.extend((f"{path}blocks.{j}.", m, j, b) for j, b in enumerate(m.blocks))
            return
        if isinstance(m, OpMixer):
            return
        for n, c in m.named_children():
            walk(c, f"{path}{n}.")

    walk(supernet, "")
    return out


def _block_units(cm: CostModel, supernet: nn.Module) -> list:
    """Latency units of the whole blocks: names = the choices their layers use (the
    depth among them), the layers inside priced at 0 in the latency table."""
    from .cost import _Unit

    units = []
    for prefix, mixer, j, blk in _blocks(supernet):
        inner = [u for u in cm._units if (u.path + ".").startswith(prefix)]
        if not inner:
            continue
        names = tuple(dict.fromkeys(n for u in inner for n in u.names))
        if mixer.depth not in names:
            names = names + (mixer.depth,)
        u = _Unit(prefix + "#block", blk, names)
        u._cond = {mixer.depth: {v for v in mixer.choices[mixer.depth] if v > j}}
        u.params = torch.zeros([len(cm.choices[n]) for n in names], dtype=torch.float64)
        units.append((u, inner))
    return units


def _key(cm: CostModel, supernet: nn.Module, example: Any, device: torch.device) -> str:
    desc = {
        "version": VERSION,
        "structure": [(u.path, type(u.module).__name__ if u.module is not None else None,
                       list(u.names)) for u in cm._units + cm._latency_units],
        "choices": {n: [str(v) for v in vals] for n, vals in cm.choices.items()},
        "params": sum(p.numel() for p in supernet.parameters()),
        "example": [list(example.shape), str(example.dtype)] if torch.is_tensor(example)
        else repr(type(example)),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _load(path: str, cm: CostModel) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        tables = d["tables"]
        for u in cm._units + cm._latency_units:
            t = torch.tensor(tables[u.path], dtype=torch.float64)
            if list(t.shape) != [len(cm.choices[n]) for n in u.names]:
                return None
        return d
    except (OSError, ValueError, KeyError, TypeError):
        return None


def add_latency(cm: CostModel, supernet: nn.Module, example: Any, *,
                device: torch.device | str | None = None, min_time: float = 0.005,
                cache: bool | str = True, fit_archs: int = 6, log=None) -> dict:
    """Measure (or read from the cache) the latency table of ``cm`` and attach it
    (``cm.latency(selection)``, ``cm.expected(probs, "latency")``, in ms). ``example``:
    an input batch of ``supernet`` (its batch size is the latency's). ``cache``: True
    (the default folder), a folder, or False. ``fit_archs``: how many architectures
    besides the largest and the smallest are timed whole to map the table onto.
    Returns ``cm.latency_info``."""
    from .convert import extract

    device = torch.device(device) if device is not None else next(
        (p.device for p in supernet.parameters()), torch.device("cpu"))
    if torch.is_tensor(example):
        example = example.to(device)
    blocks = _block_units(cm, supernet)
    cm._latency_units = [u for u, _ in blocks]
    key = _key(cm, supernet, example, device)
    folder = latency_cache_dir() if cache is True else (cache or None)
    path = os.path.join(folder, f"{key}.json") if folder else None
    d = _load(path, cm) if path and os.path.exists(path) else None
    if d is not None:
        d["info"]["cached"] = path
        return attach(cm, d)

    if not cm._inputs or any(id(u.module) not in cm._inputs for u, _ in blocks):
        cm._inputs.clear()
        extra = {id(u.module) for u, _ in blocks}
        cm._record(supernet, example, extra=extra)
    in_block = {id(v) for _, inner in blocks for v in inner}
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    # first every timing the table needs is listed (its entries hold job numbers + 1),
    # then all are timed together, interleaved (time_many), then the numbers replaced
    jobs: list = []

    def job(m, x) -> float:
        jobs.append((m, x))
        return float(len(jobs))

    tabled = []
    with torch.no_grad():
        for u, _ in blocks:
            rec = cm._inputs.get(id(u.module))
            if rec is None:
                u.latency = torch.zeros_like(u.params)
                continue
            shape, dtype = rec

            def timed(sel, u=u, shape=shape, dtype=dtype):
                m = extract(u.module, sel).to(device).eval()
                return job(m, _input_for(m, shape, dtype, device, g, u.path))

            u.latency = _block_table(cm, u, timed)
            tabled.append(u)
        for u in cm._units:
            if id(u) in in_block:  # timed with its block
                u.latency = torch.zeros_like(u.params)
                continue
            if u.module is None:  # parameters used inside their owner's forward: in rest
                u.latency = torch.zeros_like(u.params)
                continue
            rec = cm._inputs.get(id(u.module))
            if rec is None:  # never ran (no depth reaches it)
                u.latency = torch.zeros_like(u.params)
                continue
            shape, dtype = rec

            def count(m, u=u, shape=shape, dtype=dtype):
                m = m.to(device).eval()
                return job(m, _input_for(m, shape, dtype, device, g, u.path))

            u.latency = cm._table(u, count)
            tabled.append(u)
        ends = {}
        for end, sel in _fit_archs(cm.choices, fit_archs):
            ends[end] = (sel, int(job(extract(supernet, sel).to(device).eval(), example)))
        times = torch.tensor([0.0] + _time_modules(jobs, device, min_time), dtype=torch.float64)
        for u in tabled:
            u.latency = times[u.latency.round().long()]
        whole = {}
        cm.latency_info = {"rest_ms": 0.0}
        for end, (sel, j) in ends.items():
            ms, table = float(times[j]), cm.cost(sel, "latency")
            whole[end] = {"arch": {n: str(v) for n, v in sel.items()}, "measured_ms": ms,
                          "table_ms": table, "rest_ms": ms - table}
        del jobs
    scale, rest = _fit_whole(whole)
    for u in tabled:
        u.latency = u.latency * scale
    info = {
        "rest_ms": rest,
        "scale": scale,
        "check": whole,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": list(example.shape) if torch.is_tensor(example) else None,
        "measure_s": round(time.perf_counter() - t0, 2),
        "key": key,
    }
    attach(cm, table_of(cm, info))
    if log is not None:
        log(f"latency table: {sum(int(u.latency.count_nonzero()) for u in cm._units)} "
            f"timings in {info['measure_s']:.1f} s on {device} (scale {scale:.2f}, rest "
            f"{rest:.3f} ms)")
    if path:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(table_of(cm, info), f)
        os.replace(tmp, path)
    return info


def _fit_archs(choices: Mapping[str, list], n: int) -> list[tuple[str, dict]]:
    """The architectures timed whole to map the table onto: the largest (``max``) and the
    smallest (``min``; the first value of a choice that is not sized, ``is_sized``) and
    up to ``n`` more drawn uniformly (seeded: the same ones on every call), all distinct."""
    import random

    def pick(end):
        return {k: v[i if (i := end_index(v, end)) is not None else 0]
                for k, v in choices.items()}

    out = [("max", pick("max")), ("min", pick("min"))]
    seen = {tuple(sorted(map(str, sel.items()))) for _, sel in out}
    rng = random.Random(0)
    total = math.prod(len(v) for v in choices.values())
    while len(out) < 2 + n and len(seen) < total:
        sel = {k: rng.choice(list(v)) for k, v in choices.items()}
        key = tuple(sorted(map(str, sel.items())))
        if key not in seen:
            seen.add(key)
            out.append((f"fit{len(out) - 2}", sel))
    return out


def _fit_whole(whole: Mapping[str, Mapping[str, float]]) -> tuple[float, float]:
    """``(scale, rest_ms)`` of ``scale * table + rest`` against the whole models timed:
    least squares in the relative error (``sum ((scale * t + rest) / m - 1) ** 2``) over
    all of them; with only the two ends, equal to both. What lies between the layers
    grows with the model (activations, residual additions) as well as costing a constant
    (the top-level forward). A scale outside [0.25, 4] or a fit that prices a timed model
    at <= 0 (the models too close to tell, or a timing gone wrong) falls back to 1 and
    the mean remainder."""
    ws = [w for w in whole.values() if w["measured_ms"] > 0]
    if len({round(w["table_ms"], 12) for w in ws}) >= 2:
        a = torch.tensor([[w["table_ms"] / w["measured_ms"], 1.0 / w["measured_ms"]]
                          for w in ws], dtype=torch.float64)
        b = torch.ones(len(ws), 1, dtype=torch.float64)
        scale, rest = (float(v) for v in torch.linalg.lstsq(a, b).solution.flatten())
        if math.isfinite(scale) and math.isfinite(rest) and 0.25 <= scale <= 4.0 and all(
                scale * w["table_ms"] + rest > 0 for w in ws):
            return scale, rest
    return 1.0, max(0.0, statistics.fmean(w["rest_ms"] for w in whole.values()))


def _block_table(cm: CostModel, u, timed) -> torch.Tensor:
    """A block's table over ``u.names``: its time where the depth reaches it, 0 elsewhere
    (one timing per assignment of the choices other than the depth)."""
    import itertools

    shape = [len(cm.choices[n]) for n in u.names]
    t = torch.zeros(shape, dtype=torch.float64)
    cache: dict[tuple, float] = {}
    for idx in itertools.product(*[range(k) for k in shape]):
        sel = {n: cm.choices[n][i] for n, i in zip(u.names, idx)}
        if not all(sel[n] in allowed for n, allowed in u._cond.items()):
            continue
        key = tuple(v for n, v in sel.items() if n not in u._cond)
        if key not in cache:
            cache[key] = float(timed({n: v for n, v in sel.items() if n not in u._cond}))
        t[idx] = cache[key]
    return t


def table_of(cm: CostModel, info: Mapping | None = None) -> dict:
    """``cm``'s latency table as plain data (``{"info", "tables"}``): what the cache
    holds and what DDP rank 0 sends the others, so that every rank prices alike."""
    return {"info": dict(info if info is not None else cm.latency_info),
            "tables": {u.path: u.latency.tolist() for u in cm._units + cm._latency_units}}


def attach(cm: CostModel, payload: Mapping, supernet: nn.Module | None = None) -> dict:
    """Set ``cm``'s latency table from :func:`table_of`'s data; returns its info.
    ``supernet``: the model of ``cm`` (needed the first time, for its blocks)."""
    tables = payload["tables"]
    if supernet is not None and not cm._latency_units:
        cm._latency_units = [u for u, _ in _block_units(cm, supernet)]
    units = cm._units + cm._latency_units
    missing = [u.path for u in units if u.path not in tables]
    if missing:
        raise CostError(f"latency table: no timings for {missing[:3]}")
    for u in units:
        t = torch.tensor(tables[u.path], dtype=torch.float64)
        if list(t.shape) != [len(cm.choices[n]) for n in u.names]:
            raise CostError(f"latency table: {u.path} has shape {list(t.shape)}, the model "
                            f"needs {[len(cm.choices[n]) for n in u.names]}")
        u.latency = t
    cm.latency_info = dict(payload["info"])
    return cm.latency_info

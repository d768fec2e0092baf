"""Search quality: does a sampler find a good architecture, and how good?

One command (CPU)::

    python benchmarks/search_quality.py                                  # embedded corpus
    python benchmarks/search_quality.py --data ../shared/data/tinyshakespeare.txt

1. **Reference distribution**: every architecture of the space (a uniform sample of
   ``--reference-sample`` when the space has more than ``--max-reference``) trained from
   scratch with the main command's retrain budget (``retrain_steps`` steps, the space's
   search defaults for batch, lr and schedule, seed ``--reference-seed``, the same
   validation batches for all). Trained in a fixed random order and appended one line
   per architecture to ``reference.jsonl`` in the work folder: an interrupted run keeps
   what it finished, is a uniform sample meanwhile, and resumes where it stopped.
2. **Samplers** (drnas, darts, gdas, sparsemax, spos+evolution, spos+random) at equal
   wall-clock over ``--seeds``: the time budget is the default search (drnas,
   ``steps``) of the same seed; each other sampler gets the number of steps that fits in
   it (its time per step measured on a short probe; SPOS also pays its selection stage
   out of it). Each run: the derived architecture, how decided it was (final
   probabilities, entropy), its supernet validation loss, search time, and its
   from-scratch validation loss = its entry in the reference (trained identically:
   same seed, same steps, same batches), hence its percentile. One line per run in
   ``runs.jsonl`` (resumable).
3. **Random search** at the same wall-clock: architectures drawn uniformly without
   replacement and trained from scratch with the same budget, as many as fit in the
   budget (at least one), the best by validation loss kept. Its trainings are the
   reference's trainings (same seed and batches: the results are identical), so it is
   computed from the reference table and its recorded training times, not re-run.

Outputs: ``--out``/<date>-search-quality[-TAG].json and .md, the alpha trajectories of
one seed per sampler (``<date>-search-quality[-TAG]-alphas.png``), and a README section
between ``<!-- search-quality:start -->`` and ``<!-- search-quality:end -->``
(``--no-readme`` to skip). ``--quick`` (tests/CI): the tiny preset, a few steps.

Percentile: the share of the reference distribution that beats the derived
architecture (strictly lower validation loss): 0% = the best architecture of the
space; "top 25%" means a percentile below 25.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SAMPLER_RUNS = {
    # name: (optimizer, spos_search)
    "drnas": ("drnas", None),
    "darts": ("darts", None),
    "gdas": ("gdas", None),
    "sparsemax": ("sparsemax", None),
    "spos+evolution": ("spos", "evolution"),
    "spos+random": ("spos", "random"),
}
ALL_METHODS = [*SAMPLER_RUNS, "random-search"]
README_START = "<!-- search-quality:start -->"
README_END = "<!-- search-quality:end -->"


# ----------------------------------------------------------------------------- helpers


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _key(sel: Mapping[str, Any]) -> str:
    return json.dumps({k: sel[k] for k in sorted(sel)}, sort_keys=True)


def _read_jsonl(path: str) -> list[dict]:
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interrupt: redo that entry
                continue
    return out


def _repair_jsonl(path: str) -> None:
    """Drop a last line cut by an interrupt (so the next append starts a fresh line)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    good = []
    for line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        good.append(line if line.endswith("\n") else line + "\n")
    if good != lines:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(good)
        os.replace(tmp, path)


def _append_jsonl(path: str, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def entropy(p: Sequence[float]) -> float:
    return float(-sum(x * math.log(x) for x in p if x > 0))


def decidedness(probs: Mapping[str, Sequence[float]]) -> dict:
    """Per choice: max probability, entropy and entropy / log(K) (1 = uniform)."""
    out = {}
    for n, p in probs.items():
        k = len(p)
        h = entropy(p)
        out[n] = {
            "max_prob": round(max(p), 4),
            "entropy": round(h, 4),
            "norm_entropy": round(h / math.log(k), 4) if k > 1 else 0.0,
        }
    return out


def percentile(loss: float, ref_losses: Sequence[float]) -> float:
    """Share (%) of the reference that is strictly better than ``loss``."""
    return 100.0 * sum(1 for r in ref_losses if r < loss) / len(ref_losses)


# ----------------------------------------------------------------------------- setup


class Bench:
    def __init__(self, args):
        import torch

        from tangle_kernels.search.cli import _parse_choices, _parse_hps
        from tangle_kernels.search.engine import SearchConfig
        from tangle_kernels.spaces import make_space

        torch.set_num_threads(args.threads)
        self.args = args
        self.space = make_space(
            args.space,
            choices=_parse_choices(args.choice),
            hparams=_parse_hps(args.hp),
            preset=args.preset,
        )
        self.data = self.space.make_data(args.data)
        d = SearchConfig().to_dict()
        d.update(getattr(self.space, "search_defaults", {}) or {})
        d.update(_parse_hps(args.set, what="--set"))
        if args.steps is not None:
            d["steps"] = args.steps
        self.base_cfg = d
        self.config_hash = hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()
                                        ).hexdigest()[:10]
        # the settings that differ from SearchConfig's defaults: a new setting whose default
        # keeps the old behaviour does not invalidate recorded runs
        dflt = SearchConfig().to_dict()
        self.config_diff = {k: v for k, v in d.items() if k not in dflt or dflt[k] != v}
        self.config_hashes = {
            self.config_hash,
            hashlib.sha1(json.dumps(self.config_diff, sort_keys=True, default=str).encode()
                         ).hexdigest()[:10],
        }
        self.retrain_steps = args.retrain_steps
        # the retrain budget: the settings train_from_scratch reads
        self.retrain_cfg = {
            k: d[k]
            for k in ("batch_size", "lr", "lr_min", "w_optimizer", "momentum", "weight_decay",
                      "grad_clip", "eval_batches", "eval_batch_size", "precision")
        }
        data_id = getattr(self.data, "name", str(args.data))
        if args.data not in (None, "synthetic") and os.path.isfile(args.data):
            st = os.stat(args.data)
            data_id = f"{os.path.basename(args.data)}:{st.st_size}"
        # the space as its choices and the hparams that differ from the class defaults (a
        # new hparam whose default keeps the old model does not invalidate the cache)
        defaults = type(self.space).default_hparams
        space_id = {
            "name": self.space.name,
            "choices": self.space.choices,
            "hparams": {k: v for k, v in self.space.hparams.items()
                        if k not in defaults or defaults[k] != v},
        }
        if args.preset:
            space_id["preset"] = args.preset
        ident = {
            "space": space_id,
            "data": data_id,
            "retrain": self.retrain_cfg,
            "retrain_steps": self.retrain_steps,
            "reference_seed": args.reference_seed,
        }
        self.ident = ident
        h = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
        tag = args.tag or _default_tag(args)
        self.tag = tag
        self.work = args.work or os.path.join(ROOT, "benchmarks", "results", "search_quality",
                                              f"{tag}-{h}")
        os.makedirs(self.work, exist_ok=True)
        with open(os.path.join(self.work, "ident.json"), "w", encoding="utf-8") as f:
            json.dump(ident, f, indent=1, sort_keys=True)
        self.ref_path = os.path.join(self.work, "reference.jsonl")
        self.runs_path = os.path.join(self.work, "runs.jsonl")
        self.run_root = args.run_root or os.path.join(ROOT, "runs", "search_quality",
                                                      f"{tag}-{h}")
        os.makedirs(self.run_root, exist_ok=True)

    def cfg(self, **kw):
        from tangle_kernels.search.engine import SearchConfig

        d = dict(self.base_cfg)
        d.update(kw)
        return SearchConfig.from_dict(d)

    # ------------------------------------------------------------------ reference
    def all_selections(self) -> list[dict]:
        names = list(self.space.choices)
        sels = [dict(zip(names, vals)) for vals in
                itertools.product(*(self.space.choices[n] for n in names))]
        rng = random.Random(12345)
        rng.shuffle(sels)  # a prefix of this order is a uniform sample
        if len(sels) > self.args.max_reference:
            sels = sels[: self.args.reference_sample]
        return sels

    def reference(self) -> dict[str, dict]:
        """Train the missing reference architectures; returns key -> record."""
        from tangle_kernels.search.engine import _eval_batches, train_from_scratch

        sels = self.all_selections()
        _repair_jsonl(self.ref_path)
        done = {r["key"]: r for r in _read_jsonl(self.ref_path)}
        todo = [s for s in sels if _key(s) not in done]
        if todo and not self.args.no_train_reference:
            cfg = self.cfg(seed=self.args.reference_seed)
            eval_set = _eval_batches(self.data, cfg, "cpu")
            _log(f"reference: {len(done)}/{len(sels)} done, training {len(todo)} "
                 f"({self.retrain_steps} steps each) -> {self.ref_path}")
            t_all = time.perf_counter()
            for i, sel in enumerate(todo):
                res = train_from_scratch(self.space, self.data, sel, cfg,
                                         steps=self.retrain_steps, eval_set=eval_set,
                                         seed=self.args.reference_seed)
                rec = {"key": _key(sel), "arch": sel, "val_loss": res["val"]["loss"],
                       "params": res["params"], "time_s": res["time_s"],
                       "train_loss": res["train_loss"]}
                _append_jsonl(self.ref_path, rec)
                done[rec["key"]] = rec
                el = time.perf_counter() - t_all
                eta = el / (i + 1) * (len(todo) - i - 1)
                _log(f"reference [{len(done)}/{len(sels)}] {self.space.describe(sel)}: "
                     f"val {rec['val_loss']:.4f} ({rec['time_s']:.0f} s; ETA {eta / 60:.1f} min)")
        wanted = {_key(s) for s in sels}
        return {k: v for k, v in done.items() if k in wanted}

    # ------------------------------------------------------------------ searches
    def _search(self, name: str, seed: int, steps: int, *, probe: bool = False) -> dict:
        from tangle_kernels.search.engine import Search

        opt, spos_search = SAMPLER_RUNS[name]
        kw = dict(optimizer=opt, seed=seed, steps=steps, retrain_steps=0,
                  checkpoint_every=0, log_every=1)
        if spos_search:
            kw["spos_search"] = spos_search
        cfg = self.cfg(**kw)
        out = os.path.join(self.run_root,
                           f"probe{os.getpid()}-{name}" if probe else f"{name}-s{seed}")
        if os.path.isdir(out):
            shutil.rmtree(out)
        # SPOS + evolution and SPOS + random train the same supernet (same seed, steps and
        # uniform samples) and differ only in the selection stage: the second one resumes
        # the first one's final checkpoint and runs its own selection; its search time =
        # the first one's supernet training time + its own selection and evaluation.
        shared, t_train = None, 0.0
        if opt == "spos" and not probe:
            other = "spos+random" if spos_search == "evolution" else "spos+evolution"
            src = os.path.join(self.run_root, f"{other}-s{seed}")
            info = os.path.join(src, "supernet.json")
            if os.path.exists(info):
                with open(info, encoding="utf-8") as f:
                    meta = json.load(f)
                if meta.get("steps") == steps and meta.get("config") == self.config_diff and \
                        os.path.exists(os.path.join(src, "checkpoint.pt")):
                    shared, t_train = src, float(meta["train_time"])
        if shared is not None:
            os.makedirs(out)
            shutil.copy(os.path.join(shared, "checkpoint.pt"), os.path.join(out, "checkpoint.pt"))
            shutil.copy(os.path.join(shared, "metrics.jsonl"), os.path.join(out, "metrics.jsonl"))
        s = Search(self.space, self.data, cfg, out=out, device="cpu", progress=False,
                   log=lambda m: None, resume=shared is not None)
        t0 = time.perf_counter()
        res = s.run()
        t = time.perf_counter() - t0 + t_train
        res["_time"] = t
        res["_out"] = out
        res["_step_times"] = _step_times(os.path.join(out, "metrics.jsonl"))
        if shared is not None:
            res["_shared_supernet"] = os.path.basename(shared)
        if opt == "spos" and not probe and shared is None:
            recs = [r for r in _read_jsonl(os.path.join(out, "metrics.jsonl"))
                    if r.get("kind") == "train" and "time" in r]
            with open(os.path.join(out, "supernet.json"), "w", encoding="utf-8") as f:
                json.dump({"steps": steps, "config": self.config_diff,
                           "train_time": recs[-1]["time"] if recs else 0.0}, f)
        else:
            try:
                os.remove(os.path.join(out, "checkpoint.pt"))
            except OSError:
                pass
        return res

    def step_time(self, name: str) -> float:
        """Seconds per search step of sampler ``name`` (median of a short probe)."""
        n = self.args.probe_steps
        res = self._search(name, 10_000, n, probe=True)
        dts = res["_step_times"][2:] or res["_step_times"]
        shutil.rmtree(res["_out"], ignore_errors=True)
        return statistics.median(dts)

    def runs(self, ref: dict[str, dict]) -> list[dict]:
        methods = [m for m in self.args.samplers if m in SAMPLER_RUNS]
        _repair_jsonl(self.runs_path)
        # runs of other search settings (older defaults) are not reused
        done = {(r["method"], r["seed"]): r for r in _read_jsonl(self.runs_path)
                if r.get("config_hash") in self.config_hashes}
        base_steps = int(self.base_cfg["steps"])
        probe_path = os.path.join(self.work, "probes.json")
        probes: dict[str, float] = {}
        if os.path.exists(probe_path):
            with open(probe_path, encoding="utf-8") as f:
                probes = json.load(f)
        for seed in self.args.seeds:
            budget = None
            if ("drnas", seed) in done:
                budget = done[("drnas", seed)]["search_time_s"]
            for m in (["drnas"] if "drnas" not in methods else []) + methods:
                if (m, seed) in done:
                    continue
                if m == "drnas":
                    steps = base_steps
                else:
                    if budget is None:
                        raise SystemExit("drnas must run first (it sets the time budget)")
                    pk = "spos" if m.startswith("spos") else m  # one SPOS supernet
                    if pk not in probes:
                        # back to back, so that both see the same machine load
                        t_d, t_m = self.step_time("drnas"), self.step_time(m)
                        probes[pk] = {"drnas": t_d, m: t_m, "ratio": t_d / t_m}
                        with open(probe_path, "w", encoding="utf-8") as f:
                            json.dump(probes, f, indent=1)
                        _log(f"probe: {m} {t_m:.3f} s/step, drnas {t_d:.3f} s/step")
                    # equal wall-clock: the drnas search's steps, scaled by step-time ratio;
                    # SPOS pays its selection stage (~ its evaluations) out of the budget
                    ratio = probes[pk]["ratio"]
                    steps = max(1, int(round(base_steps * ratio)))
                    if m.startswith("spos"):
                        t_step = budget / base_steps / ratio  # this sampler's s/step now
                        steps = self._spos_steps(m, seed, budget, t_step, steps)
                _log(f"search {m} seed {seed}: {steps} steps")
                res = self._search(m, seed, steps)
                rec = self._record(m, seed, steps, res, ref)
                _append_jsonl(self.runs_path, rec)
                done[(m, seed)] = rec
                if m == "drnas":
                    budget = rec["search_time_s"]
                _log(f"  -> {rec['arch_str']}  val(scratch) {rec['scratch_val']}  "
                     f"percentile {rec['percentile']}  {rec['search_time_s']:.0f} s")
        return [done[(m, s)] for s in self.args.seeds for m in methods if (m, s) in done]

    def _spos_steps(self, m, seed, budget, t_step, steps) -> int:
        # selection stage: spos_budget evaluations of spos_eval_batches batches (one-hot)
        cfg = self.cfg()
        t_eval = self.args.spos_eval_cost or (t_step * 0.35 * cfg.spos_eval_batches)
        sel_cost = cfg.spos_budget * t_eval
        return max(1, int((budget - sel_cost - 0.05 * budget) / t_step))

    def _record(self, m: str, seed: int, steps: int, res: dict, ref: dict) -> dict:
        arch = res["arch"]
        k = _key(arch)
        losses = [r["val_loss"] for r in ref.values()]
        scratch = ref[k]["val_loss"] if k in ref else None
        rec = {
            "method": m,
            "seed": seed,
            "config_hash": sorted(self.config_hashes - {self.config_hash})[0],
            "config": self.config_diff,
            "steps": steps,
            "arch": arch,
            "arch_str": res["arch_str"],
            "search_time_s": round(res["_time"], 2),
            "val_supernet": res["val_supernet"]["loss"],
            "scratch_val": scratch,
            "percentile": round(percentile(scratch, losses), 2) if scratch is not None else None,
            "rank": (1 + sum(1 for x in losses if x < scratch)) if scratch is not None else None,
            "probs": res.get("probs"),
            "decided": decidedness(res["probs"]) if SAMPLER_RUNS[m][0] != "spos" else None,
            "decision": res.get("decided"),
            "shared_supernet": res.get("_shared_supernet"),
            "metrics": os.path.relpath(os.path.join(res["_out"], "metrics.jsonl"), ROOT),
        }
        return rec


def _step_times(metrics_path: str) -> list[float]:
    ts = [r["time"] for r in _read_jsonl(metrics_path) if r.get("kind") == "train" and "time" in r]
    return [b - a for a, b in zip(ts, ts[1:])]


def random_search_from_reference(ref: dict[str, dict], budget_s: float, seed: int) -> dict:
    """Plain random search at ``budget_s``: uniform draws without replacement, each
    trained from scratch (the reference's training and time), best validation loss."""
    recs = sorted(ref.values(), key=lambda r: r["key"])
    rng = random.Random(1000 + seed)
    order = rng.sample(recs, len(recs))
    picked, t = [], 0.0
    for r in order:
        if picked and t + r["time_s"] > budget_s:
            break
        picked.append(r)
        t += r["time_s"]
    best = min(picked, key=lambda r: r["val_loss"])
    losses = [r["val_loss"] for r in recs]
    return {
        "method": "random-search",
        "seed": seed,
        "steps": None,
        "trained": len(picked),
        "arch": best["arch"],
        "arch_str": " ".join(f"{n}={best['arch'][n]}" for n in best["arch"]),
        "search_time_s": round(t, 2),
        "val_supernet": None,
        "scratch_val": best["val_loss"],
        "percentile": round(percentile(best["val_loss"], losses), 2),
        "rank": 1 + sum(1 for x in losses if x < best["val_loss"]),
        "probs": None,
        "decided": None,
    }


def _default_tag(args) -> str:
    if args.quick:
        return "quick"
    if args.data in (None, "", "default"):
        return "sonnets"
    if args.data == "synthetic":
        return "synthetic"
    return os.path.splitext(os.path.basename(args.data))[0]


# ----------------------------------------------------------------------------- report


def summarize(rows: list[dict], methods: Sequence[str]) -> list[dict]:
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m and r["percentile"] is not None]
        if not rs:
            continue
        ps = [r["percentile"] for r in rs]
        out.append({
            "method": m,
            "seeds": len(rs),
            "pct_mean": round(statistics.mean(ps), 1),
            "pct_std": round(statistics.stdev(ps), 1) if len(ps) > 1 else 0.0,
            "pct_min": min(ps),
            "pct_max": max(ps),
            "top25": sum(1 for p in ps if p < 25),
            "val_mean": round(statistics.mean(r["scratch_val"] for r in rs), 4),
            "time_mean": round(statistics.mean(r["search_time_s"] for r in rs), 1),
            "steps": sorted({r["steps"] for r in rs if r.get("steps")}),
        })
    return out


def ordering_verdict(summary: list[dict]) -> str:
    """Does DrNAS beat SPOS + random / evolution (mean percentile over seeds)?"""
    s = {r["method"]: r for r in summary}
    if "drnas" not in s:
        return "DrNAS was not run: the paper's ordering is not tested."
    d = s["drnas"]
    parts, holds, clear = [], True, True
    for m in ("spos+random", "spos+evolution"):
        if m not in s:
            continue
        o = s[m]
        rel = "ahead of" if d["pct_mean"] < o["pct_mean"] else "not ahead of"
        holds &= d["pct_mean"] < o["pct_mean"]
        clear &= d["pct_max"] < o["pct_min"]  # every DrNAS seed beats every SPOS seed
        parts.append(f"{rel} {m} ({d['pct_mean']:.1f}% vs {o['pct_mean']:.1f}%)")
    if not parts:
        return "SPOS was not run: the paper's ordering is not tested."
    out = (f"DrNAS (mean percentile over {d['seeds']} seeds, lower is better) is "
           + "; ".join(parts) + ": the paper's ordering (DrNAS ahead of SPOS + "
           f"random/evolution) {'holds' if holds else 'does NOT hold'} here")
    if holds:
        out += (" (every DrNAS seed ranks above every SPOS seed)." if clear else
                " (but the ranges over seeds overlap).")
    else:
        out += "."
    best = min(summary, key=lambda r: r["pct_mean"])
    if best["method"] != "drnas":
        out += (f" Best method: {best['method']} ({best['pct_mean']:.1f}%).")
    return out


def write_outputs(bench: Bench, ref: dict, rows: list[dict], summary: list[dict],
                  png: str | None, args) -> tuple[str, str]:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    suffix = "" if bench.tag == "sonnets" else f"-{bench.tag}"
    base = os.path.join(args.out, f"{date}-search-quality{suffix}")
    losses = sorted(r["val_loss"] for r in ref.values())
    n_space = bench.space.num_architectures()
    import torch

    doc = {
        "date": date,
        "tag": bench.tag,
        "ident": bench.ident,
        "search_config": bench.base_cfg,
        "threads": args.threads,
        "torch": torch.__version__,
        "reference": {
            "n": len(ref),
            "space_size": n_space,
            "complete": len(ref) == min(n_space, args.max_reference if n_space <= args.max_reference else args.reference_sample),
            "best": losses[0] if losses else None,
            "q25": losses[max(0, math.ceil(0.25 * len(losses)) - 1)] if losses else None,
            "median": statistics.median(losses) if losses else None,
            "worst": losses[-1] if losses else None,
            "records": sorted(ref.values(), key=lambda r: r["val_loss"]),
        },
        "runs": rows,
        "summary": summary,
        "ordering": ordering_verdict(summary),
        "alphas_png": os.path.relpath(png, ROOT) if png else None,
    }
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    md = render_md(doc, bench)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    return base + ".json", base + ".md"


def render_md(doc: dict, bench: Bench) -> str:
    ref = doc["reference"]
    cfg = doc["search_config"]
    L = []
    L.append(f"### Search quality: {bench.space.name} on {doc['ident']['data']} ({doc['date']})")
    L.append("")
    L.append(
        f"Reference: {ref['n']} of {ref['space_size']} architectures trained from scratch "
        f"({doc['ident']['retrain_steps']} steps, batch {cfg['batch_size']}, lr {cfg['lr']}, "
        f"seed {doc['ident']['reference_seed']}, {cfg['eval_batches']} fixed validation "
        f"batches){'' if ref['complete'] else ' — INCOMPLETE'}: val loss best "
        f"{_f(ref['best'])}, top-25% cut {_f(ref['q25'])}, median {_f(ref['median'])}, worst "
        f"{_f(ref['worst'])}. Percentile = share of the reference that beats the derived "
        f"architecture (0% = the best; top 25% = below 25%). Searches at equal wall-clock "
        f"(the default DrNAS search of each seed, {cfg['steps']} steps), "
        f"{doc['threads']} CPU thread(s); random search = as many from-scratch trainings "
        f"as fit in that time (computed from the reference's trainings)."
    )
    L.append("")
    L.append("| method | seeds | percentile mean | spread (sd; min-max) | in top 25% | "
             "scratch val mean | search s | steps |")
    L.append("|---|---|---|---|---|---|---|---|")
    for s in doc["summary"]:
        L.append(f"| {s['method']} | {s['seeds']} | {s['pct_mean']:.1f}% | {s['pct_std']:.1f} "
                 f"({s['pct_min']:.1f}-{s['pct_max']:.1f}) | {s['top25']}/{s['seeds']} | "
                 f"{s['val_mean']:.4f} | {s['time_mean']:.0f} | "
                 f"{','.join(map(str, s['steps'])) or '-'} |")
    L.append("")
    L.append(f"**Ordering**: {doc['ordering']}")
    L.append("")
    L.append("Runs:")
    L.append("")
    L.append("| method | seed | derived architecture | scratch val | rank | percentile | "
             "max prob per choice | search s |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in doc["runs"]:
        dec = r.get("decided")
        mp = " ".join(f"{n} {v['max_prob']:.2f}" for n, v in dec.items()) if dec else "-"
        if r["method"] == "random-search":
            mp = f"{r['trained']} trained"
        L.append(f"| {r['method']} | {r['seed']} | {r['arch_str']} | {_f(r['scratch_val'])} | "
                 f"{r['rank']}/{ref['n']} | {_f(r['percentile'], 1)}% | {mp} | "
                 f"{r['search_time_s']:.0f} |")
    if doc.get("alphas_png"):
        L.append("")
        L.append(f"![alpha trajectories]({doc['alphas_png']})")
    L.append("")
    return "\n".join(L)


def _f(x, nd=4):
    return "-" if x is None else f"{x:.{nd}f}"


def plot_trajectories(bench: Bench, rows: list[dict], path: str) -> str | None:
    """One row of panels per sampler (first seed): probability of each value vs step."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except Exception:
        return None
    from tangle_kernels.search.plot import read_probs

    seed0 = bench.args.seeds[0]
    sel = [r for r in rows if r["seed"] == seed0 and r.get("decided") and r.get("metrics")]
    sel = [r for r in sel if os.path.exists(os.path.join(ROOT, r["metrics"]))]
    if not sel:
        return None
    names = list(bench.space.choices)
    fig, axes = plt.subplots(len(sel), len(names), figsize=(3.3 * len(names), 2.3 * len(sel)),
                             squeeze=False)
    for i, r in enumerate(sel):
        steps, probs = read_probs(os.path.join(ROOT, r["metrics"]))
        for j, n in enumerate(names):
            ax = axes[i][j]
            for v_i, v in enumerate(bench.space.choices[n]):
                ax.plot(steps, [p[v_i] for p in probs.get(n, [])], label=str(v), lw=1.2)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(n)
            if j == 0:
                ax.set_ylabel(f"{r['method']}\nprob")
            if i == len(sel) - 1:
                ax.set_xlabel("step")
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"alpha trajectories, seed {seed0} ({bench.tag})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def update_readme(md_paths: Sequence[str], readme: str) -> None:
    """Replace the README section between the markers by the .md reports."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    body = [README_START,
            "Regenerate: `python benchmarks/search_quality.py` (embedded corpus) and "
            "`python benchmarks/search_quality.py --data ../shared/data/tinyshakespeare.txt`."
            " Full records: `benchmarks/results/*-search-quality*.json`.", ""]
    for p in md_paths:
        with open(p, encoding="utf-8") as f:
            body.append(f.read().replace("### Search quality", "#### Search quality"))
    body.append(README_END)
    block = "\n".join(body)
    if README_START in text and README_END in text:
        a = text.index(README_START)
        b = text.index(README_END) + len(README_END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n## Search quality\n\n" + block + "\n"
    with open(readme, "w", encoding="utf-8") as f:
        f.write(text)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="nanogpt")
    p.add_argument("--preset", default=None)
    p.add_argument("--choice", action="append", default=[], metavar="NAME=V1,V2")
    p.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a search setting (all runs)")
    p.add_argument("--data", default=None, help="text file (default: the embedded corpus)")
    p.add_argument("--steps", type=int, default=None,
                   help="search steps of the default (drnas) run (default: the space's)")
    p.add_argument("--retrain-steps", type=int, default=400,
                   help="from-scratch training steps (the main command's: 400)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samplers", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    p.add_argument("--reference-seed", type=int, default=0)
    p.add_argument("--max-reference", type=int, default=60)
    p.add_argument("--reference-sample", type=int, default=40)
    p.add_argument("--stage", choices=("all", "reference", "runs", "report"), default="all")
    p.add_argument("--no-train-reference", action="store_true",
                   help="use the reference records there are, train none")
    p.add_argument("--probe-steps", type=int, default=12)
    p.add_argument("--spos-eval-cost", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default=None)
    p.add_argument("--work", default=None, help="cache folder (reference.jsonl, runs.jsonl)")
    p.add_argument("--run-root", default=None, help="folder of the search runs' metrics")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: tiny preset, few steps (not a measurement)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        if args.preset is None:
            args.preset = "tiny"
        args.hp = ["block_size=16", *args.hp]
        if args.steps is None:
            args.steps = 6
        if args.retrain_steps == 400:
            args.retrain_steps = 4
        args.set = ["batch_size=4", "eval_batches=2", "spos_budget=4", "spos_population=2",
                    "spos_eval_batches=1", *args.set]
        args.probe_steps = min(args.probe_steps, 4)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    bench = Bench(args)
    ref = bench.reference() if args.stage in ("all", "reference") else \
        {r["key"]: r for r in _read_jsonl(bench.ref_path)}
    if args.stage == "reference":
        return 0
    if not ref:
        raise SystemExit("no reference records: run the reference stage first")
    rows: list[dict] = []
    if args.stage in ("all", "runs"):
        rows = bench.runs(ref)
    else:
        rows = [r for r in _read_jsonl(bench.runs_path) if r["seed"] in args.seeds
                and r.get("config_hash") in bench.config_hashes and r["method"] in args.samplers]
        last = {(r["method"], r["seed"]): r for r in rows}
        rows = list(last.values())
    # fill percentiles of runs recorded before the reference held their arch
    losses = [r["val_loss"] for r in ref.values()]
    for r in rows:
        k = _key(r["arch"])
        if k in ref:
            r["scratch_val"] = ref[k]["val_loss"]
            r["percentile"] = round(percentile(r["scratch_val"], losses), 2)
            r["rank"] = 1 + sum(1 for x in losses if x < r["scratch_val"])
    if "random-search" in args.samplers:
        for seed in args.seeds:
            b = [r for r in rows if r["method"] == "drnas" and r["seed"] == seed]
            if b:
                rows.append(random_search_from_reference(ref, b[0]["search_time_s"], seed))
    methods = [m for m in ALL_METHODS if m in args.samplers]
    rows.sort(key=lambda r: (methods.index(r["method"]), r["seed"]))
    summary = summarize(rows, methods)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    suffix = "" if bench.tag == "sonnets" else f"-{bench.tag}"
    os.makedirs(args.out, exist_ok=True)
    png = plot_trajectories(bench, rows, os.path.join(args.out,
                                                      f"{date}-search-quality{suffix}-alphas.png"))
    jp, mp = write_outputs(bench, ref, rows, summary, png, args)
    with open(mp, encoding="utf-8") as f:
        print(f.read())
    if not args.no_readme:
        mds = sorted(
            os.path.join(args.out, f) for f in os.listdir(args.out)
            if f.endswith(".md") and "-search-quality" in f and "quick" not in f
        )
        latest: dict[str, str] = {}
        for pth in mds:  # the latest report per tag
            t = os.path.basename(pth)[len("YYYY-MM-DD-search-quality"):]
            latest[t] = pth
        update_readme(sorted(latest.values()), args.readme)
    _log(f"wrote {jp}, {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

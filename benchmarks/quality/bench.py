"""The benchmark's runs: the reference distribution, the searches, random search.

Built on the public API of ``tangle_kernels.search`` (:func:`build_config`,
:class:`Search`, :func:`train_from_scratch`, the run-file helpers of ``runlog``); see
``benchmarks/quality/__init__.py`` for what is measured.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tangle_kernels.search.runlog import append_jsonl, read_jsonl, repair_jsonl, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sampler_runs() -> dict[str, tuple[str, str | None]]:
    """name -> (sampler, spos_search): every trained sampler of the registry, then SPOS
    with each of its selection stages."""
    from tangle_kernels.search.samplers import SAMPLERS

    first = ["drnas", "darts", "gdas", "sparsemax"]  # the order of the recorded reports
    names = first + [n for n, c in SAMPLERS.items() if c.trains_arch and n not in first]
    runs: dict[str, tuple[str, str | None]] = {n: (n, None) for n in names if n in SAMPLERS}
    runs["spos+evolution"] = ("spos", "evolution")
    runs["spos+random"] = ("spos", "random")
    return runs


#: name: (sampler, spos_search), from the sampler registry
SAMPLER_RUNS = _sampler_runs()
ALL_METHODS = [*SAMPLER_RUNS, "random-search"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


_log = log


def _key(sel: Mapping[str, Any]) -> str:
    return json.dumps({k: sel[k] for k in sorted(sel)}, sort_keys=True)


def decidedness(decided: Mapping | None) -> dict | None:
    """Per choice: max probability, entropy and entropy / log(K) (1 = uniform), from the
    library's decision report (``arch.json['decided']``); None for SPOS."""
    if not decided or "choices" not in decided:
        return None
    keep = ("max_prob", "entropy", "norm_entropy")
    return {n: {k: v[k] for k in keep} for n, v in decided["choices"].items()}


def percentile(loss: float, ref_losses: Sequence[float]) -> float:
    """Share (%) of the reference that is strictly better than ``loss``."""
    return 100.0 * sum(1 for r in ref_losses if r < loss) / len(ref_losses)


class Bench:
    def __init__(self, args):
        import torch

        from tangle_kernels.search import SearchConfig, build_config
        from tangle_kernels.search.config import parse_assignments, parse_choices
        from tangle_kernels.spaces import make_space

        torch.set_num_threads(args.threads)
        self.args = args
        self.space = make_space(
            args.space,
            choices=parse_choices(args.choice),
            hparams=parse_assignments(args.hp),
            preset=args.preset,
        )
        self.data = self.space.make_data(args.data)
        # defaults <- the space's search defaults <- --steps <- --set (the CLI's layering)
        d = build_config(self.space, {"steps": args.steps},
                         parse_assignments(args.set, what="--set")).to_dict()
        if d.get("select") == "race" and not d.get("race_steps"):
            d["race_steps"] = args.retrain_steps  # the race at the retraining's budget
        self.base_cfg = d
        hd = search_settings(d)
        self.config_hash = hashlib.sha1(json.dumps(hd, sort_keys=True, default=str).encode()
                                        ).hexdigest()[:10]
        # the settings that differ from SearchConfig's defaults: a new setting whose default
        # keeps the old behaviour does not invalidate recorded runs
        dflt = SearchConfig().to_dict()
        self.config_diff = {k: v for k, v in hd.items() if k not in dflt or dflt[k] != v}
        if hd.get("select") == "race":  # explicit: its default changed (RACE_PICK_BEFORE)
            self.config_diff["race_pick"] = hd["race_pick"]
        if _budgeted(hd):  # explicit: its default changed (BUDGET_MODE_BEFORE)
            self.config_diff["budget_mode"] = hd["budget_mode"]
        self.config_hashes = {
            self.config_hash,
            hashlib.sha1(json.dumps(self.config_diff, sort_keys=True, default=str).encode()
                         ).hexdigest()[:10],
        }
        # per-method settings (--method-set METHOD:FIELD=VALUE): part of that method's
        # runs' config and hash only, so the DrNAS run that sets the time budget is shared
        self.method_extra: dict[str, dict] = {}
        for a in getattr(args, "method_set", None) or []:
            m, sep, kv = a.partition(":")
            if not sep or m not in ALL_METHODS or m == "drnas":
                raise SystemExit(f"--method-set {a!r}: expected METHOD:FIELD=VALUE with METHOD "
                                 f"one of {', '.join(x for x in ALL_METHODS if x != 'drnas')}")
            self.method_extra.setdefault(m, {}).update(parse_assignments([kv], what="--method-set"))
        # explicit for GDAS: its gradient's default changed (GDAS_GRAD_BEFORE), so that a
        # run of the old default is not taken for one of today's
        if "gdas" in SAMPLER_RUNS:
            self.method_extra.setdefault("gdas", {}).setdefault(
                "gdas_grad", SearchConfig().to_dict()["gdas_grad"])
        self.retrain_steps = args.retrain_steps
        # the retrain budget: the settings train_from_scratch reads
        self.retrain_cfg = {
            k: d[k]
            for k in ("batch_size", "lr", "lr_min", "w_optimizer", "momentum", "weight_decay",
                      "grad_clip", "eval_batches", "eval_batch_size", "precision")
        }
        data_id = getattr(self.data, "name", str(args.data))
        corpus = getattr(args, "corpus_ident", None)
        if corpus:  # a piece of the held-out protocol: named by its source, range and hash
            data_id = corpus
        elif args.data not in (None, "synthetic") and os.path.isfile(args.data):
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
        write_json(os.path.join(self.work, "ident.json"), ident, indent=1)
        self.ref_path = os.path.join(self.work, "reference.jsonl")
        self.runs_path = os.path.join(self.work, "runs.jsonl")
        self.run_root = args.run_root or os.path.join(ROOT, "runs", "search_quality",
                                                      f"{tag}-{h}")
        os.makedirs(self.run_root, exist_ok=True)

    def method_config(self, m: str) -> dict:
        """The settings of method ``m``'s runs (as recorded): the benchmark's, then its own."""
        return {**self.config_diff, **self.method_extra.get(m, {})}

    def method_hash(self, m: str) -> str:
        return hashlib.sha1(json.dumps(self.method_config(m), sort_keys=True, default=str)
                            .encode()).hexdigest()[:10]

    def hashes_for(self, m: str) -> set[str]:
        """The config hashes a recorded run of ``m`` may carry to be one of these runs."""
        return {self.method_hash(m)} if self.method_extra.get(m) else self.config_hashes

    def cfg(self, **kw):
        from tangle_kernels.search import SearchConfig
        from tangle_kernels.search.config import default_select

        d = dict(self.base_cfg)
        d.update(kw)
        d["select"] = default_select(d)  # as build_config does (SPOS: its own selection)
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
        from tangle_kernels.search import train_from_scratch
        from tangle_kernels.search.common import eval_batches

        sels = self.all_selections()
        repair_jsonl(self.ref_path)
        done = {r["key"]: r for r in read_jsonl(self.ref_path)}
        todo = [s for s in sels if _key(s) not in done]
        if todo and not self.args.no_train_reference:
            cfg = self.cfg(seed=self.args.reference_seed)
            eval_set = eval_batches(self.data, cfg, "cpu")
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
                append_jsonl(self.ref_path, rec)
                done[rec["key"]] = rec
                el = time.perf_counter() - t_all
                eta = el / (i + 1) * (len(todo) - i - 1)
                _log(f"reference [{len(done)}/{len(sels)}] {self.space.describe(sel)}: "
                     f"val {rec['val_loss']:.4f} ({rec['time_s']:.0f} s; ETA {eta / 60:.1f} min)")
        wanted = {_key(s) for s in sels}
        return {k: v for k, v in done.items() if k in wanted}

    # ------------------------------------------------------------------ searches
    def _search(self, name: str, seed: int, steps: int, *, probe: bool = False) -> dict:
        from tangle_kernels.search import Search

        opt, spos_search = SAMPLER_RUNS[name]
        kw = dict(sampler=opt, seed=seed, steps=steps, retrain_steps=0,
                  checkpoint_every=0, log_every=1)
        if spos_search:
            kw["spos_search"] = spos_search
        kw.update(self.method_extra.get(name, {}))
        cfg = self.cfg(**kw)
        tag = self.method_hash(name) if self.method_extra.get(name) else self.config_hash
        out = os.path.join(self.run_root,
                           f"probe{os.getpid()}-{name}" if probe else
                           f"{name}-{tag}-s{seed}")
        if os.path.isdir(out):
            shutil.rmtree(out)
        # SPOS + evolution and SPOS + random train the same supernet (same seed, steps and
        # uniform samples) and differ only in the selection stage: the second one resumes
        # the first one's final checkpoint and runs its own selection; its search time =
        # the first one's supernet training time + its own selection and evaluation.
        shared, t_train = None, 0.0
        if opt == "spos" and not probe:
            other = "spos+random" if spos_search == "evolution" else "spos+evolution"
            otag = self.method_hash(other) if self.method_extra.get(other) else self.config_hash
            src = os.path.join(self.run_root, f"{other}-{otag}-s{seed}")
            info = os.path.join(src, "supernet.json")
            if os.path.exists(info):
                with open(info, encoding="utf-8") as f:
                    meta = json.load(f)
                if meta.get("steps") == steps and \
                        meta.get("config") == self.method_config(name) and \
                        os.path.exists(os.path.join(src, "checkpoint.pt")):
                    shared, t_train = src, float(meta["train_time"])
        if shared is not None:
            os.makedirs(out)
            shutil.copy(os.path.join(shared, "checkpoint.pt"), os.path.join(out, "checkpoint.pt"))
            shutil.copy(os.path.join(shared, "metrics.jsonl"), os.path.join(out, "metrics.jsonl"))
        s = Search(self.space, self.data, cfg, out=out, device="cpu", progress=False,
                   log=lambda m: None, resume=shared is not None, overwrite=shared is None)
        t0 = time.perf_counter()
        res = s.run()
        t = time.perf_counter() - t0 + t_train
        res["_time"] = t
        res["_out"] = out
        res["_step_times"] = _step_times(os.path.join(out, "metrics.jsonl"))
        if shared is not None:
            res["_shared_supernet"] = os.path.basename(shared)
        if opt == "spos" and not probe and shared is None:
            recs = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl"))
                    if r.get("kind") == "train" and "time" in r]
            write_json(os.path.join(out, "supernet.json"),
                       {"steps": steps, "config": self.method_config(name),
                        "train_time": recs[-1]["time"] if recs else 0.0}, indent=None)
        elif not getattr(self.args, "keep_checkpoints", False):
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
        repair_jsonl(self.runs_path)
        # runs of other search settings (older defaults) are not reused
        done = {(r["method"], r["seed"]): r for r in read_jsonl(self.runs_path)
                if r.get("config_hash") in self.hashes_for(r["method"])
                or ("config" in r and method_settings(r["method"], r["config"]) ==
                    self.method_config(r["method"]))}
        base_steps = int(self.base_cfg["steps"])
        probe_path = os.path.join(self.work, "probes.json")
        probes: dict[str, float] = {}
        if os.path.exists(probe_path):
            with open(probe_path, encoding="utf-8") as f:
                probes = json.load(f)
        for seed in self.args.seeds:
            budget = None
            race_s = 0.0  # the drnas run's race (from-scratch trainings), not its steps
            if ("drnas", seed) in done:
                budget = done[("drnas", seed)]["search_time_s"]
                race_s = _race_time(done[("drnas", seed)])
            for m in (["drnas"] if "drnas" not in methods else []) + methods:
                if (m, seed) in done:
                    continue
                if m == "drnas":
                    steps = base_steps
                else:
                    if budget is None:
                        raise SystemExit("drnas must run first (it sets the time budget)")
                    pk = "spos" if m.startswith("spos") else m  # one SPOS supernet
                    if self.method_extra.get(m):  # its own settings: its own step time
                        pk += "|" + json.dumps(self.method_extra[m], sort_keys=True)
                    if pk not in probes:
                        # back to back, so that both see the same machine load, twice
                        # (alternating), the faster of each kept: a loaded moment in one
                        # probe does not set the other's step count
                        pairs = [(self.step_time("drnas"), self.step_time(m)) for _ in range(2)]
                        t_d, t_m = min(p[0] for p in pairs), min(p[1] for p in pairs)
                        probes[pk] = {"drnas": t_d, m: t_m, "ratio": t_d / t_m}
                        write_json(probe_path, probes, indent=1)
                        _log(f"probe: {m} {t_m:.3f} s/step, drnas {t_d:.3f} s/step")
                    # equal wall-clock: the drnas search's steps, scaled by step-time ratio;
                    # SPOS pays its selection stage (~ its evaluations) out of the budget
                    ratio = probes[pk]["ratio"]
                    steps = max(1, int(round(base_steps * ratio)))
                    if m.startswith("spos"):
                        # this sampler's s/step now
                        t_step = max(budget - race_s, 1e-9) / base_steps / ratio
                        steps = self._spos_steps(m, seed, budget, t_step, steps)
                _log(f"search {m} seed {seed}: {steps} steps")
                res = self._search(m, seed, steps)
                rec = self._record(m, seed, steps, res, ref)
                append_jsonl(self.runs_path, rec)
                done[(m, seed)] = rec
                if m == "drnas":
                    budget = rec["search_time_s"]
                    race_s = _race_time(rec)
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
        # under a budget: the percentile among the reference architectures within it
        losses = [r["val_loss"] for r in in_budget(ref, self.base_cfg).values()]
        scratch = ref[k]["val_loss"] if k in ref else None
        rec = {
            "method": m,
            "seed": seed,
            "config_hash": self.method_hash(m),
            "config": self.method_config(m),
            "steps": steps,
            "arch": arch,
            "arch_str": res["arch_str"],
            "search_time_s": round(res["_time"], 2),
            "val_supernet": res["val_supernet"]["loss"],
            "scratch_val": scratch,
            "percentile": round(percentile(scratch, losses), 2) if scratch is not None else None,
            "rank": (1 + sum(1 for x in losses if x < scratch)) if scratch is not None else None,
            "probs": res.get("probs"),
            "decided": decidedness(res.get("decided")),
            "decision": res.get("decided"),
            "shared_supernet": res.get("_shared_supernet"),
            "race": res.get("race"),
            "metrics": os.path.relpath(os.path.join(res["_out"], "metrics.jsonl"), ROOT),
        }
        return rec


#: search settings that only change the report (the race's coin-toss threshold)
REPORT_ONLY = ("race_noise",)


#: how a race picked its contenders before ``race_pick`` existed (records without it)
RACE_PICK_BEFORE = "draw"

#: how a budget acted before ``budget_mode`` existed (budgeted records without it)
BUDGET_MODE_BEFORE = "lagrange"

#: GDAS's architecture gradient before ``gdas_grad`` existed (records without it)
GDAS_GRAD_BEFORE = "sliced"


def method_settings(method: str, cfg: dict) -> dict:
    """:func:`search_settings` of a run of ``method``: a GDAS run recorded before
    ``gdas_grad`` existed had the sliced gradient."""
    out = search_settings(cfg)
    if method == "gdas" and "gdas_grad" not in out:
        out["gdas_grad"] = GDAS_GRAD_BEFORE
    return out


def search_settings(cfg: dict) -> dict:
    """The settings that make a benchmark search what it is: without the report-only
    ones and ``retrain_steps`` (the benchmark retrains nothing in a search: its own
    budget is in the cache key; a race's steps are made explicit before this). A race
    recorded before ``race_pick`` existed drew its contenders (``RACE_PICK_BEFORE``)."""
    out = {k: v for k, v in cfg.items() if k not in REPORT_ONLY and k != "retrain_steps"}
    if out.get("select") == "race" and "race_pick" not in out:
        out["race_pick"] = RACE_PICK_BEFORE
    if _budgeted(out) and "budget_mode" not in out:
        out["budget_mode"] = BUDGET_MODE_BEFORE
    return out


def _budgeted(cfg: dict) -> bool:
    return any(cfg.get(k) for k in ("max_params", "max_macs", "max_latency_ms"))


def _race_time(rec: dict) -> float:
    """Seconds a run record's race spent training its contenders from scratch."""
    race = rec.get("race") or {}
    return float(sum(c.get("time_s", 0.0) for c in race.get("contenders", [])))


def _step_times(metrics_path: str) -> list[float]:
    ts = [r["time"] for r in read_jsonl(metrics_path) if r.get("kind") == "train" and "time" in r]
    return [b - a for a, b in zip(ts, ts[1:])]


#: the budgets of the budgeted question (issue 26): these percentiles of the reference's
#: parameter counts
BUDGET_QUANTILES = (25, 50, 75)


def budget_at(ref: dict[str, dict], q: float) -> int:
    """``max_params`` at the ``q``-th percentile (linear interpolation) of the parameter
    counts of the reference architectures."""
    import numpy as np

    if not 0 < q <= 100:
        raise ValueError(f"budget quantile {q}: must be in (0, 100]")
    if not ref:
        raise ValueError("a budget quantile needs the reference (run its stage first)")
    return int(round(float(np.percentile([r["params"] for r in ref.values()], q))))


def in_budget(ref: dict, config: dict) -> dict:
    """The reference architectures a run's budget admits (``max_params``; all without
    one): a budgeted run's percentile is among them (issue 26's budgeted question)."""
    lim = (config or {}).get("max_params")
    if not lim:
        return ref
    return {k: r for k, r in ref.items() if r["params"] <= lim}


def budget_label(ref: dict[str, dict], max_params) -> str | None:
    """``p25`` when ``max_params`` is the reference's 25th-percentile budget (one of
    ``BUDGET_QUANTILES``), else None."""
    for q in BUDGET_QUANTILES:
        if ref and max_params is not None and int(max_params) == budget_at(ref, q):
            return f"p{q}"
    return None


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



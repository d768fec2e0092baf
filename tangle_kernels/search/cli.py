"""``tangle-search`` / ``python -m tangle_kernels.search``: the command line.

Three commands (the first is the default)::

    tangle-search [search] --space nanogpt --optimizer drnas --out runs/nanogpt
    tangle-search train runs/nanogpt/arch.json --steps 500     # derived arch from scratch
    tangle-search spaces                                         # list the spaces

Malformed arguments (unknown space, missing or empty data file, a choice value the space
cannot take, a bad checkpoint) end with one ``tangle-search: error: ...`` line and exit
status 2, never a traceback (set ``TANGLE_DEBUG=1`` to see one). Ctrl-C writes a
checkpoint after the current step and exits with status 130; ``--resume`` continues.
Under ``torchrun --nproc_per_node=N`` the search runs with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from .inputs import CLIError, check_benchmark, checked_arch, device_arg, read_arch_json

__all__ = ["main", "build_parser"]

PROG = "tangle-search"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``tangle-search: error: ...`` line (exit 2)."""

    def error(self, message: str):
        _error(f"{message} (see {self.prog} --help)")
        raise SystemExit(2)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default=None,
        help="text file / dataset path of the space, or 'synthetic' "
        "(default: the space's default source; nanogpt: the embedded "
        "sonnets corpus)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, cuda:N or auto (default: cpu; under torchrun cuda "
        "becomes cuda:LOCAL_RANK)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "tf32", "bf16"),
        default=None,
        help="fp32 (default); tf32: CUDA matmuls/convolutions on TF32 tensor cores; bf16: "
        "autocast forward passes in bfloat16 (weights and optimizer states stay float32)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="batch size per process")
    p.add_argument("--lr", type=float, default=None, help="learning rate of the weights")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the forward + loss of every step under torch.compile (CUDA: CUDA graphs, "
        "mode reduce-overhead); pays off on GPUs and long runs, not on short CPU runs where "
        "the compile time dominates (see benchmarks/results/)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .samplers import SAMPLERS, sampler_options

    p = _Parser(
        prog=PROG,
        description="Weight-entangled NAS: search a space with a gradient-based (or SPOS) "
        "optimizer, derive the architecture, extract it and evaluate it.",
        epilog="Other commands: 'tangle-search train ARCH_JSON' trains a derived "
        "architecture from scratch; 'tangle-search spaces' lists the spaces.",
    )
    p.add_argument("--space", default="nanogpt", help="search space (see 'tangle-search spaces')")
    p.add_argument(
        "--sampler",
        "--optimizer",
        dest="sampler",
        default=None,
        choices=list(SAMPLERS),
        help="architecture sampler (--optimizer: its old name; default drnas): "
        + "; ".join(f"{n}: {c.summary}" for n, c in SAMPLERS.items() if c.summary),
    )
    p.add_argument("--out", default=None, help="output folder (default runs/SPACE-SAMPLER)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=None, help="search steps")
    steps.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="search length in epochs of the train split (instead of --steps)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out where a run lives (its files are replaced)",
    )
    p.add_argument(
        "--resume-other-data",
        action="store_true",
        help="with --resume: continue on other --data than the checkpoint was trained on",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="steps between checkpoints (0: only at the end and on Ctrl-C)",
    )
    p.add_argument(
        "--choice",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="override the values of one choice (repeatable)",
    )
    p.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a fixed hyperparameter of the space (repeatable)",
    )
    p.add_argument("--preset", default=None, help="a named preset of the space")
    p.add_argument("--arch-lr", type=float, default=None, help="Adam learning rate of the alphas")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="weight-only steps before the alphas are trained",
    )
    p.add_argument(
        "--unrolled",
        action="store_true",
        help="second-order (unrolled) DARTS update ("
        + ", ".join(n for n, c in SAMPLERS.items() if c.supports_unrolled) + ")",
    )
    for name, (opt, cls) in sampler_options().items():
        if opt.flag:
            p.add_argument(
                opt.flag,
                dest=name,
                type=opt.type,
                default=None,
                choices=list(opt.choices) if opt.choices else None,
                help=f"{opt.help} ({cls.name}; default {opt.default})",
            )
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="evaluate the current derived architecture every N steps",
    )
    p.add_argument(
        "--eval-batches", type=int, default=None, help="validation batches per evaluation"
    )
    p.add_argument(
        "--retrain-steps",
        type=int,
        default=None,
        help="after the search, train the derived architecture from scratch "
        "for N steps and report its validation loss (0: skip)",
    )
    p.add_argument(
        "--max-params", type=float, default=None, metavar="N",
        help="budget: derive the best architecture with at most N parameters (the "
        "architecture step gains a Lagrange-multiplier constraint on the expected count)",
    )
    p.add_argument(
        "--max-macs", type=float, default=None, metavar="N",
        help="budget: at most N multiply-accumulates per sample (with --max-params: both)",
    )
    p.add_argument(
        "--max-latency-ms", type=float, default=None, metavar="T",
        help="budget: at most T ms per forward pass on the search's device (batch: "
        "--set latency_batch=N, default 1), from a per-layer latency table measured there "
        "before the search (a few seconds, cached)",
    )
    p.add_argument(
        "--pareto", action="store_true",
        help="after the search, the parameter / supernet-loss front of the trained supernet "
        "at the space's 10-90th percentile budgets (pareto.json, pareto.png; "
        f"'{PROG} pareto OUT' for other budgets and to extract a point)",
    )
    p.add_argument(
        "--benchmark",
        default=None,
        metavar="FILE",
        help="tabular benchmark file to look the derived architecture up in",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        dest="sets",
        help="set any SearchConfig field (e.g. --set weight_decay=0.1)",
    )
    _add_common(p)
    return p


def build_train_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} train",
        description="Train the architecture of an arch.json (written by a search) from "
        "scratch and report its validation metrics.",
    )
    p.add_argument("arch_json", help="arch.json of a search")
    p.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the search's steps)"
    )
    p.add_argument(
        "--out", default=None, help="where to write scratch.json (default: next to arch.json)"
    )
    _add_common(p)
    return p


# ------------------------------------------------------------------------------ helpers


def _parse_choices(items: Sequence[str]) -> dict:
    from .config import parse_choices

    return parse_choices(items)


def _parse_hps(items: Sequence[str], what: str = "--hp") -> dict:
    from .config import parse_assignments

    return parse_assignments(items, what=what)


def _config(space, args, base: dict | None = None):
    """SearchConfig: defaults <- space.search_defaults <- ``base`` <- flags <- --set
    (:func:`~.config.build_config`)."""
    from .config import build_config
    from .samplers import sampler_options

    names = ["sampler", "steps", "epochs", "batch_size", "lr", "seed", "checkpoint_every",
             "arch_lr", "warmup_steps", "eval_every", "eval_batches", "retrain_steps",
             "precision", "max_params", "max_macs", "max_latency_ms", *sampler_options()]
    flags = {n: getattr(args, n, None) for n in names}
    if getattr(args, "unrolled", False):
        flags["unrolled"] = True
    return build_config(space, flags, _parse_hps(getattr(args, "sets", []), what="--set"),
                        base=base)


def _fmt_metrics(m: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _say_decision(decided) -> None:
    """How decided the search was (``arch.json['decided']``)."""
    if not decided:
        return
    if "spos" in decided:
        d = decided["spos"]
        if d.get("best") is not None:
            ru = d.get("runner_up")
            _say(
                f"  how decided: SPOS {d['search']} scored {d['scored']} architectures on the "
                f"supernet; best {d['best']:.4f}"
                + (f", runner-up {ru:.4f} (margin {ru - d['best']:.4f})" if ru is not None else "")
                + f", median {d['median']:.4f}"
            )
        return
    from .samplers import format_decision

    _say("  how decided (final probabilities; 'confident' is their margin, not evidence "
         "that the choice is right: docs/search-quality.md, Calibration):")
    for line in format_decision(decided):
        _say(f"    {line}")


# ------------------------------------------------------------------------------ commands


def cmd_search(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from ..spaces import make_space
    from .engine import Search

    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_arg(args.device)
    space = make_space(
        args.space,
        choices=_parse_choices(args.choice),
        hparams=_parse_hps(args.hp),
        preset=args.preset,
    )
    cfg = _config(space, args)
    if args.benchmark is not None:
        check_benchmark(space, args.benchmark)
    if args.resume_other_data and not args.resume:
        raise CLIError("--resume-other-data: only with --resume")
    if args.resume and args.overwrite:
        raise CLIError("--resume and --overwrite exclude each other")
    data = space.make_data(args.data)
    out = args.out or os.path.join("runs", f"{space.name}-{cfg.sampler}")
    if args.resume and not os.path.exists(os.path.join(out, "checkpoint.pt")):
        raise CLIError(
            f"--resume: no checkpoint in {out} (expected {os.path.join(out, 'checkpoint.pt')})"
        )
    meta = {"data_arg": args.data, "preset": args.preset}
    search = Search(
        space,
        data,
        cfg,
        out=out,
        device=device,
        resume=args.resume,
        overwrite=args.overwrite,
        resume_other_data=args.resume_other_data,
        progress=not args.no_progress,
        meta=meta,
        compile=args.compile,
    )
    main_rank = search.dist.is_main
    if main_rank:
        _say(
            f"{PROG}: space {space.name} ({space.num_architectures()} architectures: "
            f"{', '.join(f'{n} {v}' for n, v in space.choices.items())})"
        )
        _say(
            f"{PROG}: data {getattr(data, 'name', args.data)}; sampler {cfg.sampler}; "
            f"{search.total_steps()} steps of batch {cfg.batch_size}"
            f"{f' x {search.dist.world_size} processes' if search.dist.enabled else ''} on {search.device}; "
            f"output {out}"
        )
    result = search.run()
    if args.pareto and main_rank:
        from .pareto import write_front

        _say_front(write_front(search, out), out)
    if args.benchmark is not None:
        result["benchmark"] = space.query_benchmark(result["arch"], args.benchmark)
        if main_rank:
            from .runlog import write_json

            write_json(os.path.join(out, "arch.json"), result)
    if main_rank:
        _say("")
        _say(f"derived architecture: {result['arch_str']}")
        _say(f"  parameters: {result['params']:,} (supernet {result['params_supernet']:,})")
        for k, lim in (result.get("budget") or {}).items():
            from .budget import FIELDS

            kind = {v: k for k, v in FIELDS.items()}[k]
            cost = result["costs"][kind]
            unit = (f"{cost:.3f} ms of at most {lim:g} ms" if kind == "latency"
                    else f"{cost:,} of at most {lim:,.0f}")
            _say(f"  budget: {kind} {unit} ({100 * result['budget_margin'][kind]:.1f}% to spare)")
        _say(f"  validation (inherited supernet weights): {_fmt_metrics(result['val'])}")
        if "scratch" in result:
            s = result["scratch"]
            _say(
                f"  validation (trained from scratch, {s['steps']} steps): {_fmt_metrics(s['val'])}"
            )
        if "benchmark" in result:
            _say(f"  benchmark: {_fmt_metrics(result['benchmark'])}")
        _say_race(result.get("race"))
        _say_decision(result.get("decided"))
        saved = ["arch.json", "metrics.jsonl", "checkpoint.pt"]
        if result.get("plot"):
            saved.append("alphas.png")
        _say(f"  saved in {out}/: {', '.join(saved)}")
    from .distributed import shutdown

    shutdown(search.dist)
    return 0


def _say_race(race: dict | None) -> None:
    if not race:
        return
    entries = race["contenders"]
    metric = next(k for k in entries[0] if k not in ("arch", "arch_str", "params", "time_s"))
    won = "the most probable architecture" if race["argmax_won"] else \
        f"contender {race['winner'] + 1} (not the most probable)"
    how = {"top": "most probable", "draw": "drawn"}.get(race.get("pick"), "")
    _say(f"  race ({len(entries)} {how + ' ' if how else ''}contenders from scratch, "
         f"{race['steps']} steps each): {won} won by {race['margin']:.4f} {metric}")
    tied = set(race.get("tied") or ())
    for i, e in enumerate(entries):
        mark = "*" if i == race["winner"] else "~" if i in tied else " "
        _say(f"   {mark} {e['arch_str']}: {metric} {e[metric]:.4f}")
    verdict, noise = race.get("verdict"), race.get("noise") or 0.0
    if verdict == "coin toss":
        _say(f"  race: COIN TOSS: {len(tied)} contender(s) (~) within the seed noise "
             f"({noise:.3f} {metric} between two trainings of one architecture) of the winner; "
             "another seed could pick them")
    elif verdict == "ahead":
        _say(f"  race: ahead of every other contender by more than the seed noise "
             f"({noise:.3f} {metric})")


def cmd_train(argv: Sequence[str]) -> int:
    args = build_train_parser().parse_args(argv)
    import torch

    from ..spaces import get_space
    from .report import train_from_scratch
    from .runlog import write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_arg(args.device)
    if not os.path.isfile(args.arch_json):
        raise CLIError(f"{args.arch_json}: file not found")
    name, space_cfg, arch, rec = read_arch_json(args.arch_json)
    try:
        space = get_space(name).from_config(space_cfg)
    except (KeyError, TypeError, AttributeError) as e:
        raise CLIError(f"{args.arch_json}: space_config does not build space {name!r} ({e})") from None
    arch = checked_arch(space, arch, args.arch_json)
    cfg = _config(space, args, base=rec.get("config") if isinstance(rec.get("config"), dict) else None)
    steps = args.steps if args.steps is not None else int(rec.get("steps", cfg.steps))
    data_arg = args.data if args.data is not None else rec.get("data_arg")
    data = space.make_data(data_arg)
    _say(
        f"{PROG} train: {space.describe(arch)} on {getattr(data, 'name', data_arg)}, {steps} steps"
    )
    res = train_from_scratch(
        space, data, arch, cfg, steps=steps, device=device, progress=not args.no_progress,
        compile=args.compile,
    )
    out = args.out or os.path.dirname(os.path.abspath(args.arch_json))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "scratch.json")
    write_json(path, {"space": name, "arch": arch, **res})
    _say(f"validation (trained from scratch, {steps} steps): {_fmt_metrics(res['val'])}")
    _say(f"  parameters: {res['params']:,}; written to {path}")
    if "compile" in res:
        from .common import compile_line

        _say(f"  {compile_line(res['compile'])}")
    return 0


def build_pareto_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} pareto",
        description="The cost / quality front of a finished run's supernet: for each budget "
        "the most probable architecture that fits it, scored with the inherited weights "
        "(pareto.json, pareto.png in the run folder).",
    )
    p.add_argument("out", help="the run folder (arch.json, checkpoint.pt)")
    p.add_argument("--kind", choices=("params", "macs"), default="params")
    p.add_argument("--budgets", type=float, nargs="+", default=None, metavar="N",
                   help="the budgets (default: the space's 10/25/50/75/90th percentile costs "
                   "and no limit)")
    p.add_argument("--extract", type=int, nargs="+", default=[], metavar="I",
                   help="write point I's plain model (pareto-I.pt) and arch file (pareto-I.json)")
    p.add_argument("--data", default=None, help="the run's data (default: as recorded)")
    p.add_argument("--device", default="cpu")
    return p


def _say_front(rec: dict, out: str) -> None:
    kind = rec["kind"]
    _say(f"front ({kind} against supernet {rec['metric']}, inherited weights):")
    for i, p in enumerate(rec["points"]):
        lim = ", ".join("no limit" if b is None else f"{b:,.0f}" for b in p["budgets"])
        _say(f"  {i}{'*' if p['front'] else ' '} {p['arch_str']}: {kind} {p[kind]:,}, "
             f"{rec['metric']} {p['loss']:.4f} (budgets {lim})")
    _say(f"  * on the front; saved in {out}/: pareto.json"
         f"{', ' + rec['plot'] if rec.get('plot') else ''}")


def cmd_pareto(argv: Sequence[str]) -> int:
    args = build_pareto_parser().parse_args(argv)
    from .pareto import LoadedRun, extract_point, write_front

    run = LoadedRun(args.out, device=device_arg(args.device), data=args.data)
    rec = write_front(run, args.out, args.kind, args.budgets)
    _say_front(rec, args.out)
    for i in args.extract:
        pt, js = extract_point(run, rec, i, args.out)
        _say(f"  point {i}: {pt}, {js}")
    return 0


def cmd_spaces(argv: Sequence[str]) -> int:
    from ..spaces import SPACES, space_status

    if argv:
        raise CLIError(f"spaces: unexpected arguments {' '.join(argv)}")
    for name, status in space_status().items():
        target = SPACES[name] if isinstance(SPACES[name], str) else SPACES[name].__name__
        _say(f"{name:15s} {target:55s} {status}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd, rest = cmd_search, argv
    if argv and argv[0] in ("search", "train", "spaces", "pareto"):
        cmd = {"search": cmd_search, "train": cmd_train, "spaces": cmd_spaces,
               "pareto": cmd_pareto}[argv[0]]
        rest = argv[1:]
    from ..data import DataError
    from ..spaces.base import SpaceError
    from .checkpoint import CheckpointError

    debug = os.environ.get("TANGLE_DEBUG", "") not in ("", "0")
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return cmd(rest)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
            return 130
        except (CLIError, SpaceError, DataError, CheckpointError, ValueError, OSError) as e:
            # SearchError, SpaceError and DataError are ValueErrors; so are the nn modules'
            # errors for sizes a space cannot build.
            if debug:
                raise
            _error(str(e))
            return 2
        except Exception as e:  # anything else: still one line (TANGLE_DEBUG=1: traceback)
            if debug:
                raise
            _error(f"{type(e).__name__}: {e} (run with TANGLE_DEBUG=1 for the traceback)")
            return 2


def _error(msg: str) -> None:
    """One ``tangle-search: error: ...`` line on stderr (a message's newlines folded)."""
    line = " ".join(part.strip() for part in msg.strip().splitlines() if part.strip())
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

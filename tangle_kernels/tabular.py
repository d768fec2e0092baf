"""Tabular benchmarks: the recorded accuracy of every architecture of a small space.

A tabular benchmark maps an architecture *key* (the string of its genotype, as the space's
``genotype_key(selection)`` writes it) to its recorded metrics. This module reads such a
file in JSON or CSV (never a pickle: unpickling runs code from the file) and looks up the
derived architecture of a search.

Formats
-------
JSON: ``{"format": "tangle_kernels.tabular", "version": 1, "entries": {KEY: {METRIC:
number, ...}, ...}}``, or just the mapping ``{KEY: {METRIC: number}}``.

CSV: a header row; the key column is named ``key``, ``arch`` or ``genotype`` (else the
first column); every other column is a metric (numbers; empty cells are missing).

The seeds' toy benchmarks are pickled dicts keyed by genotype strings, e.g. (conv-macro,
6561 entries) ``'[[8, 16, 32, 64], [5, 3, 3, 3]]' -> {'test_acc': 72.46, 'train_acc':
71.376}`` and (entangled cell, 4096 entries) ``"Genotype(normal=[('sep_conv_3x3', 0),
...], normal_concat=range(1, 3), reduce=[...], reduce_concat=range(1, 3))" ->
{'test_acc': ..., 'train_acc': ..., 'num_params': ..., latencies}`` with numpy float64
values. :func:`convert_pickle` turns such a file into the JSON format through a restricted
unpickler that admits only plain containers and numpy scalars
(:mod:`tangle_kernels.data.safe_pickle`)::

    python -m tangle_kernels.tabular convert benchmark_all_archs_final.pkl conv_macro.json
    python -m tangle_kernels.tabular query conv_macro.json --arch runs/x/arch.json
    python -m tangle_kernels.tabular query conv_macro.json --key "[[8, 16, 32, 64], [5, 3, 3, 3]]"
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import numbers
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BenchmarkError",
    "TabularBenchmark",
    "convert_pickle",
    "to_plain",
    "query_selection",
    "FORMAT",
    "main",
]

FORMAT = "tangle_kernels.tabular"
VERSION = 1
_KEY_COLUMNS = ("key", "arch", "genotype")


class BenchmarkError(ValueError):
    """A benchmark file that cannot be read, or a key it does not hold; the CLI prints the
    message and exits non-zero."""


def _norm(key: str) -> str:
    """Whitespace-insensitive form of a key (``[[8,16],[3,3]]`` == ``[[8, 16], [3, 3]]``)."""
    return "".join(key.split())


def to_plain(obj: Any, where: str = "value") -> Any:
    """``obj`` with numpy scalars turned into Python numbers, tuples/sets into lists and
    non-finite floats into ``None``: what ``json.dump`` writes exactly."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None and isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    if isinstance(obj, Mapping):
        return {str(k.decode() if isinstance(k, bytes) else k): to_plain(v, f"{where}[{k!r}]")
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(items)]
    raise BenchmarkError(f"{where}: cannot store a {type(obj).__name__} in JSON")


class TabularBenchmark:
    """Architecture key -> metrics (a dict of numbers), read from JSON or CSV.

    Args:
        entries: ``{key: {metric: value}}``.
        source: a name for messages (the file path).
    """

    def __init__(self, entries: Mapping[str, Mapping[str, Any]], source: str = "<benchmark>"):
        if not entries:
            raise BenchmarkError(f"{source}: the benchmark has no entries")
        self.source = source
        self.entries: dict[str, dict[str, Any]] = {}
        for k, v in entries.items():
            if not isinstance(k, str):
                raise BenchmarkError(f"{source}: key {k!r} is not a string")
            if not isinstance(v, Mapping):
                v = {"value": v}
            self.entries[k] = dict(v)
        self._normalised = {_norm(k): k for k in self.entries}

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, path: str | os.PathLike) -> TabularBenchmark:
        """Read a ``.json`` or ``.csv`` benchmark (by extension, else by content)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise BenchmarkError(f"benchmark file not found: {path}")
        with open(path, "rb") as f:
            head = f.read(2)
        if path.lower().endswith((".pkl", ".pickle")) or head[:1] == b"\x80":
            raise BenchmarkError(
                f"{path} is a pickle; pickles can run code and are not read here. Convert it "
                f"once with: python -m tangle_kernels.tabular convert {path} OUT.json"
            )
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise BenchmarkError(f"cannot read {path}: {e}") from None
        lower = path.lower()
        if lower.endswith(".json") or (not lower.endswith(".csv") and text.lstrip()[:1] == "{"):
            return cls._from_json(text, path)
        return cls._from_csv(text, path)

    @classmethod
    def _from_json(cls, text: str, path: str) -> TabularBenchmark:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise BenchmarkError(f"{path}: expected a JSON object at the top level")
        if obj.get("format") == FORMAT:
            if obj.get("version", VERSION) > VERSION:
                raise BenchmarkError(f"{path}: format version {obj['version']} is newer than "
                                     f"this reader ({VERSION})")
            obj = obj.get("entries")
            if not isinstance(obj, dict):
                raise BenchmarkError(f"{path}: 'entries' must be an object key -> metrics")
        return cls(obj, source=path)

    @classmethod
    def _from_csv(cls, text: str, path: str) -> TabularBenchmark:
        rows = list(csv.reader(text.splitlines()))
        rows = [r for r in rows if any(c.strip() for c in r)]
        if len(rows) < 2:
            raise BenchmarkError(f"{path}: a CSV benchmark needs a header row and data rows")
        header = [h.strip() for h in rows[0]]
        lower = [h.lower() for h in header]
        kcol = next((lower.index(c) for c in _KEY_COLUMNS if c in lower), 0)
        entries: dict[str, dict[str, Any]] = {}
        for ln, row in enumerate(rows[1:], start=2):
            if len(row) != len(header):
                raise BenchmarkError(
                    f"{path}:{ln}: {len(row)} fields, the header has {len(header)}")
            metrics = {}
            for i, (h, cell) in enumerate(zip(header, row)):
                if i == kcol:
                    continue
                cell = cell.strip()
                if cell == "":
                    continue
                try:
                    metrics[h] = int(cell) if cell.lstrip("-").isdigit() else float(cell)
                except ValueError:
                    metrics[h] = cell
            key = row[kcol]
            if key in entries:
                raise BenchmarkError(f"{path}:{ln}: duplicate key {key!r}")
            entries[key] = metrics
        return cls(entries, source=path)

    # ------------------------------------------------------------------ writing
    def to_json(self, path: str | os.PathLike, *, meta: Mapping[str, Any] | None = None) -> None:
        """Write the JSON format (atomically: temp file + rename)."""
        path = os.fspath(path)
        doc = {"format": FORMAT, "version": VERSION, **(dict(meta) if meta else {}),
               "entries": to_plain(self.entries, "entries")}
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise BenchmarkError(f"cannot write {path}: the folder {folder} does not exist")
        from .search.runlog import atomic_write

        def write(f):
            json.dump(doc, f, indent=0, sort_keys=False, allow_nan=False)
            f.write("\n")

        atomic_write(path, write)  # a temp file unique to this writer, then a rename

    # ------------------------------------------------------------------- lookup
    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries or _norm(key) in self._normalised

    def keys(self) -> list[str]:
        return list(self.entries)

    def query(self, key: str) -> dict[str, Any]:
        """The metrics recorded for ``key`` (exact, else whitespace-insensitive match)."""
        if key in self.entries:
            return dict(self.entries[key])
        k = self._normalised.get(_norm(key))
        if k is not None:
            return dict(self.entries[k])
        example = next(iter(self.entries))
        raise BenchmarkError(
            f"{self.source}: no entry for {key!r} ({len(self)} entries; keys look like "
            f"{example!r}). Is it the benchmark of this space, with the same choices?"
        )


def convert_pickle(in_path: str | os.PathLike, out_path: str | os.PathLike) -> TabularBenchmark:
    """Convert a pickled benchmark dict ``{key: metrics}`` into the JSON format.

    The pickle is read by a restricted unpickler admitting only plain containers and numpy
    scalars (``numpy[._]core.multiarray.scalar``, ``numpy.dtype``); a file that names any
    other global is refused. Returns the benchmark written.
    """
    from .data.safe_pickle import UnsafePickleError, safe_load

    in_path = os.fspath(in_path)
    if not os.path.isfile(in_path):
        raise BenchmarkError(f"benchmark file not found: {in_path}")
    if os.path.exists(out_path) and os.path.samefile(in_path, out_path):
        raise BenchmarkError(f"convert: the output {os.fspath(out_path)} is the input; "
                             f"refusing to write over it (name another file)")
    try:
        obj = safe_load(in_path, scalars=True)
    except UnsafePickleError as e:
        raise BenchmarkError(str(e)) from None
    except Exception as e:
        raise BenchmarkError(f"{in_path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, Mapping):
        raise BenchmarkError(f"{in_path}: expected a pickled dict key -> metrics, got "
                             f"{type(obj).__name__}")
    entries = {}
    for k, v in obj.items():
        key = k.decode() if isinstance(k, bytes) else k if isinstance(k, str) else str(k)
        entries[key] = to_plain(v, f"entry {key!r}") if isinstance(v, Mapping) else {
            "value": to_plain(v, f"entry {key!r}")}
    bench = TabularBenchmark(entries, source=in_path)
    bench.to_json(out_path, meta={"converted_from": os.path.basename(in_path)})
    return bench


def query_selection(space, selection: Mapping[str, Any], path: str | os.PathLike
                    ) -> tuple[str, dict[str, Any]]:
    """``(key, metrics)`` of the architecture ``selection`` of ``space`` (which must
    provide ``genotype_key``) in the benchmark file at ``path``."""
    if not hasattr(space, "genotype_key"):
        raise BenchmarkError(f"space {getattr(space, 'name', space)!r} has no tabular "
                             f"benchmark (no genotype_key)")
    key = space.genotype_key(selection)
    return key, TabularBenchmark.load(path).query(key)


# -------------------------------------------------------------------------- CLI
def _read_arch(path: str) -> tuple[Any, dict]:
    """(space, selection) from an ``arch.json`` written by the search driver: the
    selection under ``arch`` (or ``selection``), the space from ``space_config`` (name,
    choices, hparams) or ``space`` (a name: the space's defaults)."""
    from .spaces import SpaceError, get_space

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise BenchmarkError(f"arch file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"cannot read arch file {path}: {e}") from None
    sel = next((doc[k] for k in ("selection", "arch", "architecture", "derived")
                if isinstance(doc.get(k), Mapping)), None)
    if sel is None:
        raise BenchmarkError(f"{path}: no architecture (expected a 'selection' or 'arch' object)")
    sp = doc.get("space")
    cfg = doc.get("space_config") if isinstance(doc.get("space_config"), Mapping) else (
        sp if isinstance(sp, Mapping) else {"name": sp})
    name = cfg.get("name") or (sp if isinstance(sp, str) else None)
    if not name:
        raise BenchmarkError(f"{path}: no space name (expected 'space')")
    try:
        cls = get_space(name)
        space = cls(choices=cfg.get("choices"), hparams=cfg.get("hparams"))
        return space, space.check_selection(sel)
    except SpaceError as e:
        raise BenchmarkError(f"{path}: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tangle_kernels.tabular",
                                description="Tabular NAS benchmarks: convert and query.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="pickled benchmark dict -> JSON (restricted unpickler)")
    c.add_argument("input", help="the .pkl benchmark (key -> metrics)")
    c.add_argument("output", help="the JSON file to write")
    q = sub.add_parser("query", help="look up an architecture in a JSON/CSV benchmark")
    q.add_argument("benchmark", help="the .json or .csv benchmark")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--key", help="the genotype key string")
    g.add_argument("--arch", help="an arch.json written by the search driver")
    args = p.parse_args(argv)
    try:
        if args.cmd == "convert":
            bench = convert_pickle(args.input, args.output)
            metrics = sorted({m for v in bench.entries.values() for m in v})
            print(f"wrote {args.output}: {len(bench)} entries, metrics {', '.join(metrics)}")
            return 0
        if args.key is not None:
            key = args.key
            metrics = TabularBenchmark.load(args.benchmark).query(key)
        else:
            space, sel = _read_arch(args.arch)
            key, metrics = query_selection(space, sel, args.benchmark)
        print(json.dumps({"key": key, **to_plain(metrics)}))
        return 0
    except (BenchmarkError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Run files: atomic writes, JSON Lines records, and the metrics log of a run.

Shared by the search loop and the benchmarks (``benchmarks/quality``):

- :func:`atomic_write`: write through a temp file unique to the writer (``mkstemp`` in
  the target's folder), fsync, give it the mode a plain ``open`` would (``0666 & ~umask``,
  so every output of a run has the same mode), then ``os.replace``;
- :func:`write_json`, :func:`read_jsonl`, :func:`append_jsonl`, :func:`repair_jsonl`;
- :class:`RunLog`: a run's ``metrics.jsonl`` (append a record; keep only the records
  before a step when a run resumes) and its messages (rank 0 only).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "FILE_MODE",
    "atomic_write",
    "write_json",
    "jsonable",
    "read_jsonl",
    "append_jsonl",
    "repair_jsonl",
    "RunLog",
]


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


#: the mode of every file a run writes (what ``open(path, "w")`` would give)
FILE_MODE = _file_mode()


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, binary: bool = False,
                 suffix: str = ".tmp") -> None:
    """Call ``write(f)`` on a temp file unique to this writer next to ``path``, fsync it,
    chmod it to :data:`FILE_MODE` and move it over ``path``; on any error the temp file
    is removed and ``path`` is untouched. ``suffix``: the temp file's (some writers pick
    the format from it, e.g. ``.png``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def jsonable(x):
    """``x`` with tensors as lists and non-finite floats as strings (valid JSON)."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return jsonable(x.detach().cpu().tolist())
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 2) -> None:
    """Atomic JSON file (:func:`jsonable` of ``obj``)."""

    def w(f):
        json.dump(jsonable(obj), f, indent=indent)
        f.write("\n")

    atomic_write(path, w)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON Lines file ([] when missing); a line cut by an interrupt is
    skipped."""
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
            except json.JSONDecodeError:
                continue
    return out


def append_jsonl(path: str | os.PathLike, rec: Mapping, *, fsync: bool = True) -> None:
    """Append one record (one line) to a JSON Lines file."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(jsonable(rec)) + "\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def repair_jsonl(path: str | os.PathLike, keep: Callable[[dict], bool] | None = None) -> None:
    """Rewrite ``path`` (atomically) with its well-formed lines (those ``keep`` accepts):
    a last line cut by an interrupt goes, so the next append starts a fresh line."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    good = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep is None or keep(rec):
            good.append(line if line.endswith("\n") else line + "\n")
    if good != lines:
        atomic_write(path, lambda f: f.writelines(good))


class RunLog:
    """The ``metrics.jsonl`` of a run and its messages; only rank 0 (``main``) writes.

    ``log``: where messages go (default ``print``; :meth:`message` uses ``bar.write``
    while a progress bar ``bar`` is set)."""

    def __init__(self, metrics_path: str, *, main: bool = True,
                 log: Callable[[str], None] | None = None):
        self.path = metrics_path
        self.main = main
        self._log = log
        self.bar = None

    def message(self, msg: str) -> None:
        if not self.main:
            return
        if self._log is not None:
            self._log(msg)
        elif self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def record(self, rec: Mapping) -> None:
        """Append one record (a line of JSON)."""
        if self.main:
            append_jsonl(self.path, rec, fsync=False)

    def start(self) -> None:
        """A new run: an empty metrics file."""
        if self.main:
            atomic_write(self.path, lambda f: None)

    def truncate(self, step: int) -> None:
        """Keep the records of steps < ``step`` (those a run resumed at ``step`` does not
        redo): ``train`` and ``eval`` records only."""
        if not self.main:
            return
        if not os.path.exists(self.path):
            self.start()
            return
        repair_jsonl(
            self.path,
            keep=lambda r: r.get("kind") in ("train", "eval") and int(r.get("step", 0)) < step,
        )

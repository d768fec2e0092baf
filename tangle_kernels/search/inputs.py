"""Checks of the command line's arguments that name files and devices: each failure
is one :class:`CLIError` line (the CLI prints ``tangle-search: error: ...``, exits 2)."""

from __future__ import annotations

import json
import os

__all__ = ["CLIError", "read_arch_json", "checked_arch", "check_benchmark", "device_arg"]


class CLIError(Exception):
    """An error worth one line on stderr and exit status 2."""


def device_arg(name: str):
    """The torch device of ``--device`` (``auto``: CUDA when there is one)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:N, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name}: only cpu and cuda are supported")
    return dev


def read_arch_json(path: str):
    """``(space name, space_config, arch, record)`` of an arch.json, or one CLIError."""
    what = f"{path}: not an arch.json written by tangle-search"
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"{what} ({e})") from None
    if not isinstance(rec, dict):
        raise CLIError(f"{what} (expected a JSON object, found {type(rec).__name__})")
    for k in ("space", "space_config", "arch"):
        if k not in rec:
            raise CLIError(f"{what} (no {k!r})")
    if not isinstance(rec["space"], str):
        raise CLIError(f"{what} ('space' is not a name)")
    for k in ("space_config", "arch"):
        if not isinstance(rec[k], dict):
            raise CLIError(f"{what} ({k!r} is a {type(rec[k]).__name__}, expected an object)")
    return rec["space"], rec["space_config"], rec["arch"], rec


def checked_arch(space, arch: dict, path: str) -> dict:
    missing = [n for n in space.choices if n not in arch]
    if missing:
        raise CLIError(f"{path}: the arch has no value for choice(s) {', '.join(missing)}")
    return space.check_selection(arch)


def check_benchmark(space, path: str) -> None:
    """Refuse an unusable --benchmark before the search runs (not after it)."""
    if not os.path.isfile(path):
        raise CLIError(f"--benchmark {path}: file not found")
    if not os.access(path, os.R_OK):
        raise CLIError(f"--benchmark {path}: not readable")
    if not hasattr(space, "genotype_key"):
        raise CLIError(f"--benchmark: space {space.name!r} has no tabular benchmark to query")
    from ..tabular import TabularBenchmark

    TabularBenchmark.load(path)  # a BenchmarkError (one line) for an unreadable file



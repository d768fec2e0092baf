"""Atomic checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain containers (dict, list, tuple, str, int,
float, bool, None): model and optimizer state dicts, the architecture parameters,
RNG states as uint8 tensors, the step counter and the run's configuration. It is
written to a temporary file in the same folder, flushed and fsync'ed, then moved
over the old one with ``os.replace`` (atomic on POSIX and Windows), so a crash or a
Ctrl-C while saving leaves the previous checkpoint intact. It gets the mode of every
other file of a run (``runlog.FILE_MODE``).

:func:`data_fingerprint` identifies a run's data (a file: its path, size and SHA-256),
so a resumed run can refuse other data; :func:`check_resume` holds every check of a
checkpoint against the run that resumes it, each failure one line.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "rng_state",
    "set_rng_state",
    "data_fingerprint",
    "check_resume",
    "REQUIRED_KEYS",
]

#: what a search checkpoint must hold
REQUIRED_KEYS = ("format", "step", "config", "space", "model", "w_opt", "alphas", "rng")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from an incompatible run."""


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` atomically (a temp file unique to this writer, then
    ``os.replace``: :func:`~.runlog.atomic_write`)."""
    from .runlog import atomic_write

    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(path, weights_only=True)``; :class:`CheckpointError` when it fails."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint to resume from: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors, truncated files
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(f"{path} is not a tangle-search checkpoint")
    return obj


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global RNG states (CPU, and the CUDA device's) as uint8 tensors."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def data_fingerprint(data) -> dict:
    """``{"name", "path", "size", "sha256"}`` of a data source read from a file (its
    ``name`` is the path), ``{"name", "path"}`` for a folder, ``{"name"}`` otherwise
    (embedded or synthetic data: the name says it all)."""
    name = str(getattr(data, "name", ""))
    if name and os.path.isfile(name):
        h = hashlib.sha256()
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return {"name": name, "path": os.path.abspath(name), "size": os.path.getsize(name),
                "sha256": h.hexdigest()}
    if name and os.path.isdir(name):
        return {"name": name, "path": os.path.abspath(name)}
    return {"name": name}


def _same_data(a: dict, b: dict) -> bool:
    if "sha256" in a or "sha256" in b:
        return a.get("sha256") == b.get("sha256") and a.get("size") == b.get("size")
    return a.get("path", a.get("name")) == b.get("path", b.get("name"))


def check_resume(ck: dict, path: str, *, fmt: str, space_config: dict, cfg, total: int,
                 world_size: int, fingerprint: dict, other_data: bool = False) -> None:
    """A :class:`CheckpointError` (one line) unless checkpoint ``ck`` continues this run:
    its format, keys, space, settings (but the resume-free ones), length, process count
    and data (unless ``other_data``)."""
    from .config import SearchConfig

    missing = [k for k in REQUIRED_KEYS if k not in ck]
    if ck.get("format") != fmt:
        raise CheckpointError(f"{path}: format {ck.get('format')!r}, expected {fmt!r}")
    if missing:
        raise CheckpointError(f"{path}: not a complete tangle-search checkpoint (missing "
                              f"{', '.join(missing)})")
    if ck["space"] != space_config:
        raise CheckpointError(
            f"--resume: {path} is a search of space {ck['space']}, not of "
            f"{space_config}; use another --out or drop --resume"
        )
    if not isinstance(ck["config"], dict):
        raise CheckpointError(f"{path}: its config is not a mapping")
    try:
        saved = SearchConfig.from_dict(ck["config"]).to_dict()
    except TypeError as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    now = cfg.to_dict()
    free = SearchConfig.resume_free()
    diff = [k for k in now if k not in free and saved.get(k) != now.get(k)]
    if ck.get("total_steps") != total and "steps" not in diff:
        diff.append("steps")
    if diff:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise CheckpointError(
            f"--resume: the checkpoint's settings differ ({pairs}); resume with the "
            f"original arguments or start a new --out"
        )
    if ck.get("world_size", 1) != world_size:
        raise CheckpointError(
            f"--resume: the checkpoint was written by {ck.get('world_size')} process(es), "
            f"this run has {world_size}; data sampling would differ"
        )
    saved_fp = ck.get("data_fingerprint")
    if saved_fp is not None and not other_data and not _same_data(saved_fp, fingerprint):
        raise CheckpointError(
            f"--resume: the checkpoint was trained on {saved_fp.get('name')!r} "
            f"({_fp_str(saved_fp)}), this run reads {fingerprint.get('name')!r} "
            f"({_fp_str(fingerprint)}); resume with the same --data, or pass --resume-other-data"
        )


def _fp_str(fp: dict) -> str:
    if "sha256" in fp:
        return f"{fp['size']} bytes, sha256 {fp['sha256'][:12]}"
    return fp.get("path", "no file")

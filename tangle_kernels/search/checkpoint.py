"""Atomic checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain containers (dict, list, tuple, str, int,
float, bool, None): model and optimizer state dicts, the architecture parameters,
RNG states as uint8 tensors, the step counter and the run's configuration. It is
written to a temporary file in the same folder, flushed and fsync'ed, then moved
over the old one with ``os.replace`` (atomic on POSIX and Windows), so a crash or a
Ctrl-C while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "rng_state", "set_rng_state"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from an incompatible run."""


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` atomically (temporary file + ``os.replace``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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

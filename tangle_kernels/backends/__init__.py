"""Backend registry for the superpose kernels.

Names: ``reference`` (padded-sum oracle, plain autograd), ``torch`` (vectorised
PyTorch), ``cpu`` (C++/OpenMP extension), ``triton`` and ``cuda`` (GPU; triton
also runs on CPU tensors under ``TRITON_INTERPRET=1``).

Choice: the ``backend=`` argument, else the ``TANGLE_KERNELS_BACKEND`` environment
variable, else automatic by device (CUDA: cuda, then triton, then torch; CPU: cpu,
then torch). On the H100 the CUDA kernels reached more of the copy bandwidth than
the Triton ones (superpose fwd 79% vs 64%, fwd+bwd 49% vs 34% at 268 MB;
benchmarks/results/2026-11-23-cuda.md) and launch through fewer Python layers. An explicitly requested backend that cannot run raises; the automatic
choice falls back with one warning per missing backend.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

from .. import _ext

BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")
ENV_VAR = "TANGLE_KERNELS_BACKEND"

_warned: set[str] = set()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    return True, ""


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run on ``device``, else the reason it cannot."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"
    if name in ("reference", "torch"):
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, got a tensor on {device}"
        if not _ext.has_cpu_ext():
            return f"the compiled extension is missing ({_ext._C_ERROR})"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, got a tensor on {device}"
        if not _ext.has_cuda_ext():
            why = _ext._C_ERROR or "it was built without nvcc or with TANGLE_SKIP_CUDA=1"
            return f"the CUDA extension is not compiled ({why})"
        return None
    if name == "triton":
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device}"
        return _triton_status(device.type == "cpu" and not triton_interpret())
        return f"unknown backend {name!r}"  # pragma: no cover


_TRITON_STATUS: dict[bool, str | None] = {}


def _triton_status_impl(cpu_without_interpreter: bool) -> str | None:
    st = _TRITON_STATUS.get(cpu_without_interpreter, "?")
    if st != "?":
        return st
    ok, why = _triton_importable()
    if not ok:
        st = why
    elif cpu_without_interpreter:
        st = "triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import"
    else:
        try:
            get("triton")
            st = None
        except Exception as e:
            st = f"the triton kernels failed to import ({type(e).__name__}: {e})"
    _TRITON_STATUS[cpu_without_interpreter] = st
    return st


# Imports happen here: under torch.compile the check runs eagerly at trace time and
# its result is a constant of the graph (fullgraph tracing cannot follow importlib).
try:
    _triton_status = torch._dynamo.assume_constant_result(_triton_status_impl)
except Exception:  # pragma: no cover - very old/new torch without the helper
    _triton_status = _triton_status_impl


_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


_RESOLVED: dict[tuple, str] = {}


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend to use for tensors on ``device`` (see module docstring).

    Successful answers are cached per (argument, environment variable, device type):
    what can run does not change within a process, and this runs on every op call."""
    if torch.compiler.is_compiling():  # traced once; keep the graph free of the cache
        return _resolve(backend, device)
    key = (backend, os.environ.get(ENV_VAR), device.type)
    name = _RESOLVED.get(key)
    if name is None:
        name = _resolve(backend, device)
        _RESOLVED[key] = name
    return name


def _resolve(backend: str | None, device: torch.device) -> str:
    explicit = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if explicit is not None:
        explicit = explicit.lower()
        why = why_unavailable(explicit, device)
        if why is not None:
            src = "backend=" if backend is not None else f"{ENV_VAR}="
            raise RuntimeError(f"tangle_kernels: {src}{explicit!r} cannot run: {why}")
        return explicit
    order = _AUTO_ORDER.get(device.type, ("torch",))
    for i, name in enumerate(order):
        why = why_unavailable(name, device)
        if why is None:
            return name
        if i == 0 and name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"tangle_kernels: backend {name!r} unavailable on {device.type} ({why}); "
                f"falling back to {order[-1]!r}",
                RuntimeWarning,
                stacklevel=3,
            )
    return "torch"


_MODULES = {
    "torch": ".torch_backend",
    "cpu": ".cpu",
    "cuda": ".cuda",
    "triton": ".triton_superpose",
}


_LOADED: dict[str, ModuleType] = {}


def get(name: str) -> ModuleType:
    """The module implementing ``forward(w2d, t, tabs)`` / ``backward(g2d, w2d, t, tabs)``."""
    mod = _LOADED.get(name)
    if mod is None:
        mod = importlib.import_module(_MODULES[name], __name__)
        _LOADED[name] = mod
    return mod

"""The one registry of kernel backends, for every op.

A backend is a device family with its own kernels: ``cpu`` (C++/OpenMP, the compiled
extension), ``cuda`` (the CUDA kernels of the extension), ``triton`` (GPU; also CPU
tensors under ``TRITON_INTERPRET=1``) and ``torch`` (vectorised PyTorch, any device).
``reference`` is every op's plain-PyTorch composition (:mod:`.reference`, the oracle of
the tests and benchmarks); it can always run.

The kernel wrapper of op ``op`` on backend ``b`` is the module ``backends/<b>/<op>.py``
(``torch``: ``backends/pytorch/``, so that no submodule shadows the ``torch`` package),
named by ONE line of :data:`IMPLS`. A wrapper may define ``why_unavailable() -> str |
None`` for what only it knows (a symbol of the extension, a BLAS, a switch); the
device and extension checks of its backend are done here. So a new device for an op is
one wrapper file plus one line of :data:`IMPLS` (csrc/README.md, "How to add a kernel").

Choice: an explicit backend (the ``backend=`` argument of the ops that take one, else
the ``TANGLE_KERNELS_BACKEND`` environment variable for those ops) must be able to run,
or :func:`resolve` raises. Automatic: by device, the first available of
:data:`AUTO_ORDER` that has a kernel for the op, else the op's fallback (``torch`` where
the op has one, else ``reference``). For superpose a missing first choice warns once;
the CUDA kernels come first on CUDA tensors because they reached more of the copy
bandwidth than the Triton ones and launch through fewer Python layers
(benchmarks/results/).

Convention everywhere: ``why_unavailable(...)`` returns None when the backend can run,
else the reason in words.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from .. import _ext

BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")
ENV_VAR = "TANGLE_KERNELS_BACKEND"


@dataclass(frozen=True)
class Impl:
    """One kernel wrapper: its module (relative to this package) and the environment
    variables its availability depends on (part of :func:`resolve`'s cache key)."""

    module: str
    env: tuple[str, ...] = ()


# op -> backend -> wrapper. ``reference`` is implicit for every op.
IMPLS: dict[str, dict[str, Impl]] = {
    "superpose": {
        "torch": Impl("pytorch.superpose"),
        "cpu": Impl("cpu.superpose"),
        "triton": Impl("triton.superpose"),
        "cuda": Impl("cuda.superpose"),
    },
    "linear": {"triton": Impl("triton.linear")},  # the fused masked GEMM
    "layernorm": {"cpu": Impl("cpu.layernorm")},
    "attention": {"cpu": Impl("cpu.attention", env=("TANGLE_FUSED_ATTENTION",))},
    "head_partition": {"cpu": Impl("cpu.head_partition")},
}

OPS = tuple(IMPLS)
# Ops whose backend the user picks (``backend=`` / TANGLE_KERNELS_BACKEND); they warn
# once when the automatic first choice is missing.
USER_CHOSEN = ("superpose", "linear")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

_warned: set[tuple[str, str]] = set()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def deterministic_mode() -> bool:
    """True when d mix must be bitwise repeatable on GPU: torch's deterministic
    algorithms are enabled or ``TANGLE_DETERMINISTIC`` is set to a non-zero value."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get(
        "TANGLE_DETERMINISTIC", "0"
    ) not in ("", "0")


def backends_of(op: str) -> tuple[str, ...]:
    """The backend names with a kernel for ``op``, ``reference`` first (for tests)."""
    return ("reference",) + tuple(b for b in BACKENDS if b in IMPLS[op])


def _check_names(op, backend) -> None:
    if not isinstance(op, str):
        raise TypeError(f"op: expected a str, got {type(op).__name__}")
    if op not in IMPLS:
        raise ValueError(f"op: unknown op {op!r}; choose one of {', '.join(OPS)}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(
            f"backend: expected a str (one of {', '.join(BACKENDS)}) or None, "
            f"got {type(backend).__name__} {backend!r}"
        )


def _device_check(backend: str, device: torch.device) -> str | None:
    """The device / extension requirement of a backend family (None: met)."""
    if backend in ("reference", "torch"):
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, got a tensor on {device}"
        if not _ext.has_cpu_ext():
            return f"the compiled extension is missing ({_ext._C_ERROR})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, got a tensor on {device}"
        if not _ext.has_cuda_ext():
            why = _ext._C_ERROR or "it was built without nvcc or with TANGLE_SKIP_CUDA=1"
            return f"the CUDA extension is not compiled ({why})"
        return None
    if backend == "triton":
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device}"
        return _triton_status(device.type == "cpu" and not triton_interpret())
    return f"unknown backend {backend!r}"  # pragma: no cover


def why_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    _check_names(op, backend)
    device = torch.device(device)
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    if backend == "reference":
        return None
    if backend not in IMPLS[op]:
        return f"there is no {backend!r} kernel for {op} (backends: {', '.join(backends_of(op))})"
    why = _device_check(backend, device)
    if why is not None:
        return why
    return _module_check(op, backend)


def _module_check_impl(op: str, backend: str) -> str | None:
    """Import the wrapper and ask its own ``why_unavailable`` hook, if it has one."""
    try:
        mod = get(op, backend)
    except Exception as e:  # pragma: no cover - a broken install
        return f"the {backend} {op} kernels failed to import ({type(e).__name__}: {e})"
    hook = getattr(mod, "why_unavailable", None)
    return hook() if hook is not None else None


# Under torch.compile the import and the hook run eagerly at trace time (a constant of
# the graph), as the triton check below.
try:
    _module_check = torch._dynamo.assume_constant_result(_module_check_impl)
except Exception:  # pragma: no cover
    _module_check = _module_check_impl


_TRITON_STATUS: dict[bool, str | None] = {}


def _triton_status_impl(cpu_without_interpreter: bool) -> str | None:
    st = _TRITON_STATUS.get(cpu_without_interpreter, "?")
    if st != "?":
        return st
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        st = f"triton is not importable ({type(e).__name__}: {e})"
    else:
        if cpu_without_interpreter:
            st = "triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import"
        else:
            try:
                get("superpose", "triton")
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


_RESOLVED: dict[tuple, str] = {}


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs ``op`` for tensors on ``device`` (see module docstring).

    Successful answers are cached per (op, argument, environment, device type): what
    can run does not change within a process, and this runs on every op call."""
    _check_names(op, backend)
    if torch.compiler.is_compiling():  # traced once; keep the graph free of the cache
        return _resolve(op, backend, device)
    env = tuple(os.environ.get(v) for v in _env_keys(op))
    key = (op, backend, env, device.type)
    name = _RESOLVED.get(key)
    if name is None:
        name = _resolve(op, backend, device)
        _RESOLVED[key] = name
    return name


def _env_keys(op: str) -> tuple[str, ...]:
    keys = tuple(v for impl in IMPLS[op].values() for v in impl.env)
    return ((ENV_VAR,) + keys) if op in USER_CHOSEN else keys


def fallback(op: str) -> str:
    """What the automatic choice ends with: ``torch`` where the op has it, else
    ``reference`` (the op's plain composition)."""
    return "torch" if "torch" in IMPLS[op] else "reference"


def _resolve(op: str, backend: str | None, device: torch.device) -> str:
    explicit = backend
    if explicit is None and op in USER_CHOSEN:
        explicit = os.environ.get(ENV_VAR) or None
    if explicit is not None:
        explicit = explicit.lower()
        why = why_unavailable(op, explicit, device)
        if why is not None:
            src = "backend=" if backend is not None else f"{ENV_VAR}="
            raise RuntimeError(f"tangle_kernels: {src}{explicit!r} cannot run: {why}")
        return explicit
    last = fallback(op)
    order = [b for b in AUTO_ORDER.get(device.type, ()) if b in IMPLS[op] and b != last]
    for i, name in enumerate(order):
        why = why_unavailable(op, name, device)
        if why is None:
            return name
        if i == 0 and op in USER_CHOSEN and (op, name) not in _warned:
            _warned.add((op, name))
            warnings.warn(
                f"tangle_kernels: backend {name!r} unavailable on {device.type} ({why}); "
                f"falling back to {last!r}",
                RuntimeWarning,
                stacklevel=3,
            )
    return last


_LOADED: dict[tuple[str, str], ModuleType] = {}


def get(op: str, backend: str) -> ModuleType:
    """The wrapper module of ``op`` on ``backend`` (imported once).

    For superpose it implements ``forward(w2d, t, tabs)`` / ``backward(g2d, w2d, t,
    tabs)``; the other ops' wrappers document their own functions."""
    mod = _LOADED.get((op, backend))
    if mod is None:
        try:
            impl = IMPLS[op][backend]
        except KeyError:
            raise ValueError(f"no {backend!r} kernel for {op}") from None
        mod = importlib.import_module("." + impl.module, __name__)
        _LOADED[(op, backend)] = mod
    return mod

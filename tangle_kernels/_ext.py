"""Loading of the compiled extension ``tangle_kernels._C`` (never fatal)."""

from __future__ import annotations

import os
import warnings

_C = None
_C_ERROR: str | None = None

if os.environ.get("TANGLE_DISABLE_EXT", "0") not in ("", "0"):
    _C_ERROR = "disabled by TANGLE_DISABLE_EXT"
else:
    try:
        from . import _C  # type: ignore[attr-defined,no-redef]
    except Exception as e:  # ImportError, or an undefined symbol in a stale build
        _C = None
        _C_ERROR = f"{type(e).__name__}: {e}"
        warnings.warn(
            "tangle_kernels: the compiled extension tangle_kernels._C could not be loaded "
            f"({_C_ERROR}); the C++ 'cpu' and 'cuda' backends are unavailable and the "
            "pure-PyTorch backends are used instead. Reinstall with `pip install .` to build it.",
            RuntimeWarning,
            stacklevel=2,
        )


def _dtype_codes() -> dict:
    import torch

    codes = getattr(_C, "dtype_codes", None) or {}
    return {getattr(torch, name): int(code) for name, code in codes.items()}


# torch dtype -> the kernels' code: ``tangle::DType`` of csrc/tangle.h, the one place
# they are defined (the extension exports them as ``_C.dtype_codes``).
DTYPE_CODES: dict = _dtype_codes()


def has_cpu_ext() -> bool:
    return _C is not None


def has_cuda_ext() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def cuda_archs() -> str:
    return str(getattr(_C, "cuda_archs", "")) if _C is not None else ""

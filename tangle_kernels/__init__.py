"""tangle_kernels: fused kernels for weight-entangled neural architecture search.

``superpose(weight, mix, layout)`` computes ``W_mix = sum_k mix_k * pad(slice_k(W))``
and its gradients (dW and d mix) in one pass; ``tangle_kernels.nn`` holds drop-in
entangled modules; ``tangle_kernels.search`` the NAS driver.
"""

from __future__ import annotations

from . import _ext
from .layout import Layout, centered_range, prefix_range
from .ops.entangled_conv import entangled_conv2d
from .ops.entangled_linear import entangled_linear
from .ops.superpose import superpose

__version__ = "0.1.0"

__all__ = [
    "Layout",
    "superpose",
    "entangled_linear",
    "entangled_conv2d",
    "prefix_range",
    "centered_range",
    "entangle",
    "extract",
    "info",
    "__version__",
]


def info() -> dict:
    """What this installation can run: the compiled extension (CPU, CUDA and its
    archs), a CUDA device, triton (and interpreter mode), the torch version, and
    the backend chosen automatically per device."""
    import os

    import torch

    from . import backends

    d: dict = {
        "version": __version__,
        "torch": torch.__version__,
        "cpu_extension": _ext.has_cpu_ext(),
        "cpu_extension_error": _ext._C_ERROR,
        "openmp_threads": _ext._C.cpu_num_threads() if _ext.has_cpu_ext() else None,
        "cuda_extension": _ext.has_cuda_ext(),
        "cuda_archs": _ext.cuda_archs() or None,
        "cuda_device": torch.cuda.is_available(),
        "cuda_device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import triton

        d["triton"] = triton.__version__
    except Exception as e:
        d["triton"] = None
        d["triton_error"] = f"{type(e).__name__}: {e}"
    d["triton_interpret"] = backends.triton_interpret()
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    avail = {}
    for dev in devs:
        avail[dev.type] = {n: (backends.why_unavailable("superpose", n, dev) or "ok")
                           for n in backends.BACKENDS}
    d["backends"] = avail
    # Per op, the backend the automatic choice takes on each device (the registry).
    d["ops"] = {dev.type: {op: backends.resolve(op, None, dev) for op in backends.OPS
                           if op not in backends.USER_CHOSEN} for dev in devs}
    from .ops.entangled_linear import FUSED_ENV

    fused = os.environ.get(FUSED_ENV, "0") not in ("", "0")
    d["entangled_linear"] = (
        "automatic: fused Triton GEMM on CUDA tensor cores (TANGLE_FUSED_LINEAR=1), else superpose + F.linear"
        if fused else "automatic: superpose + F.linear (fused Triton GEMM: backend='triton' or TANGLE_FUSED_LINEAR=1)"
    )
    return d


from .nn import entangle, extract  # noqa: E402  (nn imports the ops above)

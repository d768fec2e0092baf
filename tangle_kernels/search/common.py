"""Small pieces the search loop, the report and the benchmarks share: seeds and
generators, the learning-rate schedule, the weight optimizer, the precision context
and the fixed evaluation batches."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Mapping

import torch

from ..nn.arch import HardArch
from .config import PRECISIONS, SearchConfig, SearchError

__all__ = [
    "derive_seed",
    "generator",
    "detach_arch",
    "cosine_lr",
    "make_w_optimizer",
    "precision_context",
    "eval_batches",
    "eval_model",
    "compile_line",
]


def derive_seed(seed: int, step: int, stream: str, rank: int = 0) -> int:
    """A 63-bit seed for random stream ``stream`` at ``step`` on ``rank`` (BLAKE2b of the
    four values: independent streams, reproducible from (seed, step) alone)."""
    h = hashlib.blake2b(f"{seed}:{step}:{stream}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (CPU unless CUDA) seeded with ``seed``."""
    device = torch.device(device)
    g = torch.Generator(device=device) if device.type == "cuda" else torch.Generator()
    g.manual_seed(seed)
    return g


def detach_arch(arch: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The same arch without gradient (a :class:`HardArch` stays one)."""
    w = {n: v.detach() for n, v in arch.items()}
    return HardArch(w, arch.index) if isinstance(arch, HardArch) else w


def cosine_lr(step: int, total: int, lr: float, lr_min: float) -> float:
    """``lr_min + (lr - lr_min) * (1 + cos(pi * step / total)) / 2``."""
    if total <= 1:
        return lr
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def make_w_optimizer(params, cfg: SearchConfig) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW on the weights, as ``cfg.w_optimizer`` says."""
    if cfg.w_optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@contextlib.contextmanager
def precision_context(precision: str, device):
    """The numeric mode of the forward passes inside (see ``SearchConfig.precision``):
    ``tf32`` turns on TF32 for CUDA matmuls and cuDNN convolutions (restored on exit),
    ``bf16`` enters ``torch.autocast(device.type, dtype=torch.bfloat16)``."""
    device = torch.device(device)
    if precision == "fp32":
        yield
        return
    if precision == "tf32":
        prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
        return
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    raise SearchError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")


def eval_batches(data, cfg: SearchConfig, device, n: int | None = None) -> list:
    """The run's fixed validation batches (seeded from ``cfg.seed`` alone)."""
    g = generator(derive_seed(cfg.seed, 0, "eval"))
    bs = cfg.eval_batch_size or cfg.batch_size
    return [data.batch("val", bs, g, device) for _ in range(n or cfg.eval_batches)]


def eval_model(model: torch.nn.Module, compiler) -> torch.nn.Module:
    """``model``, or its compiled forward under ``--compile``."""
    return model if compiler is None else compiler.module(model)


def compile_line(c: dict) -> str:
    """One line about the ``--compile`` graphs of a run."""
    return (
        f"--compile: {c['graphs']} graph(s) compiled ({c['backend']}"
        f"{', mode ' + c['mode'] if c['mode'] else ''}), {c['compile_s']:.0f} s in first calls"
    )

"""Small helpers for running the search under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node=N -m tangle_kernels.search ...`` sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; :func:`init_from_env` then starts the process group (gloo
on CPU, nccl on CUDA) and picks ``cuda:LOCAL_RANK`` as the device. Weights are trained
under DDP (its gradient all-reduce); the architecture parameters are not part of the DDP
module: every rank draws the same architecture noise (seeded from (seed, step) only) and
:func:`average_grads` averages their gradients before the identical Adam steps, so the
alphas, and hence the derived architecture, stay equal on every rank.

Only rank 0 writes files (metrics, checkpoints, arch.json); ``--resume`` under torchrun
reads the checkpoint on every rank, so the output folder must be visible to all of them
(one machine, or a shared filesystem), and the number of processes must not change.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_from_env",
    "average_grads",
    "all_gather_object",
    "any_flag",
    "shutdown",
]


@dataclass(frozen=True)
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str | torch.device) -> tuple[DistInfo, torch.device]:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    Returns the rank information and the device this rank uses: ``cuda:LOCAL_RANK`` when
    ``device`` is CUDA, else ``device``. Backend: nccl for CUDA, gloo for CPU.
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    here = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        here = True
    return DistInfo(dist.get_world_size(), dist.get_rank(), local, here), device


def average_grads(params: Sequence[torch.Tensor], info: DistInfo) -> None:
    """All-reduce (mean) the ``.grad`` of ``params`` across ranks, in one flat buffer.
    A missing gradient counts as zero."""
    if not info.enabled or not params:
        return
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    off = 0
    for p in params:
        n = p.numel()
        p.grad = flat[off : off + n].view_as(p).clone()
        off += n


def any_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (keeps ranks in step when one
    of them is asked to stop)."""
    if not info.enabled:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_object(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()

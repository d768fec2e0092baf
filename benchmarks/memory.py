"""Peak memory of one call, measured from the allocator's own accounting.

``peak_extra_bytes(fn, device)`` runs ``fn()`` once and returns the peak, over the
call, of the bytes allocated by torch *during* the call and still live, i.e. the
peak memory on top of what was live before (weights, inputs, optimizer state).
Tensors that survive the call (``.grad``, outputs) count, since they are live at
the peak.

- CUDA: ``torch.cuda.reset_peak_memory_stats()``, then
  ``max_memory_allocated() - memory_allocated()`` before the call (the caching
  allocator's exact byte accounting of live tensors, not reserved blocks).
- CPU: torch has no CPU peak counter, and the process RSS is blind to freed-and-
  reused pages and sees the interpreter and caches. We run the call under
  ``torch.profiler.profile(profile_memory=True)``, which records every allocation
  and free of torch's CPU allocator (size and timestamp, in every op, in autograd,
  in Inductor-generated code and for outputs of custom ops), and take the maximum
  over time of the running sum of allocated bytes. This is the same quantity as the
  CUDA measure, from the same kind of allocator events (what the profiler's memory
  timeline draws). Memory not allocated through torch (scratch of a C++ kernel
  using ``malloc``) would be missed; the kernels of this library allocate their
  outputs with torch.

Frees of blocks allocated before the call are not in the profiler's events (torch
warns "Memory block of unknown size was allocated before the profiling started"), so
when a call frees older tensors (the previous step's arch weights) the CPU measure is
an upper bound by at most their size.

Call ``fn`` once before measuring so caches (layout tables, compiled code) exist.
"""

from __future__ import annotations

import gc

import torch

METHOD = {
    "cuda": "torch.cuda.max_memory_allocated - memory_allocated before (reset per call)",
    "cpu": "torch.profiler(profile_memory=True): peak of the running sum of allocator events",
}


def peak_extra_bytes(fn, device: str) -> int:
    """Peak bytes allocated during ``fn()`` on top of what was live before it."""
    return peak_bytes(fn, device)[0]


def peak_bytes(fn, device: str) -> tuple[int, int | None]:
    """``(extra, total)``: the peak bytes allocated during ``fn()`` on top of what was
    live before it, and (CUDA only, else None) the absolute peak of live bytes."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return int(peak - base), int(peak)
    return _cpu_peak(fn), None


def _cpu_peak(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    events = allocation_events(prof)
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return int(peak)


def allocation_events(prof) -> list[tuple[int, int]]:
    """``(time_ns, +bytes | -bytes)`` of every CPU allocation / free the profiler saw,
    in time order."""
    from torch._C._profiler import _EventType

    out = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            if f.device.type == "cpu":
                out.append((int(e.start_time_ns), int(f.alloc_size)))
    out.sort(key=lambda t: t[0])
    return out

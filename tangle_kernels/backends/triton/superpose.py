"""Triton backend of superpose: 2-D tiles over the ``[R, C]`` view of the weight.

Math (see ops/superpose.py): with the per-cell mask values ``T [nrg, ncg]`` and the
row/column group tables of the layout,

    forward:   out[r, c] = W[r, c] * T[rowgrp[r], colgrp[c]]
    backward:  dW[r, c]  = G[r, c] * T[rowgrp[r], colgrp[c]]
               P[i, j]   = sum over rowgrp[r] == i, colgrp[c] == j of G[r, c] * W[r, c]

One program owns one ``BLOCK_R x BLOCK_C`` tile: it loads the two group tables for
its rows and columns, gathers ``T`` (one row of it when the tile lies inside one
row group, the usual case; else one value per element; a tiny table in L1),
and in the backward pass writes dW and reduces ``G * W`` of the tile per cell in
the same sweep: first over the rows of each row group present in the tile (a loop
from the tile's smallest to its largest row group, usually one iteration), then
over columns by a one-hot reduction in chunks of ``GCHUNK`` column groups.

Two modes for P (accumulated in float32, float64 for float64 weights):

- ``deterministic``: each tile writes its per-cell partial sums to its own row of
  a zero-initialised workspace ``[n_tiles, nrg * ncg]``; a second kernel adds the
  rows in tile order. Bitwise repeatable. Default on CPU (interpreter), for float64,
  and when ``torch.are_deterministic_algorithms_enabled()`` or
  ``TANGLE_DETERMINISTIC=1`` (``backends.deterministic_mode``).
- ``atomic``: tiles add their partials to P with float32 atomics (CUDA fast path;
  the order of the additions, hence the last bits of d mix, may vary run to run).

Dtypes: float32, float16, bfloat16 and float64 weights (T is float32, float64 for
float64 weights). Under ``TRITON_INTERPRET=1`` bfloat16 is refused (numpy has no
bfloat16), everything else runs. Non-contiguous 2-D views are read through their
strides (no copy); outputs are contiguous.

Tile shapes come from a heuristic (no autotuning, so the deterministic workspace
size is known before launch and no benchmarking happens inside a training step):
16-byte vectors along C, about 8 KB of each operand per tile, 8 warps; tiles are
shrunk until there are at least ~4 per SM so small weights still fill the GPU.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import deterministic_mode

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
GCHUNK = 16  # column groups reduced per one-hot step


# ----------------------------------------------------------------------- kernels
@triton.jit
def _tile_cell_sums(
    prod,  # [BLOCK_R, BLOCK_C] G*W of the tile (zero outside the weight)
    rg,  # [BLOCK_R] row groups of the tile's rows
    cg,  # [BLOCK_C] column groups of the tile's columns
    rmask,  # [BLOCK_R] rows inside the weight
    cmask,  # [BLOCK_C] columns inside the weight
    base,  # P (ATOMIC) or this tile's workspace row: [nrg * ncg]
    ncg,
    ATOMIC: tl.constexpr,
    GCH: tl.constexpr,
):
    """Add (ATOMIC) or store the per-cell sums of ``prod`` at ``base[rg * ncg + cg]``.

    Row groups first (a loop from the tile's smallest to its largest row group,
    skipping absent ones; usually one iteration), then column groups by a one-hot
    reduction in chunks of GCH. Every cell present in the tile is written once."""
    big = 2147483647
    rg_lo = tl.min(tl.where(rmask, rg, big), axis=0)
    rg_hi = tl.max(tl.where(rmask, rg, -1), axis=0)
    cg_lo = tl.min(tl.where(cmask, cg, big), axis=0)
    cg_hi = tl.max(tl.where(cmask, cg, -1), axis=0)
    js0 = tl.arange(0, GCH)
    for i in range(rg_lo, rg_hi + 1):
        sel = (rg == i) & rmask
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            q = tl.sum(tl.where(sel[:, None], prod, 0.0), axis=0)  # [BLOCK_C]
            for j0 in range(cg_lo, cg_hi + 1, GCH):
                js = j0 + js0
                onehot = (cg[:, None] == js[None, :]) & cmask[:, None]  # [BLOCK_C, GCH]
                v = tl.sum(tl.where(onehot, q[:, None], 0.0), axis=0)  # [GCH]
                present = tl.sum(onehot.to(tl.int32), axis=0) > 0
                dst = base + i * ncg + js
                if ATOMIC:
                    tl.atomic_add(dst, v, mask=present, sem="relaxed")
                else:
                    tl.store(dst, v, mask=present)


@triton.jit
def _tile(pid, n_tiles_c, R, C, rowgrp_ptr, colgrp_ptr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tile of program ``pid``: 64-bit row/column indices, the in-bounds masks and
    the row/column groups (shared by fwd and bwd)."""
    pid_r = pid // n_tiles_c
    pid_c = pid % n_tiles_c
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    rg = tl.load(rowgrp_ptr + rows, mask=rmask, other=0)
    cg = tl.load(colgrp_ptr + cols, mask=cmask, other=0)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    return rows64, cols64, rmask, cmask, mask, rg, cg


@triton.jit
def _scale_by_mask(x, rg, cg, rmask, cmask, mask, t_ptr, ncg):
    """``x * T[rg, cg]`` (in T's dtype). A tile inside one row group (the usual case:
    row groups are hundreds of rows) gathers one ``[BLOCK_C]`` row of T instead of
    one value per element, which keeps the load units free for the stream."""
    big = 2147483647
    rg_lo = tl.min(tl.where(rmask, rg, big), axis=0)
    rg_hi = tl.max(tl.where(rmask, rg, -1), axis=0)
    if rg_lo == rg_hi:
        tvc = tl.load(t_ptr + (rg_lo * ncg + cg), mask=cmask, other=0.0)
        out = x.to(tvc.dtype) * tvc[None, :]
    else:
        tv = tl.load(t_ptr + (rg[:, None] * ncg + cg[None, :]), mask=mask, other=0.0)
        out = x.to(tv.dtype) * tv
    return out


# Sizes that only bound loops or index tables are not specialised on (each distinct
# value of R % 16 or ncg == 1 would otherwise compile a new kernel); C stays
# specialised so the contiguous output rows keep their 16-byte alignment hints.
@triton.jit(do_not_specialize=["R", "ncg", "n_tiles_c"])
def _superpose_fwd_kernel(
    w_ptr,  # [R, C] weight, strides (s_wr, s_wc)
    out_ptr,  # [R, C] W_mix, contiguous, weight's dtype
    t_ptr,  # [nrg * ncg] cell values (float32 / float64)
    rowgrp_ptr,  # [R] int32 row group of each row
    colgrp_ptr,  # [C] int32 column group of each column
    R,
    C,
    ncg,
    s_wr,
    s_wc,
    n_tiles_c,  # number of tiles along C
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows64, cols64, rmask, cmask, mask, rg, cg = _tile(
        pid, n_tiles_c, R, C, rowgrp_ptr, colgrp_ptr, BLOCK_R, BLOCK_C
    )
    w = tl.load(w_ptr + rows64[:, None] * s_wr + cols64[None, :] * s_wc, mask=mask, other=0.0)
    out = _scale_by_mask(w, rg, cg, rmask, cmask, mask, t_ptr, ncg).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64[:, None] * C + cols64[None, :], out, mask=mask)


@triton.jit(do_not_specialize=["R", "ncg", "ncells", "n_tiles_c"])
def _superpose_bwd_kernel(
    g_ptr,  # [R, C] upstream gradient dL/dW_mix, strides (s_gr, s_gc)
    w_ptr,  # [R, C] weight, strides (s_wr, s_wc)
    dw_ptr,  # [R, C] dW, contiguous, weight's dtype
    t_ptr,  # [nrg * ncg] cell values
    p_ptr,  # ATOMIC: [nrg * ncg] P (zeroed); else [n_tiles, nrg * ncg] workspace (zeroed)
    rowgrp_ptr,  # [R] int32
    colgrp_ptr,  # [C] int32
    R,
    C,
    ncg,
    ncells,
    s_gr,
    s_gc,
    s_wr,
    s_wc,
    n_tiles_c,
    ATOMIC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GCH: tl.constexpr,
):
    pid = tl.program_id(0)
    rows64, cols64, rmask, cmask, mask, rg, cg = _tile(
        pid, n_tiles_c, R, C, rowgrp_ptr, colgrp_ptr, BLOCK_R, BLOCK_C
    )
    g = tl.load(g_ptr + rows64[:, None] * s_gr + cols64[None, :] * s_gc, mask=mask, other=0.0)
    w = tl.load(w_ptr + rows64[:, None] * s_wr + cols64[None, :] * s_wc, mask=mask, other=0.0)
    dw = _scale_by_mask(g, rg, cg, rmask, cmask, mask, t_ptr, ncg)
    tl.store(dw_ptr + rows64[:, None] * C + cols64[None, :], dw.to(dw_ptr.dtype.element_ty), mask=mask)
    acc_ty = t_ptr.dtype.element_ty
    prod = g.to(acc_ty) * w.to(acc_ty)  # zero outside the weight (masked loads)

    if ATOMIC:
        base = p_ptr
    else:
        base = p_ptr + pid.to(tl.int64) * ncells
    _tile_cell_sums(prod, rg, cg, rmask, cmask, base, ncg, ATOMIC, GCH)


@triton.jit(do_not_specialize=["n_rows", "ncells"])
def _reduce_partials_kernel(
    ws_ptr,  # [n_rows, ncells] per-tile partial sums
    p_ptr,  # [ncells] output
    n_rows,
    ncells,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < ncells
    acc = tl.zeros([BLOCK], dtype=p_ptr.dtype.element_ty)
    ptrs = ws_ptr + offs  # 64-bit pointer arithmetic from here on
    for _ in range(0, n_rows):  # fixed order: bitwise repeatable
        acc += tl.load(ptrs, mask=m, other=0.0)
        ptrs += ncells
    tl.store(p_ptr + offs, acc, mask=m)


# ----------------------------------------------------------------------- launch
def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = torch.cuda.get_device_properties(idx).multi_processor_count
        _SM_COUNT[idx] = n
    return n


def tile_config(R: int, C: int, elem_bytes: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)`` for an ``R x C`` weight of ``elem_bytes`` bytes."""
    return _tile_config(R, C, elem_bytes, device.type, device.index)


@functools.lru_cache(maxsize=4096)
def _tile_config(R: int, C: int, elem_bytes: int, dev_type: str, dev_index) -> tuple[int, int, int]:
    device = torch.device(dev_type, dev_index) if dev_index is not None else torch.device(dev_type)
    if device.type != "cuda":  # interpreter: few, large programs (numpy per op)
        return min(_np2(R), 32), min(max(_np2(C), 16), 64), 1
    bc_max = {8: 128, 4: 256, 2: 512}.get(elem_bytes, 256)
    BLOCK_C = min(max(_np2(C), 16), bc_max)
    target = 8192 // elem_bytes * 4  # ~8 KB of each operand per tile
    BLOCK_R = max(2, min(_np2(R), max(1, target // BLOCK_C)))
    min_tiles = 4 * _num_sms(device)
    while BLOCK_R > 2 and triton.cdiv(R, BLOCK_R) * triton.cdiv(C, BLOCK_C) < min_tiles:
        BLOCK_R //= 2
    num_warps = 8 if BLOCK_R * BLOCK_C >= 4096 else 4
    return BLOCK_R, BLOCK_C, num_warps


def _check(w2d: torch.Tensor, t: torch.Tensor) -> None:
    if w2d.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"triton backend: weight dtype {w2d.dtype} is not supported")
    if _INTERPRET and w2d.dtype == torch.bfloat16 and w2d.device.type == "cpu":
        raise TypeError(
            "triton backend: bfloat16 is not supported under TRITON_INTERPRET=1 "
            "(numpy has no bfloat16); use float32/float16/float64, or a GPU"
        )
    want = torch.float64 if w2d.dtype == torch.float64 else torch.float32
    if t.dtype != want:
        raise TypeError(f"triton backend: cell values must be {want} for {w2d.dtype} weights, got {t.dtype}")


def forward(w2d: torch.Tensor, t: torch.Tensor, tabs: dict) -> torch.Tensor:
    """``W * T[cell]`` for the ``[R, C]`` weight view ``w2d`` (any strides)."""
    _check(w2d, t)
    R, C = w2d.shape
    out = torch.empty((R, C), dtype=w2d.dtype, device=w2d.device)
    if R * C == 0:
        return out
    t = t.contiguous()
    BR, BC, nw = tile_config(R, C, w2d.element_size(), w2d.device)
    ntc = triton.cdiv(C, BC)
    grid = (triton.cdiv(R, BR) * ntc,)
    _superpose_fwd_kernel[grid](
        w2d, out, t, tabs["rowgrp"], tabs["colgrp"], R, C, t.shape[1],
        w2d.stride(0), w2d.stride(1), ntc, BLOCK_R=BR, BLOCK_C=BC, num_warps=nw,
    )
    return out


def p_mode(device: torch.device, tdtype: torch.dtype) -> str:
    """``"deterministic"`` or ``"atomic"``: how :func:`backward` reduces P by default."""
    if device.type != "cuda" or tdtype == torch.float64 or deterministic_mode():
        return "deterministic"
    return "atomic"


def backward(g2d: torch.Tensor, w2d: torch.Tensor, t: torch.Tensor, tabs: dict, mode: str | None = None):
    """``(dW, P)`` in one sweep over G and W; ``mode`` overrides :func:`p_mode`."""
    _check(w2d, t)
    if g2d.dtype != w2d.dtype:
        raise TypeError(f"triton backend: grad dtype {g2d.dtype} != weight dtype {w2d.dtype}")
    R, C = w2d.shape
    nrg, ncg = t.shape
    ncells = nrg * ncg
    mode = mode or p_mode(w2d.device, t.dtype)
    if mode not in ("deterministic", "atomic"):
        raise ValueError(f"mode: expected 'deterministic' or 'atomic', got {mode!r}")
    if mode == "atomic" and t.dtype != torch.float32:
        raise ValueError("mode='atomic' needs float32 cell values (float64 runs deterministic)")
    dw = torch.empty((R, C), dtype=w2d.dtype, device=w2d.device)
    if R * C == 0:
        return dw, torch.zeros_like(t)
    t = t.contiguous()
    BR, BC, nw = tile_config(R, C, w2d.element_size(), w2d.device)
    ntc = triton.cdiv(C, BC)
    n_tiles = triton.cdiv(R, BR) * ntc
    if mode == "atomic":
        p = torch.zeros(ncells, dtype=t.dtype, device=t.device)
        dst = p
    else:
        dst = torch.zeros((n_tiles, ncells), dtype=t.dtype, device=t.device)
    _superpose_bwd_kernel[(n_tiles,)](
        g2d, w2d, dw, t, dst, tabs["rowgrp"], tabs["colgrp"], R, C, ncg, ncells,
        g2d.stride(0), g2d.stride(1), w2d.stride(0), w2d.stride(1), ntc,
        ATOMIC=mode == "atomic", BLOCK_R=BR, BLOCK_C=BC, GCH=GCHUNK, num_warps=nw,
    )
    if mode != "atomic":
        p = torch.empty(ncells, dtype=t.dtype, device=t.device)
        RB = min(max(_np2(ncells), 16), 1024)
        _reduce_partials_kernel[(triton.cdiv(ncells, RB),)](dst, p, n_tiles, ncells, BLOCK=RB)
    return dw, p.reshape(nrg, ncg)

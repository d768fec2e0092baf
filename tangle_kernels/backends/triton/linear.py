"""Triton kernels of the fused entangled linear: the mask is applied inside the GEMMs.

With ``W_mix[o, i] = W[o, i] * T[rowgrp[o], colgrp[i]]`` (never written to memory):

    forward:  y  = x @ W_mix^T (+ b_mix)
    backward: dx = dy @ W_mix
              G  = dy^T @ x                        (the unmasked dL/dW_mix, fp32 accumulator)
              dW = G * T[cell]                     epilogue of the G GEMM
              P  = per-cell sums of G * W          same epilogue (tile partials, see
                                                   triton/superpose.py _tile_cell_sums)

The mask is piecewise constant: along the reduction dimension of the forward GEMM
(the input features ``i``) it changes only at the layout's column cuts, along the
one of the dx GEMM (the output features ``o``) only at its row cuts. So the mask is
applied to the ACCUMULATOR, not to the operand tiles: the reduction runs over the
maximal runs of one column group (``tabs["runs"]``; row runs ``tabs["rowruns"]`` for
dx), and at the end of a run the partial tile is scaled by the run's mask column
``T[rowgrp[o], j]`` (a ``[BN]`` vector) and added to the output accumulator. Two
main loops:

- FLAT (every run starts at a multiple of the K tile, ``layout.run_start_align``;
  the GPT-2 widths 384/576/768 and their multiples): ONE loop over all K tiles,
  operands straight from memory to the tensor cores, pipelined across run
  boundaries; a tile is its run's last where the group of the next tile differs,
  and only there is the MMA waited for and the partial tile folded in (the pattern
  of Triton's persistent matmul). ``Kred`` is specialised: a multiple of 16 keeps
  the loop pipelined (scripts/triton_aot_check.py checks one loop, async copies).
- otherwise one pipelined GEMM loop per run; a run whose mask values are all
  exactly 0 on the tile is skipped. When every run boundary is a multiple of 16 the
  kernels are told so (``tl.multiple_of``), which keeps 16-byte vector loads.

Numerics: the products ``x * W`` are exact-in-fp32 tensor-core products of the
unmasked operands (TF32 for float32 exactly when PyTorch's
``torch.backends.cuda.matmul.allow_tf32`` is on, as cuBLAS would), accumulated in
float32, then scaled by ``T`` in float32: at least as accurate as rounding ``W_mix``
to the input dtype and calling ``F.linear``.

Tile shapes: a fixed heuristic per dtype and size (no benchmarking inside a training
step, and the deterministic workspace size is known before launch).
``TANGLE_TRITON_AUTOTUNE=1`` autotunes over a few Hopper/Ampere configs instead (keyed
on the GEMM sizes; the first call of each shape then takes seconds). One 16x16x16
config under ``TRITON_INTERPRET=1``. P modes as in triton/superpose.py (deterministic
workspace + fixed-order reduction, or float32 atomics on CUDA).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .superpose import _reduce_partials_kernel, _tile_cell_sums, p_mode

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
GCHUNK = 16


def autotune_enabled() -> bool:
    return not _INTERPRET and os.environ.get("TANGLE_TRITON_AUTOTUNE", "0") not in ("", "0")


def _configs(kind: str):
    """The autotune candidates (``TANGLE_TRITON_AUTOTUNE=1``)."""
    out = []
    for bm, bn, bk, w, s in (
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 256, 64, 8, 3),
    ):
        if kind == "dw" and bn == 256:
            continue
        out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s))
    return out


@functools.lru_cache(maxsize=1024)
def fixed_config(M: int, N: int, elem_bytes: int) -> tuple[dict, int, int]:
    """``(meta, num_warps, num_stages)`` of the heuristic tile for an ``M x N`` output."""
    if _INTERPRET:
        return {"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 4}, 1, 1
    BM = 128 if M > 64 else 64
    BN = 128 if N > 64 else 64
    BK = 32 if elem_bytes >= 4 else 64  # 16 KB of each operand per stage
    warps = 8 if BM * BN >= 128 * 128 else 4
    return {"BM": BM, "BN": BN, "BK": BK, "GROUP_M": 8}, warps, 3


@triton.jit
def _pid_grouped(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) ordering of the output tiles."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _load_ab(a_ptr, s_am, s_ak, b_ptr, s_bk, s_bn, rm64, rn64, rmask, nmask, k0, k_end, BK: tl.constexpr):
    """The ``[BM, BK]`` tile of A and the ``[BK, BN]`` tile of B at reduction index
    ``k0`` (indices at or past ``k_end`` read as 0): the operands of one tl.dot."""
    rk = k0 + tl.arange(0, BK)
    kmask = rk < k_end
    rk64 = rk.to(tl.int64)
    a = tl.load(a_ptr + rm64[:, None] * s_am + rk64[None, :] * s_ak, mask=rmask[:, None] & kmask[None, :], other=0.0)
    b = tl.load(b_ptr + rk64[:, None] * s_bk + rn64[None, :] * s_bn, mask=kmask[:, None] & nmask[None, :], other=0.0)
    return a, b


@triton.jit
def _masked_gemm_runs(
    a_ptr, s_am, s_ak,  # A [M, Kred]
    b_ptr, s_bk, s_bn,  # B [Kred, N]
    t_ptr, tbase, t_stride,  # mask of run r on the tile: T[tbase + j * t_stride]  ([BN])
    runs_ptr, n_runs,  # [n_runs, 3] int32: (lo, hi, group j) along Kred
    rm64, rn64, rmask, nmask,
    PREC: tl.constexpr, ALIGNED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """``sum_runs (A[:, run] @ B[run, :]) * T[tbase + j_run * t_stride][None, :]``."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for r in range(0, n_runs):
        k_lo = tl.load(runs_ptr + 3 * r)
        k_hi = tl.load(runs_ptr + 3 * r + 1)
        j = tl.load(runs_ptr + 3 * r + 2)
        if ALIGNED:
            k_lo = tl.multiple_of(k_lo, 16)
            k_hi = tl.multiple_of(k_hi, 16)
        tv = tl.load(t_ptr + (tbase + j * t_stride), mask=nmask, other=0.0)
        # skip a run whose mask is exactly 0 on the whole tile (NaN != 0 is kept)
        if tl.sum((tv != 0.0).to(tl.int32), axis=0) > 0:
            part = tl.zeros([BM, BN], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BK):
                a, b = _load_ab(a_ptr, s_am, s_ak, b_ptr, s_bk, s_bn, rm64, rn64, rmask, nmask, k0, k_hi, BK)
                part = tl.dot(a, b, part, input_precision=PREC)
            acc += part * tv[None, :]
    return acc


@triton.jit
def _masked_gemm_flat(
    a_ptr, s_am, s_ak,  # A [M, Kred]
    b_ptr, s_bk, s_bn,  # B [Kred, N]
    t_ptr, tbase, t_stride,
    kgrp_ptr, Kred,  # [Kred] int32: the mask group of each reduction index
    rm64, rn64, rmask, nmask,
    PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """:func:`_masked_gemm_runs` as ONE main loop over all K tiles, for layouts whose run
    starts are multiples of BK (no tile straddles two runs): the software pipeline runs
    across run boundaries instead of refilling at each run (the pattern of Triton's
    persistent matmul: the partial tile is folded into the output accumulator in a
    branch taken at the last tile of each run, the only place the MMA is waited for).
    A tile is the last of its run where the group of the next tile's first index
    differs (runs are maximal runs of one group); every load here depends only on the
    loop index, which keeps the loop pipelinable."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    part = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, Kred, BK):
        j = tl.load(kgrp_ptr + k0)
        j_next = tl.load(kgrp_ptr + k0 + BK, mask=k0 + BK < Kred, other=-1)
        a, b = _load_ab(a_ptr, s_am, s_ak, b_ptr, s_bk, s_bn, rm64, rn64, rmask, nmask, k0, Kred, BK)
        part = tl.dot(a, b, part, input_precision=PREC)
        if j_next != j:  # the last tile of a run
            tv = tl.load(t_ptr + (tbase + j * t_stride), mask=nmask, other=0.0)
            acc += part * tv[None, :]
            part = tl.zeros([BM, BN], dtype=tl.float32)
    return acc


@triton.jit(do_not_specialize=["tab_scale", "t_stride", "n_runs"])
def _masked_linear_kernel(
    a_ptr,  # [M, Kred] left operand (x for y; dy for dx), strides s_am, s_ak
    b_ptr,  # [Kred, N] right operand (W^T for y; W for dx), strides s_bk, s_bn
    t_ptr,  # [nrg * ncg] float32 cell values
    tab_ptr,  # [N] int32 group of each output column (rowgrp for y; colgrp for dx)
    tab_scale,  # T[...] index of output column n and run group j:
    t_stride,  #   tab[n] * tab_scale + j * t_stride
    runs_ptr,  # [n_runs, 3] int32 runs (lo, hi, group j) over Kred
    n_runs,
    kgrp_ptr,  # [Kred] int32 group of each reduction index (FLAT: colgrp for y; rowgrp for dx)
    Kred,  # the reduction length (FLAT; specialised: a multiple of 16 keeps the loop pipelined)
    bias_ptr,  # [N] superposed bias (HAS_BIAS)
    out_ptr,  # [M, N] output, contiguous
    M,
    N,
    s_am,
    s_ak,
    s_bk,
    s_bn,
    HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr,
    ALIGNED: tl.constexpr,
    FLAT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``out = sum_runs (A[:, run] @ B[run, :]) * T[cell(n, run)] (+ bias)``: the forward
    (``y = x @ W_mix^T``: runs over input features, T row from rowgrp[n]) and the dx
    GEMM (``dx = dy @ W_mix``: runs over output features, T column from colgrp[n])."""
    pid_m, pid_n = _pid_grouped(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rmask = rm < M
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    tbase = tl.load(tab_ptr + rn, mask=nmask, other=0) * tab_scale
    if FLAT:
        acc = _masked_gemm_flat(a_ptr, s_am, s_ak, b_ptr, s_bk, s_bn, t_ptr, tbase, t_stride, kgrp_ptr,
                                Kred, rm64, rn64, rmask, nmask, PREC, BM, BN, BK)
    else:
        acc = _masked_gemm_runs(a_ptr, s_am, s_ak, b_ptr, s_bk, s_bn, t_ptr, tbase, t_stride, runs_ptr, n_runs,
                                rm64, rn64, rmask, nmask, PREC, ALIGNED, BM, BN, BK)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rm64[:, None] * N + rn64[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None] & nmask[None, :],
    )


@triton.jit(do_not_specialize=["ncg", "ncells"])
def _linear_dw_kernel(
    dy_ptr,  # [K, M] upstream gradient (K = batch, M = out features), strides s_dk, s_dm
    x_ptr,  # [K, N] input (N = in features), strides s_xk, s_xn
    w_ptr,  # [M, N] weight, strides s_wm, s_wn
    t_ptr,
    rowgrp_ptr,  # [M] int32
    colgrp_ptr,  # [N] int32
    dw_ptr,  # [M, N] dW, contiguous
    p_ptr,  # ATOMIC: [ncells] P; else [max_tiles, ncells] workspace (both zeroed)
    M,
    N,
    K,
    ncg,
    ncells,
    s_dk,
    s_dm,
    s_xk,
    s_xn,
    s_wm,
    s_wn,
    ATOMIC: tl.constexpr,
    PREC: tl.constexpr,
    GCH: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _pid_grouped(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rmask = rm < M
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):  # G = dy^T x: A[m, k] = dy[k, m], B[k, n] = x[k, n]
        a, b = _load_ab(dy_ptr, s_dm, s_dk, x_ptr, s_xk, s_xn, rm64, rn64, rmask, nmask, k0, K, BK)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    # Epilogue: dW = G * T[cell]; P partials of G * W.
    mask = rmask[:, None] & nmask[None, :]
    rg = tl.load(rowgrp_ptr + rm, mask=rmask, other=0)
    cg = tl.load(colgrp_ptr + rn, mask=nmask, other=0)
    tv = tl.load(t_ptr + (rg[:, None] * ncg + cg[None, :]))
    tl.store(dw_ptr + rm64[:, None] * N + rn64[None, :], (acc * tv).to(dw_ptr.dtype.element_ty), mask=mask)
    w = tl.load(w_ptr + rm64[:, None] * s_wm + rn64[None, :] * s_wn, mask=mask, other=0.0)
    prod = acc * w.to(tl.float32)
    if ATOMIC:
        base = p_ptr
    else:
        base = p_ptr + tl.program_id(0).to(tl.int64) * ncells
    _tile_cell_sums(prod, rg, cg, rmask, nmask, base, ncg, ATOMIC, GCH)


# ----------------------------------------------------------------------- launch
SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _prec(dtype: torch.dtype) -> str:
    """tl.dot input precision: only float32 operands are affected (TF32 iff PyTorch
    allows it for cuBLAS); 16-bit operands pass the default "tf32", a no-op for them."""
    if dtype != torch.float32:
        return "tf32"
    if not _INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


_TUNED: dict = {}


def _tuned(kind: str):
    """The autotuned variant of a kernel (built on first use)."""
    k = _TUNED.get(kind)
    if k is None:
        if kind == "dw":
            k = triton.autotune(configs=_configs(kind), key=["M", "N", "K"], reset_to_zero=["p_ptr"])(_linear_dw_kernel)
        else:  # fwd and dx: one kernel, two autotuners; s_am = the reduction length here
            k = triton.autotune(configs=_configs(kind), key=["M", "N", "s_am"])(_masked_linear_kernel)
        _TUNED[kind] = k
    return k


def _launch(kind: str, kernel, M: int, N: int, elem_bytes: int, args: tuple, kwargs: dict,
            start_align: int = 0) -> None:
    """Launch over the ``M x N`` output tiles, fixed heuristic tile or autotuned.
    ``start_align`` (fwd / dx): the power of two dividing every run start; the
    one-pipeline main loop (FLAT) is taken when the K tile divides it."""
    if autotune_enabled():
        if kind != "dw":
            kwargs = dict(kwargs, FLAT=start_align >= max(c.kwargs["BK"] for c in _configs(kind)))
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
        _tuned(kind)[grid](*args, **kwargs)
        return
    meta, warps, stages = fixed_config(M, N, elem_bytes)
    if kind != "dw":
        kwargs = dict(kwargs, FLAT=start_align >= meta["BK"])
    grid = (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)
    kernel[grid](*args, **kwargs, **meta, num_warps=warps, num_stages=stages)


def check_supported(x2d: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dtype not in SUPPORTED:
        raise TypeError(f"weight: the fused triton linear supports {SUPPORTED}, got {weight.dtype}")
    if x2d.dtype != weight.dtype:
        raise TypeError(f"x: dtype {x2d.dtype} != weight dtype {weight.dtype}")
    if _INTERPRET and weight.device.type == "cpu" and weight.dtype != torch.float32:
        raise TypeError("the fused triton linear runs only float32 under TRITON_INTERPRET=1")


def linear_forward(x2d, weight, t, tabs, bias_mix=None, aligned: bool = False, start_align: int = 0):
    """``x2d @ (W * T[cell])^T (+ bias_mix)``; x2d ``[M, in]``, weight ``[out, in]``.

    ``tabs``: the layout's ``rowgrp`` and column ``runs``; ``aligned``: every column
    run boundary is a multiple of 16 (``layout.run_alignment``); ``start_align``: the
    power of two dividing every column run start (``layout.run_start_align[0]``; 0 =
    unknown: the per-run main loop)."""
    check_supported(x2d, weight)
    M, K = x2d.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_() + (bias_mix if bias_mix is not None else 0)
    t = t.contiguous()
    b = bias_mix.contiguous() if bias_mix is not None else y
    runs = tabs["runs"]
    # B = W^T: element (k, n) at weight[n, k]
    args = (x2d, weight, t, tabs["rowgrp"], t.shape[1], 1, runs, runs.shape[0], tabs["colgrp"], K, b, y, M, N,
            x2d.stride(0), x2d.stride(1), weight.stride(1), weight.stride(0))
    kwargs = dict(HAS_BIAS=bias_mix is not None, PREC=_prec(x2d.dtype), ALIGNED=bool(aligned))
    _launch("fwd", _masked_linear_kernel, M, N, x2d.element_size(), args, kwargs, start_align)
    return y


def linear_backward(dy, x2d, weight, t, tabs, mode: str | None = None, aligned_rows: bool = False,
                    start_align_rows: int = 0):
    """``(dx, dW, P)`` of the fused linear (bias gradient is ``dy.sum(0)``, done by the caller).

    ``tabs``: ``rowgrp``, ``colgrp`` and the row runs ``rowruns``; ``aligned_rows``:
    every row run boundary is a multiple of 16; ``start_align_rows``: the power of two
    dividing every row run start (``layout.run_start_align[1]``)."""
    check_supported(x2d, weight)
    dy = dy.to(x2d.dtype)
    M, K = x2d.shape  # batch, in
    N = weight.shape[0]  # out
    nrg, ncg = t.shape
    ncells = nrg * ncg
    t = t.contiguous()
    mode = mode or p_mode(weight.device, t.dtype)
    if mode not in ("deterministic", "atomic"):
        raise ValueError(f"mode: expected 'deterministic' or 'atomic', got {mode!r}")
    prec = _prec(x2d.dtype)
    eb = x2d.element_size()
    dx = torch.empty((M, K), dtype=x2d.dtype, device=x2d.device)
    dw = torch.empty((N, K), dtype=weight.dtype, device=weight.device)
    if M == 0 or N == 0 or K == 0:
        return dx.zero_(), dw.zero_(), torch.zeros_like(t)
    rr = tabs["rowruns"]
    _launch(
        "dx", _masked_linear_kernel, M, K, eb,
        (dy, weight, t, tabs["colgrp"], 1, ncg, rr, rr.shape[0], tabs["rowgrp"], N, dx, dx, M, K,
         dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1)),
        dict(HAS_BIAS=False, PREC=prec, ALIGNED=bool(aligned_rows)), start_align_rows,
    )
    if mode == "atomic":
        dst = torch.zeros(ncells, dtype=torch.float32, device=t.device)
    else:
        if autotune_enabled():
            # the autotuner may pick any config: rows for the smallest tile of any of
            # them; rows a config does not use stay zero and add nothing
            bm = min(c.kwargs["BM"] for c in _configs("dw"))
            bn = min(c.kwargs["BN"] for c in _configs("dw"))
        else:
            meta = fixed_config(N, K, eb)[0]
            bm, bn = meta["BM"], meta["BN"]
        dst = torch.zeros((triton.cdiv(N, bm) * triton.cdiv(K, bn), ncells), dtype=torch.float32, device=t.device)
    _launch(
        "dw", _linear_dw_kernel, N, K, eb,
        (dy, x2d, weight, t, tabs["rowgrp"], tabs["colgrp"], dw, dst, N, K, M, ncg, ncells,
         dy.stride(0), dy.stride(1), x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1)),
        dict(ATOMIC=mode == "atomic", PREC=prec, GCH=GCHUNK),
    )
    if mode == "atomic":
        p = dst
    else:
        p = torch.empty(ncells, dtype=torch.float32, device=t.device)
        RB = min(max(1 << max(0, ncells - 1).bit_length(), 16), 1024)
        _reduce_partials_kernel[(triton.cdiv(ncells, RB),)](dst, p, dst.shape[0], ncells, BLOCK=RB)
    return dx, dw, p.reshape(nrg, ncg).to(t.dtype)

"""Triton kernels of the fused entangled linear: the mask is applied inside the GEMMs.

With ``W_mix[o, i] = W[o, i] * T[rowgrp[o], colgrp[i]]`` (never written to memory):

    forward:  y  = x @ W_mix^T (+ b_mix)           mask applied to each W tile on load
    backward: dx = dy @ W_mix                      mask applied to each W tile on load
              G  = dy^T @ x                        (the unmasked dL/dW_mix, fp32 accumulator)
              dW = G * T[cell]                     epilogue of the G GEMM
              P  = per-cell sums of G * W          same epilogue (tile partials, see
                                                   triton_superpose._tile_cell_sums)

The masked W tile is rounded to the input dtype once (as ``superpose`` does) before
``tl.dot``; accumulation is float32. For float32 inputs the dot uses TF32 exactly
when PyTorch's ``torch.backends.cuda.matmul.allow_tf32`` is on (as cuBLAS would),
full IEEE float32 otherwise. P modes as in triton_superpose (deterministic workspace
+ fixed-order reduction, or float32 atomics on CUDA).

Tile shapes: autotuned on CUDA (a few Hopper/Ampere-friendly configs, keyed on the
GEMM sizes); one 16x16x16 config under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_superpose import _reduce_partials_kernel, _tile_cell_sums, p_mode

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
GCHUNK = 16


def _configs(kind: str):
    if _INTERPRET:
        return [triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 4}, num_warps=1, num_stages=1)]
    out = []
    for bm, bn, bk, w, s in (
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 256, 64, 8, 3),
    ):
        if kind == "dw" and bn == 256:
            continue
        out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s))
    return out


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


@triton.autotune(configs=_configs("fwd"), key=["M", "N", "K"])
@triton.jit
def _linear_fwd_kernel(
    x_ptr,  # [M, K] input (strides s_xm, s_xk)
    w_ptr,  # [N, K] max-size weight (strides s_wn, s_wk)
    t_ptr,  # [nrg * ncg] float32 cell values
    rowgrp_ptr,  # [N] int32 row (output-feature) groups
    colgrp_ptr,  # [K] int32 column (input-feature) groups
    b_ptr,  # [N] superposed bias (HAS_BIAS)
    y_ptr,  # [M, N] output, contiguous
    M,
    N,
    K,
    ncg,
    s_xm,
    s_xk,
    s_wn,
    s_wk,
    HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr,
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
    trow = tl.load(rowgrp_ptr + rn, mask=nmask, other=0) * ncg
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < K
        x = tl.load(x_ptr + rm64[:, None] * s_xm + rk[None, :] * s_xk, mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + rn64[:, None] * s_wn + rk[None, :] * s_wk, mask=nmask[:, None] & kmask[None, :], other=0.0)
        cg = tl.load(colgrp_ptr + rk, mask=kmask, other=0)
        tm = tl.load(t_ptr + (trow[:, None] + cg[None, :]))  # in bounds: masked groups are 0
        wm = (w.to(tl.float32) * tm).to(x.dtype)
        acc = tl.dot(x, tl.trans(wm), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rm64[:, None] * N + rn64[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=rmask[:, None] & nmask[None, :],
    )


@triton.autotune(configs=_configs("dx"), key=["M", "N", "K"])
@triton.jit
def _linear_dx_kernel(
    dy_ptr,  # [M, K] upstream gradient (K = out features), strides s_dm, s_dk
    w_ptr,  # [K, N] weight (N = in features), strides s_wk, s_wn
    t_ptr,
    rowgrp_ptr,  # [K] int32 (output-feature groups)
    colgrp_ptr,  # [N] int32 (input-feature groups)
    dx_ptr,  # [M, N] contiguous
    M,
    N,
    K,
    ncg,
    s_dm,
    s_dk,
    s_wk,
    s_wn,
    PREC: tl.constexpr,
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
    cg = tl.load(colgrp_ptr + rn, mask=nmask, other=0)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < K
        rk64 = rk.to(tl.int64)
        dy = tl.load(dy_ptr + rm64[:, None] * s_dm + rk[None, :] * s_dk, mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + rk64[:, None] * s_wk + rn64[None, :] * s_wn, mask=kmask[:, None] & nmask[None, :], other=0.0)
        rg = tl.load(rowgrp_ptr + rk, mask=kmask, other=0)
        tm = tl.load(t_ptr + (rg[:, None] * ncg + cg[None, :]))
        wm = (w.to(tl.float32) * tm).to(dy.dtype)
        acc = tl.dot(dy, wm, acc, input_precision=PREC)
    tl.store(
        dx_ptr + rm64[:, None] * N + rn64[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=rmask[:, None] & nmask[None, :],
    )


@triton.autotune(configs=_configs("dw"), key=["M", "N", "K"], reset_to_zero=["p_ptr"])
@triton.jit
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
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < K
        rk64 = rk.to(tl.int64)
        a = tl.load(dy_ptr + rk64[None, :] * s_dk + rm64[:, None] * s_dm, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(x_ptr + rk64[:, None] * s_xk + rn64[None, :] * s_xn, mask=kmask[:, None] & nmask[None, :], other=0.0)
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


def _grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)


def check_supported(x2d: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dtype not in SUPPORTED:
        raise TypeError(f"weight: the fused triton linear supports {SUPPORTED}, got {weight.dtype}")
    if x2d.dtype != weight.dtype:
        raise TypeError(f"x: dtype {x2d.dtype} != weight dtype {weight.dtype}")
    if _INTERPRET and weight.device.type == "cpu" and weight.dtype != torch.float32:
        raise TypeError("the fused triton linear runs only float32 under TRITON_INTERPRET=1")


def linear_forward(x2d, weight, t, tabs, bias_mix=None):
    """``x2d @ (W * T[cell])^T (+ bias_mix)``; x2d ``[M, in]``, weight ``[out, in]``."""
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
    _linear_fwd_kernel[_grid(M, N)](
        x2d, weight, t, tabs["rowgrp"], tabs["colgrp"], b, y, M, N, K, t.shape[1],
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias_mix is not None, PREC=_prec(x2d.dtype),
    )
    return y


def linear_backward(dy, x2d, weight, t, tabs, mode: str | None = None):
    """``(dx, dW, P)`` of the fused linear (bias gradient is ``dy.sum(0)``, done by the caller)."""
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
    dx = torch.empty((M, K), dtype=x2d.dtype, device=x2d.device)
    dw = torch.empty((N, K), dtype=weight.dtype, device=weight.device)
    if M == 0 or N == 0 or K == 0:
        return dx.zero_(), dw.zero_(), torch.zeros_like(t)
    _linear_dx_kernel[_grid(M, K)](
        dy, weight, t, tabs["rowgrp"], tabs["colgrp"], dx, M, K, N, ncg,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), PREC=prec,
    )
    if mode == "atomic":
        dst = torch.zeros(ncells, dtype=torch.float32, device=t.device)
    else:
        # Rows for the smallest tile of any config: the autotuner may pick any of them;
        # rows a config does not use stay zero and add nothing.
        min_bm = min(c.kwargs["BM"] for c in _linear_dw_kernel.configs)
        min_bn = min(c.kwargs["BN"] for c in _linear_dw_kernel.configs)
        max_tiles = triton.cdiv(N, min_bm) * triton.cdiv(K, min_bn)
        dst = torch.zeros((max_tiles, ncells), dtype=torch.float32, device=t.device)
    _linear_dw_kernel[_grid(N, K)](
        dy, x2d, weight, t, tabs["rowgrp"], tabs["colgrp"], dw, dst, N, K, M, ncg, ncells,
        dy.stride(0), dy.stride(1), x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        ATOMIC=mode == "atomic", PREC=prec, GCH=GCHUNK,
    )
    if mode == "atomic":
        p = dst
    else:
        p = torch.empty(ncells, dtype=torch.float32, device=t.device)
        RB = min(max(1 << max(0, ncells - 1).bit_length(), 16), 1024)
        _reduce_partials_kernel[(triton.cdiv(ncells, RB),)](dst, p, dst.shape[0], ncells, BLOCK=RB)
    return dx, dw, p.reshape(nrg, ncg).to(t.dtype)

"""The CUDA kernels of csrc/cuda/superpose_cuda.cu, run on this GPU-less machine.

csrc/cuda/emu/emu_api.cpp compiles the .cu as host C++ under an emulation of the
CUDA execution model (csrc/cuda/emu/cuda_emu.h: blocks of std::threads, barriers for
__syncthreads, warp shuffles and votes through warp barriers, atomics under a mutex).
The kernels, their launch plans and the host launchers are the code that runs on a
GPU, so their logic (tiling, row-group runs, the flush of P, the deterministic
workspace and its reduction, the 16-byte vector path and its fallback) is checked,
with the grid's blocks run in order, reversed or shuffled (the emulator's block order),
against the C++ CPU kernel (bitwise for W_mix and dW) and a float64 oracle
(P). What the emulation cannot check (memory-model races beyond barriers, speed)
is left to the GPU cases of tests/ops/test_superpose.py (mark gpu) on a real GPU.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import tangle_kernels as tk
from tangle_kernels import _ext
from tangle_kernels._ext import DTYPE_CODES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
U = ctypes.c_uint64
I64 = ctypes.c_int64


class Emu:
    """The emulated kernels with the calling convention of backends/cuda/superpose.py."""

    def __init__(self, lib):
        self.lib = lib
        lib.tk_emu_set_num_sms.argtypes = [ctypes.c_int]
        lib.tk_emu_set_block_order.argtypes = [ctypes.c_int, U]
        lib.tk_emu_last_order.argtypes = [ctypes.POINTER(I64), I64]
        lib.tk_emu_last_order.restype = I64
        lib.tk_emu_launches.restype = I64
        lib.tk_emu_forward.argtypes = [ctypes.c_int, I64, I64, I64, I64, U, U, U, U, U,
                                       ctypes.c_char_p, ctypes.c_int]
        lib.tk_emu_workspace.argtypes = [ctypes.c_int, I64, I64, I64, I64, U, U, U]
        lib.tk_emu_workspace.restype = I64
        lib.tk_emu_backward.argtypes = [ctypes.c_int, I64, I64, I64, I64, U, U, U, U, U, U, U,
                                        U, I64, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.tk_emu_plan.argtypes = [ctypes.c_int, I64, I64, U, U, U, ctypes.c_int,
                                    ctypes.POINTER(I64)]

    def sms(self, n: int) -> None:
        self.lib.tk_emu_set_num_sms(n)

    ORDERS = {"in order": 0, "reversed": 1, "shuffled": 2}

    def order(self, name: str, seed: int = 0) -> None:
        """The order the emulated grid's blocks run in (any order is a legal CUDA schedule)."""
        assert self.lib.tk_emu_set_block_order(self.ORDERS[name], seed) == 0

    def last_order(self) -> list[int]:
        n = self.lib.tk_emu_last_order(None, 0)
        buf = (I64 * max(n, 1))()
        self.lib.tk_emu_last_order(buf, n)
        return list(buf)[:n]

    def plan(self, w, g, out, backward: bool) -> dict:
        res = (I64 * 6)()
        R, C = w.shape
        self.lib.tk_emu_plan(DTYPE_CODES[w.dtype], R, C, w.data_ptr(), g.data_ptr(),
                             out.data_ptr(), int(backward), res)
        return dict(zip(("vec", "threads", "strips", "rt", "n_tiles", "grid"), list(res)))

    def forward(self, w, t, tabs, out=None):
        out = torch.empty_like(w) if out is None else out
        R, C = w.shape
        err = ctypes.create_string_buffer(512)
        rc = self.lib.tk_emu_forward(DTYPE_CODES[w.dtype], R, C, t.shape[0], t.shape[1],
                                     w.data_ptr(), out.data_ptr(), t.data_ptr(),
                                     tabs["rowgrp"].data_ptr(), tabs["colgrp"].data_ptr(), err, 512)
        assert rc == 0, err.value.decode()
        return out

    def backward(self, g, w, t, tabs, deterministic: bool, dw=None):
        dw = torch.empty_like(w) if dw is None else dw
        p = torch.full_like(t, float("nan"))  # the launcher must overwrite every cell
        R, C = w.shape
        nrg, ncg = t.shape
        code = DTYPE_CODES[w.dtype]
        nbytes = self.lib.tk_emu_workspace(code, R, C, nrg, ncg, w.data_ptr(), g.data_ptr(),
                                           dw.data_ptr()) if deterministic else 0
        ws = torch.full((max(nbytes, 16),), 0x5A, dtype=torch.uint8)  # garbage: launcher zeroes
        err = ctypes.create_string_buffer(512)
        rc = self.lib.tk_emu_backward(code, R, C, nrg, ncg, w.data_ptr(), g.data_ptr(),
                                      dw.data_ptr(), t.data_ptr(), p.data_ptr(),
                                      tabs["rowgrp"].data_ptr(), tabs["colgrp"].data_ptr(),
                                      ws.data_ptr(), nbytes, int(deterministic), err, 512)
        assert rc == 0, err.value.decode()
        return dw, p


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler")
    so = tmp_path_factory.mktemp("cuda_emu") / "tk_cuda_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{CSRC}",
           os.path.join(CSRC, "cuda", "emu", "emu_api.cpp"), "-o", str(so)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, "emulator build failed:\n" + r.stderr[-4000:]
    return Emu(ctypes.CDLL(str(so)))


def _cpu_kernel():
    if not _ext.has_cpu_ext():
        pytest.skip("the C++ extension is not built")
    from tangle_kernels.backends.cpu import superpose as cpu

    return cpu


def random_layout(rng, R, C):
    """A 2-D layout over [R, C] with 1-6 random boxes (so several row and column
    groups, runs of rows of one group, and empty cells)."""
    boxes = []
    for _ in range(int(rng.integers(1, 7))):
        r0 = int(rng.integers(0, R))
        c0 = int(rng.integers(0, C))
        boxes.append([(r0, int(rng.integers(r0 + 1, R + 1))), (c0, int(rng.integers(c0 + 1, C + 1)))])
    return tk.Layout([R, C], boxes)


def exact_p(g, w, t, tabs):
    """float64 per-cell sums of G * W, and of |G * W| (the scale of rounding errors)."""
    nrg, ncg = t.shape
    cell = (tabs["rowgrp"].long()[:, None] * ncg + tabs["colgrp"].long()[None, :]).reshape(-1)
    gw = (g.double() * w.double()).reshape(-1)
    p = torch.zeros(nrg * ncg, dtype=torch.float64).index_add_(0, cell, gw)
    s = torch.zeros(nrg * ncg, dtype=torch.float64).index_add_(0, cell, gw.abs())
    return p.view(nrg, ncg), s.view(nrg, ncg)


def _inputs(layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(layout.shape, generator=g).to(dtype)
    grad = torch.randn(layout.shape, generator=g).to(dtype)
    mix = torch.rand(layout.K, generator=g) - 0.2  # some negative weights too
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    t = layout.cell_values(mix, tdt).contiguous()
    return w, grad, t, layout.tables("cpu")


# (R, C): one strip and several (C beyond 256 vectors), tiles of 1 row, grids that
# walk several tiles per block (R beyond 64 rows per tile x the grid), C not a
# multiple of the vector width (scalar path), a single element.
SHAPES = [(1, 1), (5, 3), (37, 53), (64, 1100), (9, 1031), (1400, 3), (300, 44), (2, 2056)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_cuda_kernels_vs_cpu_kernel(emu, shape, dtype):
    cpu = _cpu_kernel()
    rng = np.random.default_rng(hash((shape, str(dtype))) % 2**32)
    for i, sms in enumerate((1, 3)):  # the SM count sets the grid and the rows per tile
        emu.sms(sms)
        emu.order("shuffled" if i else "in order", seed=i)  # any block order is legal
        layout = random_layout(rng, *shape)
        w, g, t, tabs = _inputs(layout, dtype, i)
        out = emu.forward(w, t, tabs)
        assert torch.equal(out, cpu.forward(w, t, tabs)), f"W_mix {shape} {dtype}"
        dw_ref, _ = cpu.backward(g, w, t, tabs)
        p_ex, scale = exact_p(g, w, t, tabs)
        rel = 1e-12 if dtype == torch.float64 else 1e-5
        for det in (True, False):
            dw, p = emu.backward(g, w, t, tabs, det)
            assert torch.equal(dw, dw_ref), f"dW {shape} {dtype} det={det}"
            err = (p.double() - p_ex).abs()
            tol = rel * scale + 1e-30
            assert bool((err <= tol).all()), f"P {shape} {dtype} det={det}: max err {err.max():.3g}"
    emu.order("in order")


def test_vector_path_and_scalar_fallback(emu):
    """16-byte vectors when C and every pointer allow, one element otherwise; both
    give the same bits."""
    cpu = _cpu_kernel()
    layout = random_layout(np.random.default_rng(3), 40, 1100)
    w, g, t, tabs = _inputs(layout, torch.float32, 0)
    big = torch.randn(40 * 1100 + 1)
    wm = big[1:].view(40, 1100).copy_(w)  # 4-byte offset: not 16-byte aligned
    assert emu.plan(w, g, torch.empty_like(w), True)["vec"] == 4
    assert emu.plan(wm, g, torch.empty_like(w), True)["vec"] == 1
    odd = random_layout(np.random.default_rng(4), 40, 1101)
    assert emu.plan(torch.empty(40, 1101), torch.empty(40, 1101), torch.empty(40, 1101), False)["vec"] == 1
    assert torch.equal(emu.forward(wm, t, tabs), cpu.forward(w, t, tabs))
    dw_v, p_v = emu.backward(g, w, t, tabs, True)
    dw_s, p_s = emu.backward(g, wm, t, tabs, True)
    assert torch.equal(dw_v, dw_s)
    torch.testing.assert_close(p_v, p_s, rtol=1e-5, atol=1e-5)
    w2, g2, t2, tabs2 = _inputs(odd, torch.float32, 1)
    assert torch.equal(emu.forward(w2, t2, tabs2), cpu.forward(w2, t2, tabs2))


def test_plans_cover_multi_tile_grids(emu):
    """The shapes above really exercise several strips, and blocks that walk more than
    one tile (grid < tiles), under the emulated SM count."""
    plans = {}
    emu.sms(1)
    for R, C in SHAPES:
        w = torch.empty(R, C)
        plans[(R, C)] = emu.plan(w, w, torch.empty_like(w), True)
    assert any(p["strips"] > 1 for p in plans.values()), plans
    assert any(p["n_tiles"] > p["grid"] for p in plans.values()), plans
    assert any(p["rt"] == 1 for p in plans.values()), plans


ORDERS = [("in order", 0), ("reversed", 0), ("shuffled", 1), ("shuffled", 2)]


def test_block_order_is_settable(emu):
    """The emulated grid's blocks run in the order asked for (so the determinism test
    below replays several legal CUDA schedules, not the same one)."""
    emu.sms(1)
    layout = random_layout(np.random.default_rng(7), 1400, 3)
    w, g, t, tabs = _inputs(layout, torch.float32, 0)
    seen = {}
    try:
        for name, seed in ORDERS:
            emu.order(name, seed)
            emu.forward(w, t, tabs)
            seen[(name, seed)] = emu.last_order()
    finally:
        emu.order("in order")
    n = len(seen[("in order", 0)])
    assert n > 8, seen
    assert seen[("in order", 0)] == list(range(n))
    assert seen[("reversed", 0)] == list(range(n))[::-1]
    for seed in (1, 2):
        assert sorted(seen[("shuffled", seed)]) == list(range(n))
        assert seen[("shuffled", seed)] not in (list(range(n)), list(range(n))[::-1])
    assert seen[("shuffled", 1)] != seen[("shuffled", 2)]


def test_deterministic_mode_is_bitwise_stable_under_any_block_order(emu):
    """Deterministic P: per-block partials reduced in block order, so the same bits
    whatever order the blocks (and their threads) run in; the atomic mode, whose float
    additions follow the schedule, agrees to rounding and is allowed to differ in bits,
    and it does differ under one of these orders (the orders are different schedules)."""
    emu.sms(1)
    layout = random_layout(np.random.default_rng(7), 1400, 3)
    w, g, t, tabs = _inputs(layout, torch.float32, 0)
    det, atom = [], []
    try:
        for name, seed in ORDERS:
            emu.order(name, seed)
            det.append(emu.backward(g, w, t, tabs, True))
            atom.append(emu.backward(g, w, t, tabs, False))
    finally:
        emu.order("in order")
    for dw, p in det[1:]:
        assert torch.equal(dw, det[0][0]) and torch.equal(p, det[0][1])
    for dw, p in atom:
        assert torch.equal(dw, det[0][0])
        torch.testing.assert_close(p, det[0][1], rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(p, atom[0][1]) for _, p in atom[1:]), "atomic P identical under every order"


def test_empty_weight_zeroes_p(emu):
    layout = tk.Layout([4, 3], [[(0, 2), (0, 1)]])
    w = torch.empty(0, 3)
    t = layout.cell_values(torch.ones(1)).contiguous()
    tabs = layout.tables("cpu")
    for det in (True, False):
        _, p = emu.backward(w, w, t, tabs, det)
        assert torch.equal(p, torch.zeros_like(t))

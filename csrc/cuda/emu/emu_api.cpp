// C entry points of the emulated CUDA kernels, loaded with ctypes by
// tests/test_cuda_emu.py. One translation unit: cuda_emu.h, then the CUDA source
// itself (so the launch plan in its anonymous namespace can be queried too).
// Build (the test does it):
//   g++ -std=c++20 -O1 -shared -fPIC -pthread -Icsrc csrc/cuda/emu/emu_api.cpp -o emu.so
// Same arguments as the pybind bindings in csrc/cuda_api.cpp; errors come back as a
// non-zero return and a message.
#define TK_CUDA_EMU 1
#define TK_WITH_CUDA 1
#include "cuda/emu/cuda_emu.h"
// (the include order matters: the emulation header defines the CUDA keywords first)
#include "cuda/superpose_cuda.cu"

#include <cstdio>
#include <exception>

namespace {

tangle::SuperposeArgs make(int dtype, int64_t R, int64_t C, int64_t nrg, int64_t ncg,
                           uintptr_t w, uintptr_t g, uintptr_t out, uintptr_t t, uintptr_t p,
                           uintptr_t rowgrp, uintptr_t colgrp, uintptr_t ws, int64_t ws_bytes,
                           int det) {
  auto a = tangle::args_from_addresses(dtype, R, C, nrg, ncg, w, g, out, t, p, rowgrp, colgrp);
  a.workspace = reinterpret_cast<void*>(ws);
  a.workspace_bytes = ws_bytes;
  a.deterministic = det;
  return a;
}

int fail(const std::exception& e, char* err, int errlen) {
  std::snprintf(err, size_t(errlen), "%s", e.what());
  return 1;
}

}  // namespace

extern "C" {

void tk_emu_set_num_sms(int n) { tk_emu::set_num_sms(n); }

// The order blocks run in: 0 in order, 1 reversed, 2 shuffled (seeded). Returns 1 on a
// bad mode.
int tk_emu_set_block_order(int mode, uint64_t seed) {
  if (mode < 0 || mode > 2) return 1;
  tk_emu::set_block_order(mode, seed);
  return 0;
}

// The block order of the last launch: writes min(n, grid) block indices, returns grid.
int64_t tk_emu_last_order(int64_t* out, int64_t n) {
  const auto& o = tk_emu::g_last_order;
  for (int64_t i = 0; i < n && i < int64_t(o.size()); ++i) out[i] = o[size_t(i)];
  return int64_t(o.size());
}

// The launch plan of a forward (backward = 0) or backward (1) launch:
// out[0..5] = vec, threads, strips, rows per tile, tiles, grid.
void tk_emu_plan(int dtype, int64_t R, int64_t C, uintptr_t w, uintptr_t g, uintptr_t out,
                 int backward, int64_t* res) {
  const auto a = make(dtype, R, C, 1, 1, w, g, out, 0, 0, 0, 0, 0, 0, 1);
  const auto pl = tangle::make_plan(a, backward != 0);
  res[0] = pl.vec; res[1] = pl.threads; res[2] = pl.strips;
  res[3] = pl.rt; res[4] = pl.n_tiles; res[5] = pl.grid;
}
int64_t tk_emu_launches() { return tk_emu::g_launches; }

int tk_emu_forward(int dtype, int64_t R, int64_t C, int64_t nrg, int64_t ncg, uintptr_t w,
                   uintptr_t out, uintptr_t t, uintptr_t rowgrp, uintptr_t colgrp, char* err,
                   int errlen) {
  try {
    tangle::superpose_forward_cuda(make(dtype, R, C, nrg, ncg, w, 0, out, t, 0, rowgrp, colgrp, 0, 0, 1), 0);
    return 0;
  } catch (const std::exception& e) {
    return fail(e, err, errlen);
  }
}

int64_t tk_emu_workspace(int dtype, int64_t R, int64_t C, int64_t nrg, int64_t ncg, uintptr_t w,
                         uintptr_t g, uintptr_t dw) {
  return tangle::superpose_backward_cuda_workspace(
      make(dtype, R, C, nrg, ncg, w, g, dw, 0, 0, 0, 0, 0, 0, 1));
}

int tk_emu_backward(int dtype, int64_t R, int64_t C, int64_t nrg, int64_t ncg, uintptr_t w,
                    uintptr_t g, uintptr_t dw, uintptr_t t, uintptr_t p, uintptr_t rowgrp,
                    uintptr_t colgrp, uintptr_t ws, int64_t ws_bytes, int det, char* err,
                    int errlen) {
  try {
    tangle::superpose_backward_cuda(
        make(dtype, R, C, nrg, ncg, w, g, dw, t, p, rowgrp, colgrp, ws, ws_bytes, det), 0);
    return 0;
  } catch (const std::exception& e) {
    return fail(e, err, errlen);
  }
}

}  // extern "C"

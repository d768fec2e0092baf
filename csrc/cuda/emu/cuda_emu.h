// A host emulation of the CUDA execution model, enough to run csrc/cuda/*.cu on a
// machine without a GPU (tests/test_cuda_emu.py; CI has nvcc but no GPU).
//
// csrc/cuda/emu/emu_api.cpp includes this header, then the .cu, and compiles as C++.
// What is emulated:
//   - a launch runs the grid's blocks one after another, in an order that is settable
//     (tk_emu::set_block_order: in order, reversed, or a seeded shuffle; CUDA gives no
//     order between blocks, so every one of these is a legal schedule and results that
//     must be deterministic must not depend on it); a block runs blockDim.x
//     std::threads (threadIdx / blockIdx are thread_local), so every interleaving the
//     OS scheduler picks is a legal CUDA schedule of that block;
//   - __syncthreads: a barrier of the block's threads;
//   - __shfl_down_sync / __any_sync: a barrier of the warp's 32 threads around an
//     exchange buffer (full-warp masks only, which is all the kernels use);
//   - __shared__ variables: function statics (blocks run one at a time), dynamic
//     shared memory: a per-launch buffer (TK_DYN_SMEM);
//   - atomics: one mutex; __half / __nv_bfloat16: csrc/cpu/half.h (round to nearest even);
//   - the runtime calls the launchers use (device attributes, memset, errors); the SM
//     count is settable (tk_emu::set_num_sms) to force multi-tile grids on tiny shapes.
// What is not: the memory model beyond barriers (no reordering is injected), timing,
// occupancy, inline PTX (the .cu keeps a plain C++ path under TK_CUDA_EMU).
#pragma once

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <random>
#include <thread>
#include <type_traits>
#include <vector>

#include "../../cpu/half.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct tk_dim3 {
  unsigned x = 1, y = 1, z = 1;
};

using __half = tangle::f16;
using __nv_bfloat16 = tangle::bf16;
inline float __half2float(__half h) { return tangle::to_float(h); }
inline __half __float2half_rn(float f) { return tangle::from_float_f16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return tangle::to_float(b); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return tangle::from_float_bf16(f); }

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
using cudaStream_t = void*;

namespace tk_emu {

inline thread_local tk_dim3 t_thread, t_block;
inline tk_dim3 g_block_dim, g_grid_dim;
inline int g_num_sms = 2;
inline std::barrier<>* g_block_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_bars;
inline std::vector<uint64_t> g_xchg;  // [warps * 32] shuffle exchange slots
inline std::vector<unsigned char> g_dyn_smem;
inline std::mutex g_atomic_mu;
inline int64_t g_launches = 0;
// Block order of a launch: 0 = in order, 1 = reversed, 2 = shuffled (seeded; each
// launch draws a new permutation from the generator).
inline int g_block_order = 0;
inline std::mt19937_64 g_order_rng{0};
inline std::vector<int> g_last_order;  // the block order of the last launch

inline void set_num_sms(int n) { g_num_sms = n > 0 ? n : 1; }
inline void set_block_order(int mode, uint64_t seed) {
  if (mode < 0 || mode > 2) throw std::runtime_error("tk_emu: block order must be 0, 1 or 2");
  g_block_order = mode;
  g_order_rng.seed(seed);
}

inline std::vector<int> block_order(int grid) {
  std::vector<int> order(static_cast<size_t>(grid));
  std::iota(order.begin(), order.end(), 0);
  if (g_block_order == 1) {
    std::reverse(order.begin(), order.end());
  } else if (g_block_order == 2) {
    std::shuffle(order.begin(), order.end(), g_order_rng);
  }
  return order;
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), int grid, int block, size_t smem, Args... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "kernel argument count");
  if (grid <= 0 || block <= 0 || block % 32 != 0) throw std::runtime_error("tk_emu: bad launch");
  g_grid_dim = tk_dim3{unsigned(grid), 1, 1};
  g_block_dim = tk_dim3{unsigned(block), 1, 1};
  const int warps = block / 32;
  g_xchg.assign(size_t(block), 0);
  g_last_order = block_order(grid);
  for (const int b : g_last_order) {
    g_dyn_smem.assign(smem, 0xA5);  // garbage, like real shared memory
    std::barrier<> bar(block);
    g_block_bar = &bar;
    g_warp_bars.clear();
    for (int w = 0; w < warps; ++w) g_warp_bars.emplace_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> th;
    th.reserve(size_t(block));
    for (int t = 0; t < block; ++t) {
      th.emplace_back([=] {
        t_thread = tk_dim3{unsigned(t), 0, 0};
        t_block = tk_dim3{unsigned(b), 0, 0};
        kernel(static_cast<KArgs>(args)...);
      });
    }
    for (auto& x : th) x.join();
    g_block_bar = nullptr;
  }
  ++g_launches;
}

inline unsigned char* dyn_smem() { return g_dyn_smem.data(); }

template <typename T> T shfl_down(T v, unsigned off) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  const unsigned tid = t_thread.x, lane = tid & 31u, base = tid & ~31u;
  auto& bar = *g_warp_bars[tid / 32];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g_xchg[tid] = bits;
  bar.arrive_and_wait();
  T r = v;
  if (lane + off < 32) std::memcpy(&r, &g_xchg[base + lane + off], sizeof(T));
  bar.arrive_and_wait();  // slots are rewritten by the next shuffle
  return r;
}

inline bool any(bool pred) {
  const unsigned tid = t_thread.x, base = tid & ~31u;
  auto& bar = *g_warp_bars[tid / 32];
  g_xchg[tid] = pred ? 1 : 0;
  bar.arrive_and_wait();
  bool r = false;
  for (unsigned l = 0; l < 32; ++l) r = r || g_xchg[base + l] != 0;
  bar.arrive_and_wait();
  return r;
}

}  // namespace tk_emu

#define threadIdx (tk_emu::t_thread)
#define blockIdx (tk_emu::t_block)
#define blockDim (tk_emu::g_block_dim)
#define gridDim (tk_emu::g_grid_dim)

inline void __syncthreads() { tk_emu::g_block_bar->arrive_and_wait(); }
template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned off) {
  if (mask != 0xffffffffu) throw std::runtime_error("tk_emu: partial-warp shuffles are not emulated");
  return tk_emu::shfl_down(v, off);
}
inline int __any_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) throw std::runtime_error("tk_emu: partial-warp votes are not emulated");
  return tk_emu::any(pred != 0);
}
template <typename T> T atomicAdd(T* p, T v) {
  std::lock_guard<std::mutex> lk(tk_emu::g_atomic_mu);
  T old = *p;
  *p = old + v;
  return old;
}
inline int atomicMin(int* p, int v) {
  std::lock_guard<std::mutex> lk(tk_emu::g_atomic_mu);
  int old = *p;
  *p = v < old ? v : old;
  return old;
}
inline int atomicMax(int* p, int v) {
  std::lock_guard<std::mutex> lk(tk_emu::g_atomic_mu);
  int old = *p;
  *p = v > old ? v : old;
  return old;
}

inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *v = tk_emu::g_num_sms;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t) {
  std::memset(p, value, n);
  return cudaSuccess;
}

// kernel<<<grid, block, smem, stream>>>(args...)
#define TK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  tk_emu::launch(kernel, int(grid), int(block), size_t(smem), __VA_ARGS__)
#define TK_DYN_SMEM(name) unsigned char* name = tk_emu::dyn_smem()

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

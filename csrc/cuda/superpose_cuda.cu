// CUDA superpose kernels (see tangle.h for the math).
//
// Tiling ("row-group-aware tiles"): the R x C weight is cut into column strips of
// blockDim.x * VEC columns (VEC = elements per 16-byte vector when C is a multiple of
// VEC and every pointer is 16-byte aligned, else 1) and row tiles of RT rows. A tile
// is (row tile, strip); each thread owns VEC consecutive columns of its strip for the
// whole tile, so it loads its column groups once per tile and its VEC mask values
// once per run of rows with the same row group: the inner loop is a pure stream of
// 16-byte loads and stores (w, g in; out / dW out) with no per-element lookups.
// The grid is sized to the SMs (blocks_per_SM * SMs, capped by the tile count) and
// blocks walk the tiles grid-stride.
//
// Backward P: per thread, G*W is accumulated in registers over a run of rows of one
// row group (fixed order). At the end of the run the block "flushes": the per-column
// sums go to shared memory and each warp reduces a set of column groups (lanes scan
// the strip in a fixed order, then a fixed shuffle tree). The per-cell result goes
//  - deterministic mode: into this block's own row of a workspace [grid, ncells]
//    (flushes of one block are ordered by __syncthreads), then a second kernel adds
//    the rows in block order. Bitwise repeatable for a given GPU model (the grid
//    depends on the SM count).
//  - atomic mode: atomicAdd into P (one atomic per cell per flush).
#ifndef TK_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define TK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define TK_DYN_SMEM(name) extern __shared__ unsigned char name[]
#endif
// Under TK_CUDA_EMU (csrc/cuda/emu/cuda_emu.h, force-included) this file compiles as
// host C++ and the kernels run on emulated blocks of std::threads (tests).

#include <climits>
#include <stdexcept>
#include <string>

#include "tangle.h"

namespace tangle {
namespace {

template <typename S> struct CV;
template <> struct CV<float> {
  using acc = float;
  __device__ static float ld(float v) { return v; }
  __device__ static float st(float v) { return v; }
};
template <> struct CV<double> {
  using acc = double;
  __device__ static double ld(double v) { return v; }
  __device__ static double st(double v) { return v; }
};
template <> struct CV<__half> {
  using acc = float;
  __device__ static float ld(__half v) { return __half2float(v); }
  __device__ static __half st(float v) { return __float2half_rn(v); }
};
template <> struct CV<__nv_bfloat16> {
  using acc = float;
  __device__ static float ld(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 st(float v) { return __float2bfloat16_rn(v); }
};

// VEC elements loaded/stored as one 16-byte access (one element when VEC == 1).
template <typename S, int VEC> struct alignas(sizeof(S) * VEC) Pack {
  S v[VEC];
};

// Vector loads and stores of a Pack. nvcc (12.x/13.0) splits a 16-byte store inside
// these kernels' row loops into 4 scalar STG.E (seen in the sm_90 SASS; the same store
// in a flat kernel stays STG.E.128), whether written as a Pack, a float4 or a uint4
// assignment: 4x the store instructions of a streaming kernel. The store is therefore
// inline PTX st.global.v4; the load compiles to LDG.E.128 as written.
// tests/test_cuda_sass.py checks both in the SASS.
template <typename S, int VEC>
__device__ __forceinline__ Pack<S, VEC> ld_pack(const S* p) {
  Pack<S, VEC> r;
  if constexpr (VEC == 1) {
    r.v[0] = *p;
  } else {
    static_assert(sizeof(Pack<S, VEC>) == 16, "vector packs are 16 bytes");
    // p is 16-byte aligned (the plan checks); a memcpy from p would compile to 16
    // byte loads, the uint4 load to one LDG.E.128.
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    memcpy(&r, &u, 16);
  }
  return r;
}

template <typename S, int VEC>
__device__ __forceinline__ void st_pack(S* p, const Pack<S, VEC>& x) {
  if constexpr (VEC == 1) {
    *p = x.v[0];
  } else {
    static_assert(sizeof(Pack<S, VEC>) == 16, "vector packs are 16 bytes");
#ifdef TK_CUDA_EMU
    memcpy(p, &x, 16);
#else
    const unsigned* q = reinterpret_cast<const unsigned*>(x.v);
    // volatile keeps the store; no "memory" clobber, so loads of later rows may still
    // be issued before it (every pointer of these kernels is __restrict__).
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(q[0]), "r"(q[1]),
                 "r"(q[2]), "r"(q[3]));
#endif
  }
}

constexpr int kMaxThreads = 256;

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

int elem_size(int dtype) {
  switch (dtype) {
    case kF32: return 4;
    case kF64: return 8;
    default: return 2;
  }
}

int num_sms() {
  int dev = 0, n = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "SM count");
  return n > 0 ? n : 1;
}

struct Plan {
  int vec = 1;           // elements per vector access
  int threads = 32;      // block size; a strip is threads * vec columns
  int strips = 1;        // column strips
  int64_t rt = 1;        // rows per tile
  int64_t n_tiles = 0;   // row tiles * strips
  int grid = 1;          // blocks (<= n_tiles)
};

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The launch plan; deterministic for given sizes, dtype, pointer alignment and GPU.
Plan make_plan(const SuperposeArgs& a, bool backward) {
  Plan pl;
  const int es = elem_size(a.dtype);
  int vec = 16 / es;
  bool ok = a.C % vec == 0 && aligned16(a.w) && aligned16(a.out);
  if (backward) ok = ok && aligned16(a.g);
  pl.vec = ok ? vec : 1;
  const int64_t cv = a.C / pl.vec;  // column vectors per row (exact when vec > 1)
  const int64_t ncv = pl.vec > 1 ? cv : a.C;
  int64_t strips = (ncv + kMaxThreads - 1) / kMaxThreads;
  if (strips < 1) strips = 1;
  int64_t per = (ncv + strips - 1) / strips;
  int threads = int((per + 31) / 32 * 32);
  if (threads < 32) threads = 32;
  if (threads > kMaxThreads) threads = kMaxThreads;
  pl.threads = threads;
  pl.strips = int(strips);
  const int sms = num_sms();
  int bps = 2048 / threads;
  if (bps > 16) bps = 16;
  // Rows per tile: enough tiles for ~4 blocks per SM, at most 64 rows.
  int64_t rt = a.R * strips / (int64_t(4) * sms);
  if (rt < 1) rt = 1;
  if (rt > 64) rt = 64;
  pl.rt = rt;
  pl.n_tiles = (a.R + rt - 1) / rt * strips;
  int64_t grid = int64_t(sms) * bps;
  if (grid > pl.n_tiles) grid = pl.n_tiles;
  pl.grid = int(grid < 1 ? 1 : grid);
  return pl;
}

template <typename S, typename TT, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    fwd_kernel(const S* __restrict__ w, S* __restrict__ out, const TT* __restrict__ t,
               const int32_t* __restrict__ rowgrp, const int32_t* __restrict__ colgrp, int64_t R,
               int64_t C, int64_t ncg, int64_t rt, int strips, int64_t n_tiles) {
  using A = typename CV<S>::acc;
  using P = Pack<S, VEC>;
  const int64_t ncv = C / VEC;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t rtile = tile / strips;
    const int64_t strip = tile - rtile * strips;
    const int64_t cv = strip * blockDim.x + threadIdx.x;
    if (cv >= ncv) continue;  // no barriers in this kernel
    const int64_t c0 = cv * VEC;
    int cg[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) cg[v] = colgrp[c0 + v];
    const int64_t r1 = (rtile + 1) * rt < R ? (rtile + 1) * rt : R;
    int64_t r = rtile * rt;
    while (r < r1) {
      const int rg = rowgrp[r];
      int64_t re = r + 1;
      while (re < r1 && rowgrp[re] == rg) ++re;
      const TT* trow = t + int64_t(rg) * ncg;
      A tv[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) tv[v] = A(trow[cg[v]]);
#pragma unroll 4
      for (int64_t rr = r; rr < re; ++rr) {
        const P x = ld_pack<S, VEC>(w + rr * C + c0);
        P y;
#pragma unroll
        for (int v = 0; v < VEC; ++v) y.v[v] = CV<S>::st(CV<S>::ld(x.v[v]) * tv[v]);
        st_pack<S, VEC>(out + rr * C + c0, y);
      }
      r = re;
    }
  }
}

template <typename S, typename TT, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    bwd_kernel(const S* __restrict__ w, const S* __restrict__ g, S* __restrict__ dw,
               const TT* __restrict__ t, TT* __restrict__ p, TT* __restrict__ ws,
               const int32_t* __restrict__ rowgrp, const int32_t* __restrict__ colgrp, int64_t R,
               int64_t C, int64_t ncg, int64_t ncells, int64_t rt, int strips, int64_t n_tiles,
               int deterministic) {
  using P = Pack<S, VEC>;
  TK_DYN_SMEM(smem_raw);
  const int nthr = blockDim.x;
  const int width = nthr * VEC;  // columns of a strip
  TT* s_acc = reinterpret_cast<TT*>(smem_raw);
  int* s_cg = reinterpret_cast<int*>(s_acc + width);
  __shared__ int s_lo, s_hi;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = nthr >> 5;
  const int64_t ncv = C / VEC;
  TT* wsrow = deterministic ? ws + int64_t(blockIdx.x) * ncells : nullptr;

  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t rtile = tile / strips;
    const int64_t strip = tile - rtile * strips;
    const int64_t cv = strip * nthr + threadIdx.x;
    const bool active = cv < ncv;
    const int64_t c0 = cv * VEC;
    int cg[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) cg[v] = active ? colgrp[c0 + v] : -1;
    __syncthreads();  // the previous tile's flush has finished reading s_cg
#pragma unroll
    for (int v = 0; v < VEC; ++v) s_cg[threadIdx.x * VEC + v] = cg[v];
    if (threadIdx.x == 0) {
      s_lo = INT_MAX;
      s_hi = -1;
    }
    __syncthreads();
    if (active) {
      int lo = cg[0], hi = cg[0];
#pragma unroll
      for (int v = 1; v < VEC; ++v) {
        lo = cg[v] < lo ? cg[v] : lo;
        hi = cg[v] > hi ? cg[v] : hi;
      }
      atomicMin(&s_lo, lo);
      atomicMax(&s_hi, hi);
    }
    __syncthreads();
    const int glo = s_lo, ghi = s_hi;

    const int64_t r1 = (rtile + 1) * rt < R ? (rtile + 1) * rt : R;
    int64_t r = rtile * rt;
    while (r < r1) {  // block-uniform: every thread reads the same rowgrp entries
      const int rg = rowgrp[r];
      int64_t re = r + 1;
      while (re < r1 && rowgrp[re] == rg) ++re;
      TT acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = TT(0);
      if (active) {
        const TT* trow = t + int64_t(rg) * ncg;
        TT tv[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) tv[v] = trow[cg[v]];
#pragma unroll 4
        for (int64_t rr = r; rr < re; ++rr) {
          const P gx = ld_pack<S, VEC>(g + rr * C + c0);
          const P wx = ld_pack<S, VEC>(w + rr * C + c0);
          P y;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const TT gv = TT(CV<S>::ld(gx.v[v]));
            y.v[v] = CV<S>::st(gv * tv[v]);
            acc[v] += gv * TT(CV<S>::ld(wx.v[v]));
          }
          st_pack<S, VEC>(dw + rr * C + c0, y);
        }
      }
      // Flush the run: per-column sums -> per-cell sums of row group rg.
#pragma unroll
      for (int v = 0; v < VEC; ++v) s_acc[threadIdx.x * VEC + v] = acc[v];
      __syncthreads();
      for (int grp = glo + warp; grp <= ghi; grp += nwarps) {
        TT sum = TT(0);
        bool found = false;
        for (int j = lane; j < width; j += 32) {
          if (s_cg[j] == grp) {
            sum += s_acc[j];
            found = true;
          }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
        found = __any_sync(0xffffffffu, found);
        if (lane == 0 && found) {
          const int64_t cell = int64_t(rg) * ncg + grp;
          if (deterministic) wsrow[cell] += sum;
          else atomicAdd(p + cell, sum);
        }
      }
      __syncthreads();  // s_acc is rewritten by the next run
      r = re;
    }
  }
}

template <typename TT>
__global__ void reduce_partials(const TT* __restrict__ partial, TT* __restrict__ p, int nblocks,
                                int64_t ncells) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < ncells;
       j += int64_t(gridDim.x) * blockDim.x) {
    TT s = 0;
    for (int b = 0; b < nblocks; ++b) s += partial[int64_t(b) * ncells + j];  // fixed order
    p[j] = s;
  }
}

template <typename S, typename TT, int VEC>
void launch_fwd_vec(const SuperposeArgs& a, const Plan& pl, cudaStream_t st) {
  auto* kernel = fwd_kernel<S, TT, VEC>;
  TK_LAUNCH(kernel, pl.grid, pl.threads, 0, st,
      static_cast<const S*>(a.w), static_cast<S*>(a.out), static_cast<const TT*>(a.t), a.rowgrp,
      a.colgrp, a.R, a.C, a.ncg, pl.rt, pl.strips, pl.n_tiles);
  check(cudaGetLastError(), "superpose_forward_cuda");
}

template <typename S, typename TT>
void launch_fwd(const SuperposeArgs& a, cudaStream_t st) {
  if (a.R * a.C == 0) return;
  const Plan pl = make_plan(a, false);
  constexpr int V = 16 / int(sizeof(S));
  if (pl.vec == V) launch_fwd_vec<S, TT, V>(a, pl, st);
  else launch_fwd_vec<S, TT, 1>(a, pl, st);
}

template <typename S, typename TT, int VEC>
void launch_bwd_vec(const SuperposeArgs& a, const Plan& pl, cudaStream_t st) {
  const int64_t ncells = a.nrg * a.ncg;
  const size_t smem = size_t(pl.threads) * VEC * (sizeof(TT) + sizeof(int));
  auto* kernel = bwd_kernel<S, TT, VEC>;
  TK_LAUNCH(kernel, pl.grid, pl.threads, smem, st,
      static_cast<const S*>(a.w), static_cast<const S*>(a.g), static_cast<S*>(a.out),
      static_cast<const TT*>(a.t), static_cast<TT*>(a.p), static_cast<TT*>(a.workspace),
      a.rowgrp, a.colgrp, a.R, a.C, a.ncg, ncells, pl.rt, pl.strips, pl.n_tiles,
      a.deterministic);
  check(cudaGetLastError(), "superpose_backward_cuda");
}

template <typename S, typename TT>
void launch_bwd(const SuperposeArgs& a, cudaStream_t st) {
  const int64_t ncells = a.nrg * a.ncg;
  TT* p = static_cast<TT*>(a.p);
  if (a.R * a.C == 0) {
    check(cudaMemsetAsync(p, 0, ncells * sizeof(TT), st), "memset P");
    return;
  }
  const Plan pl = make_plan(a, true);
  if (a.deterministic) {
    check(cudaMemsetAsync(a.workspace, 0, size_t(pl.grid) * ncells * sizeof(TT), st),
          "memset workspace");
  } else {
    check(cudaMemsetAsync(p, 0, ncells * sizeof(TT), st), "memset P");
  }
  constexpr int V = 16 / int(sizeof(S));
  if (pl.vec == V) launch_bwd_vec<S, TT, V>(a, pl, st);
  else launch_bwd_vec<S, TT, 1>(a, pl, st);
  if (a.deterministic) {
    int64_t nb = (ncells + 255) / 256;
    if (nb > 1024) nb = 1024;
    auto* kernel = reduce_partials<TT>;
    TK_LAUNCH(kernel, int(nb), 256, 0, st, static_cast<const TT*>(a.workspace), p, pl.grid, ncells);
    check(cudaGetLastError(), "superpose_backward_cuda reduce");
  }
}

}  // namespace

void superpose_forward_cuda(const SuperposeArgs& a, uintptr_t stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kF32: return launch_fwd<float, float>(a, st);
    case kF64: return launch_fwd<double, double>(a, st);
    case kF16: return launch_fwd<__half, float>(a, st);
    case kBF16: return launch_fwd<__nv_bfloat16, float>(a, st);
  }
  throw std::invalid_argument("superpose_forward_cuda: bad dtype");
}

int64_t superpose_backward_cuda_workspace(const SuperposeArgs& a) {
  const int64_t ncells = a.nrg * a.ncg;
  if (a.R * a.C == 0) return 0;
  const Plan pl = make_plan(a, true);
  const int64_t tsize = a.dtype == kF64 ? 8 : 4;
  return int64_t(pl.grid) * ncells * tsize;
}

void superpose_backward_cuda(const SuperposeArgs& a, uintptr_t stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kF32: return launch_bwd<float, float>(a, st);
    case kF64: return launch_bwd<double, double>(a, st);
    case kF16: return launch_bwd<__half, float>(a, st);
    case kBF16: return launch_bwd<__nv_bfloat16, float>(a, st);
  }
  throw std::invalid_argument("superpose_backward_cuda: bad dtype");
}

}  // namespace tangle

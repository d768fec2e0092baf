// CUDA superpose kernels (see tangle.h for the math).
//
// forward: a grid-stride elementwise kernel, out = w * T[cell].
// backward: dW = G * T[cell] and per-cell sums P of G * W. Each block keeps its
// partial sums in shared memory; deterministic mode writes one row of partials per
// block to the workspace and a second kernel adds them in block order, the atomic
// mode adds the block's partials to P with global atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;
constexpr int64_t kMaxSharedCells = 8192;

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

inline int num_blocks(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  if (b < 1) b = 1;
  return int(b < kMaxBlocks ? b : kMaxBlocks);
}

template <typename S, typename TT>
__global__ void fwd_kernel(const S* __restrict__ w, S* __restrict__ out, const TT* __restrict__ t,
                           const int32_t* __restrict__ rowgrp, const int32_t* __restrict__ colgrp,
                           int64_t R, int64_t C, int64_t ncg) {
  const int64_t n = R * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / C, c = i - r * C;
    const TT m = t[int64_t(rowgrp[r]) * ncg + colgrp[c]];
    out[i] = CV<S>::st(CV<S>::ld(w[i]) * typename CV<S>::acc(m));
  }
}

// One block per contiguous slice of elements; partial sums in shared memory.
template <typename S, typename TT>
__global__ void bwd_kernel(const S* __restrict__ w, const S* __restrict__ g, S* __restrict__ dw,
                           const TT* __restrict__ t, TT* __restrict__ p, TT* __restrict__ partial,
                           const int32_t* __restrict__ rowgrp, const int32_t* __restrict__ colgrp,
                           int64_t R, int64_t C, int64_t ncg, int64_t ncells, int deterministic) {
  extern __shared__ unsigned char smem_raw[];
  TT* sp = reinterpret_cast<TT*>(smem_raw);
  for (int64_t j = threadIdx.x; j < ncells; j += blockDim.x) sp[j] = TT(0);
  __syncthreads();
  const int64_t n = R * C;
  const int64_t per_block = (n + gridDim.x - 1) / gridDim.x;
  const int64_t lo = blockIdx.x * per_block;
  const int64_t hi = lo + per_block < n ? lo + per_block : n;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const int64_t r = i / C, c = i - r * C;
    const int64_t cell = int64_t(rowgrp[r]) * ncg + colgrp[c];
    const typename CV<S>::acc gv = CV<S>::ld(g[i]);
    dw[i] = CV<S>::st(gv * typename CV<S>::acc(t[cell]));
    atomicAdd(&sp[cell], TT(gv * CV<S>::ld(w[i])));
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < ncells; j += blockDim.x) {
    if (deterministic) partial[blockIdx.x * ncells + j] = sp[j];
    else atomicAdd(&p[j], sp[j]);
  }
}

template <typename TT>
__global__ void reduce_partials(const TT* __restrict__ partial, TT* __restrict__ p, int nblocks,
                                int64_t ncells) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < ncells;
       j += int64_t(gridDim.x) * blockDim.x) {
    TT s = 0;
    for (int b = 0; b < nblocks; ++b) s += partial[b * ncells + j];
    p[j] = s;
  }
}

template <typename S, typename TT>
void launch_fwd(const SuperposeArgs& a, cudaStream_t st) {
  const int64_t n = a.R * a.C;
  if (n == 0) return;
  fwd_kernel<S, TT><<<num_blocks(n), kThreads, 0, st>>>(
      static_cast<const S*>(a.w), static_cast<S*>(a.out), static_cast<const TT*>(a.t), a.rowgrp,
      a.colgrp, a.R, a.C, a.ncg);
  check(cudaGetLastError(), "superpose_forward_cuda");
}

template <typename S, typename TT>
void launch_bwd(const SuperposeArgs& a, cudaStream_t st) {
  const int64_t n = a.R * a.C, ncells = a.nrg * a.ncg;
  if (ncells > kMaxSharedCells)
    throw std::invalid_argument("superpose_backward_cuda: too many cells for shared memory");
  const int nb = num_blocks(n);
  TT* p = static_cast<TT*>(a.p);
  if (!a.deterministic) check(cudaMemsetAsync(p, 0, ncells * sizeof(TT), st), "memset P");
  bwd_kernel<S, TT><<<nb, kThreads, ncells * sizeof(TT), st>>>(
      static_cast<const S*>(a.w), static_cast<const S*>(a.g), static_cast<S*>(a.out),
      static_cast<const TT*>(a.t), p, static_cast<TT*>(a.workspace), a.rowgrp, a.colgrp, a.R, a.C,
      a.ncg, ncells, a.deterministic);
  check(cudaGetLastError(), "superpose_backward_cuda");
  if (a.deterministic) {
    reduce_partials<TT><<<num_blocks(ncells), kThreads, 0, st>>>(
        static_cast<const TT*>(a.workspace), p, nb, ncells);
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
  return int64_t(num_blocks(a.R * a.C)) * ncells * int64_t(sizeof(double));
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

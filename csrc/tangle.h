// tangle_kernels: framework-free kernel interface.
//
// Every kernel sees the weight as a contiguous R x C matrix (the layout object in
// Python picks the split of the tensor's dimensions). Each row r belongs to a row
// group rowgrp[r] in [0, nrg) and each column c to a column group colgrp[c] in
// [0, ncg); the cell of element (r, c) is rowgrp[r] * ncg + colgrp[c]. T holds
// one mask value per cell (T = B @ mix), so
//
//   forward:  out[r, c] = W[r, c] * T[cell(r, c)]
//   backward: dW[r, c]  = G[r, c] * T[cell(r, c)]
//             P[cell]   = sum over (r, c) in cell of G[r, c] * W[r, c]
//
// and d mix = B^T @ P is a tiny matmul done by the caller.
#pragma once
#include <cstdint>
#include <vector>

namespace tangle {

enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct SuperposeArgs {
  int dtype = kF32;            // storage dtype of w / g / out
  int64_t R = 0, C = 0;        // weight viewed as a contiguous R x C matrix
  int64_t nrg = 0, ncg = 0;    // row groups, column groups (cells = nrg * ncg)
  const void* w = nullptr;     // [R, C] weight
  const void* g = nullptr;     // [R, C] upstream gradient dL/dW_mix (backward only)
  void* out = nullptr;         // [R, C] forward: W_mix; backward: dW
  const void* t = nullptr;     // [nrg * ncg] cell values; float (double when dtype == kF64)
  void* p = nullptr;           // [nrg * ncg] backward: per-cell sums of G*W (float; double for kF64), overwritten
  const int32_t* rowgrp = nullptr;  // [R] row group of each row
  const int32_t* colgrp = nullptr;  // [C] column group of each column
  const int32_t* runs = nullptr;    // [nruns, 3] maximal column runs (start, end, group), CPU kernels
  int64_t nruns = 0;
  void* workspace = nullptr;   // GPU deterministic mode: [grid, nrg*ncg] per-block partials of P
  int64_t workspace_bytes = 0; //   (zeroed by the kernel launcher; size from *_workspace below)
  int deterministic = 1;       // GPU: 1 = per-block partials + fixed-order reduction (bitwise
                               //   repeatable on a given GPU model), 0 = atomics into P
};

// The arguments from integer addresses (tensor.data_ptr() as the bindings receive
// them); the optional tables (runs, workspace) are set by the caller. No checks here:
// the bindings check what they can see.
inline SuperposeArgs args_from_addresses(int dtype, int64_t R, int64_t C, int64_t nrg,
                                         int64_t ncg, uintptr_t w, uintptr_t g, uintptr_t out,
                                         uintptr_t t, uintptr_t p, uintptr_t rowgrp,
                                         uintptr_t colgrp) {
  SuperposeArgs a;
  a.dtype = dtype;
  a.R = R; a.C = C; a.nrg = nrg; a.ncg = ncg;
  a.w = reinterpret_cast<const void*>(w);
  a.g = reinterpret_cast<const void*>(g);
  a.out = reinterpret_cast<void*>(out);
  a.t = reinterpret_cast<const void*>(t);
  a.p = reinterpret_cast<void*>(p);
  a.rowgrp = reinterpret_cast<const int32_t*>(rowgrp);
  a.colgrp = reinterpret_cast<const int32_t*>(colgrp);
  return a;
}

// C++ (OpenMP) kernels, always built. Deterministic whatever the thread count.
void superpose_forward_cpu(const SuperposeArgs& a);
void superpose_backward_cpu(const SuperposeArgs& a);
int cpu_num_threads();

// Head-partition gather / scatter (csrc/cpu/head_partition_cpu.cpp has the math).
// Rows (b, t) have strides (s_sB, s_sT) in src, (d_sB, d_sT) in dst and (o_sB, o_sT) in
// other; the [h, D] side of a gather's dst / other and of a scatter's src has head
// stride *_sH; columns are contiguous everywhere. widths[i] = d_i = e_i / h.
struct HeadPartitionArgs {
  int dtype = kF32;             // kF32 or kF64
  int64_t B = 0, T = 0;         // rows
  int64_t E = 0, h = 0, D = 0;  // max width, heads, slot width (E = h * D)
  int m = 0;                    // embedding candidates
  const int64_t* widths = nullptr;  // [m] head width d_i of each candidate
  const double* coefs = nullptr;    // [m] coefficient c_i
  const void* src = nullptr;
  int64_t s_sB = 0, s_sT = 0, s_sH = 0;
  void* dst = nullptr;
  int64_t d_sB = 0, d_sT = 0, d_sH = 0;
  int accumulate = 0;           // 1: dst += ..., 0: dst = ...
  const void* other = nullptr;  // optional: the tensor the dots are taken with
  int64_t o_sB = 0, o_sT = 0, o_sH = 0;
  double* dots = nullptr;       // [m] out (when other is set), overwritten
};
void head_gather_cpu(const HeadPartitionArgs& a);
void head_scatter_cpu(const HeadPartitionArgs& a);
// Several scatters (one per head count) into one dst, other and row set: one pass.
void head_scatter_multi_cpu(const std::vector<HeadPartitionArgs>& as);
// Several gathers over the same rows (each its own src, dst, strides, optional dots): one pass.
void head_gather_multi_cpu(const std::vector<HeadPartitionArgs>& as);

// Superposed LayerNorm over prefixes of width widths[k] with weights mix[k]
// (csrc/cpu/layernorm_mix_cpu.cpp has the math). x, g: rows of E contiguous values
// with row strides sx, sg; y, dx: contiguous [N, E]; w, bmix, dw, dbmix: [E] or null.
struct MixedLayerNormArgs {
  int dtype = kF32;                 // kF32 or kF64 (x, g, y, dx, w, bmix, dw, dbmix)
  int64_t N = 0, E = 0;
  int K = 0;
  const int64_t* widths = nullptr;  // [K]
  const double* mix = nullptr;      // [K]
  double eps = 1e-5;
  const void* x = nullptr;
  int64_t sx = 0;
  const void* w = nullptr;
  const void* bmix = nullptr;
  void* y = nullptr;
  double* mu = nullptr;             // [N, K] forward: written; backward: read
  double* rstd = nullptr;           // [N, K]
  const void* g = nullptr;
  int64_t sg = 0;
  void* dx = nullptr;
  void* dw = nullptr;
  void* dbmix = nullptr;
  double* dmix = nullptr;           // [K] backward: written
};
void mixed_layernorm_forward_cpu(const MixedLayerNormArgs& a);
void mixed_layernorm_backward_cpu(const MixedLayerNormArgs& a);

// Fused attention with dropout (csrc/cpu/attention_cpu.cpp has the math). Every tensor
// is [B, H, T, D] by strides (sB, sH, sT) with contiguous last dim; lse is [B*H, Tq]
// contiguous, of the storage dtype. The matmuls call the BLAS set by set_blas.
struct AttentionArgs {
  int dtype = kF32;                 // kF32 or kF64
  int64_t B = 0, H = 0, Tq = 0, Tk = 0, D = 0;
  int causal = 0;                   // top-left aligned: query i sees keys j <= i
  double scale = 1.0, dropout_p = 0.0;
  uint64_t seed = 0;
  const void* q = nullptr; int64_t q_s[3] = {0, 0, 0};
  const void* k = nullptr; int64_t k_s[3] = {0, 0, 0};
  const void* v = nullptr; int64_t v_s[3] = {0, 0, 0};
  void* o = nullptr; int64_t o_s[3] = {0, 0, 0};        // forward: written; backward: read
  void* lse = nullptr;                                  // forward: written; backward: read
  const void* g = nullptr; int64_t g_s[3] = {0, 0, 0};  // backward: dO
  void* dq = nullptr; int64_t dq_s[3] = {0, 0, 0};
  void* dk = nullptr; int64_t dk_s[3] = {0, 0, 0};
  void* dv = nullptr; int64_t dv_s[3] = {0, 0, 0};
};
void set_blas(uintptr_t sgemm, uintptr_t dgemm);  // Fortran sgemm_ / dgemm_ (LP64)
bool have_blas();
void attention_forward_cpu(const AttentionArgs& a);
void attention_backward_cpu(const AttentionArgs& a);
// The keep mask (1 = kept) of a call: out [BH, Tq, Tk] uint8.
void dropout_keep_cpu(uint64_t seed, int64_t BH, int64_t Tq, int64_t Tk, double p, uint8_t* out);

#ifdef TK_WITH_CUDA
// CUDA kernels (csrc/cuda/*.cu); `stream` is a cudaStream_t passed as an integer.
void superpose_forward_cuda(const SuperposeArgs& a, uintptr_t stream);
void superpose_backward_cuda(const SuperposeArgs& a, uintptr_t stream);
// Bytes of workspace superpose_backward_cuda needs in deterministic mode. The launch plan
// depends on dtype, R, C, nrg, ncg, the 16-byte alignment of w / g / out and the current
// device's SM count, so call it with the arguments of the launch.
int64_t superpose_backward_cuda_workspace(const SuperposeArgs& a);
#endif

}  // namespace tangle

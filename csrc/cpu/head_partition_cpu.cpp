// C++/OpenMP kernels of the head-partition attention (tangle_kernels/ops/head_partition.py).
//
// The nanoGPT space's heads partition the width: for h heads and an embedding
// candidate of width e (head width d = e / h), head r reads the columns [r d, r d + d).
// One attention call per head count runs at the max width E = h * D, so each candidate's
// heads are gathered into slots of width D, zero beyond d:
//
//   gather:  dst[b, t, r, u]   (+)= sum_{i : u < d_i} c_i * src[b, t, r d_i + u]
//            dots[i]            += sum_{r, u < d_i} src[b, t, r d_i + u] * other[b, t, r, u]
//   scatter: dst[b, t, r d_i + u] (+)= sum_i c_i * src[b, t, r, u]        (u < d_i)
//            dots[i]            += sum_{r, u < d_i} src[b, t, r, u] * other[b, t, r d_i + u]
//
// (scatter is the transpose of gather: the backward of one is the other, and the dots
// are the gradients of the coefficients). Every row (b, t) is independent; rows are
// split in fixed chunks whose partial dots are added in chunk order, so the dots are
// bitwise deterministic for any thread count. Strided views are read in place (columns
// contiguous), so the caller never copies q | k | v or the attention outputs.
#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef TK_WITH_OPENMP
#include <omp.h>
#endif

#include "tangle.h"

namespace tangle {
namespace {

constexpr int64_t kChunk = 64;  // rows per chunk of the deterministic dot reduction

// Candidates by decreasing head width (the widest one writes, the others add).
std::vector<int> width_order(const HeadPartitionArgs& a) {
  std::vector<int> ord(a.m);
  for (int i = 0; i < a.m; ++i) ord[i] = i;
  std::stable_sort(ord.begin(), ord.end(),
                   [&](int x, int y) { return a.widths[x] > a.widths[y]; });
  return ord;
}

// The dots of several kernels from their per-chunk partials part[ch * M + off[j] + i],
// added in chunk order (bitwise the same for any thread count); kernels without dots
// (dots == null) are skipped.
inline void reduce_chunk_dots(const std::vector<HeadPartitionArgs>& as, const std::vector<double>& part,
                              const std::vector<int64_t>& off, int64_t M, int64_t nch) {
  for (size_t j = 0; j < as.size(); ++j) {
    if (!as[j].dots) continue;
    for (int i = 0; i < as[j].m; ++i) {
      double acc = 0.0;
      for (int64_t ch = 0; ch < nch; ++ch) acc += part[ch * M + off[j] + i];
      as[j].dots[i] = acc;
    }
  }
}

// One row of the gather of `a` (dst row slots = sum_i c_i G_i(src row)), its dots with
// `other` added to part[0..m).
template <typename S>
inline void gather_row(const HeadPartitionArgs& a, const std::vector<int>& ord, int64_t b,
                       int64_t t, double* part) {
  const int m = a.m;
  const S* srow = static_cast<const S*>(a.src) + b * a.s_sB + t * a.s_sT;
  S* drow = static_cast<S*>(a.dst) + b * a.d_sB + t * a.d_sT;
  const S* oth = static_cast<const S*>(a.other);
  const S* orow = oth ? oth + b * a.o_sB + t * a.o_sT : nullptr;
  for (int64_t r = 0; r < a.h; ++r) {
    S* dh = drow + r * a.d_sH;
    int k0 = 0;
    if (!a.accumulate) {  // the widest candidate writes (no zero fill when it spans D)
      const int i = ord[0];
      const int64_t d = a.widths[i];
      const S c = S(a.coefs[i]);
      const S* sh = srow + r * d;
#pragma omp simd
      for (int64_t u = 0; u < d; ++u) dh[u] = c * sh[u];
      for (int64_t u = d; u < a.D; ++u) dh[u] = S(0);
      k0 = 1;
    }
    for (int k = k0; k < m; ++k) {
      const int i = ord[k];
      const int64_t d = a.widths[i];
      const S c = S(a.coefs[i]);
      const S* sh = srow + r * d;
#pragma omp simd
      for (int64_t u = 0; u < d; ++u) dh[u] += c * sh[u];
    }
    if (orow) {
      for (int i = 0; i < m; ++i) {
        const int64_t d = a.widths[i];
        const S* sh = srow + r * d;
        const S* oh = orow + r * a.o_sH;
        S acc = S(0);  // one head (<= D terms) in S, the rest in double
#pragma omp simd reduction(+ : acc)
        for (int64_t u = 0; u < d; ++u) acc += sh[u] * oh[u];
        part[i] += double(acc);
      }
    }
  }
}

// Several gathers over the same rows (B, T) in one pass: each row (b, t) of every source
// is read once while it is in L1, for all of them (the q, k and v of a head count, or
// every head count's); one parallel region, fixed chunks (deterministic dots).
template <typename S>
void gather_multi_impl(const std::vector<HeadPartitionArgs>& as) {
  const HeadPartitionArgs& a0 = as[0];
  const int64_t rows = a0.B * a0.T;
  const int64_t nch = (rows + kChunk - 1) / kChunk;
  const int J = static_cast<int>(as.size());
  std::vector<int64_t> off(J + 1, 0);
  int64_t width = 0;
  for (int j = 0; j < J; ++j) {
    off[j + 1] = off[j] + (as[j].dots ? as[j].m : 0);
    width += as[j].E;
  }
  const int64_t M = off[J];
  std::vector<double> part(nch * M, 0.0);
  std::vector<std::vector<int>> ord(J);
  for (int j = 0; j < J; ++j) ord[j] = width_order(as[j]);
#pragma omp parallel for schedule(static) if (rows * width > (1 << 15))
  for (int64_t ch = 0; ch < nch; ++ch) {
    const int64_t r0 = ch * kChunk, r1 = std::min(rows, r0 + kChunk);
    int64_t b = r0 / a0.T, t = r0 % a0.T;
    for (int64_t row = r0; row < r1; ++row) {
      for (int j = 0; j < J; ++j)
        gather_row<S>(as[j], ord[j], b, t, as[j].dots ? &part[ch * M + off[j]] : nullptr);
      if (++t == a0.T) { t = 0; ++b; }
    }
  }
  reduce_chunk_dots(as, part, off, M, nch);
}

template <typename S>
void gather_impl(const HeadPartitionArgs& a) {
  gather_multi_impl<S>(std::vector<HeadPartitionArgs>{a});
}

// One row of the scatter of `a` (dst row = sum_i c_i G_i^T(src row)), its dots added
// to part[0..m).
template <typename S>
inline void scatter_row(const HeadPartitionArgs& a, const std::vector<int>& ord, int64_t row,
                        bool accumulate, double* part) {
  const int m = a.m;
  const int64_t b = row / a.T, t = row % a.T;
  const S* srow = static_cast<const S*>(a.src) + b * a.s_sB + t * a.s_sT;
  S* drow = static_cast<S*>(a.dst) + b * a.d_sB + t * a.d_sT;
  const S* oth = static_cast<const S*>(a.other);
  const S* orow = oth ? oth + b * a.o_sB + t * a.o_sT : nullptr;
  int k0 = 0;
  if (!accumulate) {  // the widest candidate writes (no zero fill when it spans E)
    const int i = ord[0];
    const int64_t d = a.widths[i];
    const S c = S(a.coefs[i]);
    for (int64_t r = 0; r < a.h; ++r) {
      const S* sh = srow + r * a.s_sH;
      S* dh = drow + r * d;
#pragma omp simd
      for (int64_t u = 0; u < d; ++u) dh[u] = c * sh[u];
    }
    for (int64_t col = a.h * d; col < a.E; ++col) drow[col] = S(0);
    k0 = 1;
  }
  for (int k = k0; k < m; ++k) {
    const int i = ord[k];
    const int64_t d = a.widths[i];
    const S c = S(a.coefs[i]);
    for (int64_t r = 0; r < a.h; ++r) {
      const S* sh = srow + r * a.s_sH;
      S* dh = drow + r * d;
#pragma omp simd
      for (int64_t u = 0; u < d; ++u) dh[u] += c * sh[u];
    }
  }
  for (int i = 0; orow && i < m; ++i) {
    const int64_t d = a.widths[i];
    double acc = 0.0;
    for (int64_t r = 0; r < a.h; ++r) {
      const S* sh = srow + r * a.s_sH;
      const S* oh = orow + r * d;
      S hacc = S(0);  // one head (<= D terms) in S, the rest in double
#pragma omp simd reduction(+ : hacc)
      for (int64_t u = 0; u < d; ++u) hacc += sh[u] * oh[u];
      acc += double(hacc);
    }
    part[i] += acc;
  }
}

// The scatters of several head counts into ONE dst (all share dst, other and the row
// count): each row of dst is read and written once for all of them, in L1.
template <typename S>
void scatter_multi_impl(const std::vector<HeadPartitionArgs>& as) {
  const HeadPartitionArgs& a0 = as[0];
  const int64_t rows = a0.B * a0.T;
  const int64_t nch = (rows + kChunk - 1) / kChunk;
  const int J = static_cast<int>(as.size());
  std::vector<int64_t> off(J + 1, 0);
  for (int j = 0; j < J; ++j) off[j + 1] = off[j] + as[j].m;
  const int64_t M = off[J];
  std::vector<double> part(a0.other ? nch * M : 0, 0.0);
  std::vector<std::vector<int>> ord(J);
  for (int j = 0; j < J; ++j) ord[j] = width_order(as[j]);
#pragma omp parallel for schedule(static) if (rows * a0.E * J > (1 << 15))
  for (int64_t ch = 0; ch < nch; ++ch) {
    const int64_t r0 = ch * kChunk, r1 = std::min(rows, r0 + kChunk);
    for (int64_t row = r0; row < r1; ++row)
      for (int j = 0; j < J; ++j)
        scatter_row<S>(as[j], ord[j], row, j > 0 || a0.accumulate,
                       a0.other ? &part[ch * M + off[j]] : nullptr);
  }
  if (a0.other) reduce_chunk_dots(as, part, off, M, nch);
}

template <typename S>
void scatter_impl(const HeadPartitionArgs& a) {
  scatter_multi_impl<S>(std::vector<HeadPartitionArgs>{a});
}

}  // namespace

void head_gather_cpu(const HeadPartitionArgs& a) {
  if (a.dtype == kF64) gather_impl<double>(a);
  else gather_impl<float>(a);
}

void head_gather_multi_cpu(const std::vector<HeadPartitionArgs>& as) {
  if (as.empty()) return;
  if (as[0].dtype == kF64) gather_multi_impl<double>(as);
  else gather_multi_impl<float>(as);
}

void head_scatter_cpu(const HeadPartitionArgs& a) {
  if (a.dtype == kF64) scatter_impl<double>(a);
  else scatter_impl<float>(a);
}

void head_scatter_multi_cpu(const std::vector<HeadPartitionArgs>& as) {
  if (as.empty()) return;
  if (as[0].dtype == kF64) scatter_multi_impl<double>(as);
  else scatter_multi_impl<float>(as);
}

}  // namespace tangle

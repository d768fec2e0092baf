// C++/OpenMP superpose kernels (see tangle.h for the math).
//
// Rows are split into fixed chunks that do not depend on the thread count; each
// chunk accumulates its per-cell partial sums in double, and the partials are
// added in chunk order, so d mix is bit-for-bit deterministic for any
// OMP_NUM_THREADS. Inside a row, the columns come as maximal runs of one cell, so
// the inner loop is a plain scaled copy the compiler vectorises.
#include <algorithm>
#include <stdexcept>
#include <vector>

#ifdef TK_WITH_OPENMP
#include <omp.h>
#endif

#include "cpu/half.h"
#include "tangle.h"

namespace tangle {

int cpu_num_threads() {
#ifdef TK_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

namespace {

// Fixed chunking of rows: about 64 KiB elements per chunk, at most 4096 chunks.
inline int64_t num_chunks(int64_t R, int64_t C) {
  const int64_t per_chunk = 1 << 16;
  int64_t rows_per = std::max<int64_t>(1, per_chunk / std::max<int64_t>(C, 1));
  int64_t n = (R + rows_per - 1) / rows_per;
  return std::max<int64_t>(1, std::min<int64_t>(n, 4096));
}

template <typename S, typename TT>
void fwd_impl(const SuperposeArgs& a) {
  using acc = typename Conv<S>::acc;
  const S* w = static_cast<const S*>(a.w);
  S* out = static_cast<S*>(a.out);
  const TT* t = static_cast<const TT*>(a.t);
  const int64_t R = a.R, C = a.C, ncg = a.ncg, nruns = a.nruns;
  const int32_t* runs = a.runs;
#pragma omp parallel for schedule(static) if (R * C > (1 << 15))
  for (int64_t r = 0; r < R; ++r) {
    const TT* trow = t + int64_t(a.rowgrp[r]) * ncg;
    const S* wr = w + r * C;
    S* orow = out + r * C;
    for (int64_t j = 0; j < nruns; ++j) {
      const int64_t s = runs[3 * j], e = runs[3 * j + 1];
      const acc m = acc(trow[runs[3 * j + 2]]);
#pragma omp simd
      for (int64_t c = s; c < e; ++c) orow[c] = Conv<S>::store(Conv<S>::load(wr[c]) * m);
    }
  }
}

template <typename S, typename TT>
void bwd_impl(const SuperposeArgs& a) {
  using acc = typename Conv<S>::acc;
  const S* w = static_cast<const S*>(a.w);
  const S* g = static_cast<const S*>(a.g);
  S* dw = static_cast<S*>(a.out);
  const TT* t = static_cast<const TT*>(a.t);
  TT* p = static_cast<TT*>(a.p);
  const int64_t R = a.R, C = a.C, ncg = a.ncg, nruns = a.nruns;
  const int64_t ncells = a.nrg * a.ncg;
  const int32_t* runs = a.runs;
  const int64_t nch = num_chunks(R, C);
  const int64_t rows_per = (R + nch - 1) / nch;
  std::vector<double> partial(size_t(nch * ncells), 0.0);
#pragma omp parallel for schedule(static) if (R * C > (1 << 15))
  for (int64_t ch = 0; ch < nch; ++ch) {
    double* pc = partial.data() + ch * ncells;
    const int64_t r0 = ch * rows_per, r1 = std::min(R, r0 + rows_per);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = int64_t(a.rowgrp[r]) * ncg;
      const S* wr = w + r * C;
      const S* gr = g + r * C;
      S* dr = dw + r * C;
      for (int64_t j = 0; j < nruns; ++j) {
        const int64_t s = runs[3 * j], e = runs[3 * j + 1];
        const int64_t cell = base + runs[3 * j + 2];
        const acc m = acc(t[cell]);
        acc dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = s; c < e; ++c) {
          const acc gv = Conv<S>::load(gr[c]);
          dr[c] = Conv<S>::store(gv * m);
          dot += gv * Conv<S>::load(wr[c]);
        }
        pc[cell] += double(dot);
      }
    }
  }
  for (int64_t c = 0; c < ncells; ++c) {
    double s = 0.0;
    for (int64_t ch = 0; ch < nch; ++ch) s += partial[size_t(ch * ncells + c)];
    p[c] = TT(s);
  }
}

}  // namespace

void superpose_forward_cpu(const SuperposeArgs& a) {
  switch (a.dtype) {
    case kF32: return fwd_impl<float, float>(a);
    case kF64: return fwd_impl<double, double>(a);
    case kF16: return fwd_impl<f16, float>(a);
    case kBF16: return fwd_impl<bf16, float>(a);
    default: throw std::invalid_argument("superpose_forward_cpu: unsupported dtype code");
  }
}

void superpose_backward_cpu(const SuperposeArgs& a) {
  switch (a.dtype) {
    case kF32: return bwd_impl<float, float>(a);
    case kF64: return bwd_impl<double, double>(a);
    case kF16: return bwd_impl<f16, float>(a);
    case kBF16: return bwd_impl<bf16, float>(a);
    default: throw std::invalid_argument("superpose_backward_cpu: unsupported dtype code");
  }
}

}  // namespace tangle

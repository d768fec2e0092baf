// C++/OpenMP superpose kernels (see tangle.h for the math).
//
// Rows are split into fixed chunks that do not depend on the thread count; each
// chunk accumulates G*W per (row group, column) in double, reduces that to cells at
// the end of the chunk, and the chunk partials are added in chunk order, so d mix is
// bit-for-bit deterministic for any OMP_NUM_THREADS. The mask is expanded once per
// call into one row per row group, so the hot loops are elementwise and vectorise.
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

// Row-group mask rows: mrow[g * C + c] = T[g * ncg + colgrp(c)], built from the runs.
// Every row of group g is then scaled by the same vector, so the hot loops are plain
// elementwise multiplies whatever the length of the runs (a 7x7 kernel crop has runs
// of one element).
template <typename A, typename TT>
std::vector<A> mask_rows(const SuperposeArgs& a) {
  const TT* t = static_cast<const TT*>(a.t);
  std::vector<A> m(size_t(a.nrg * a.C));
  for (int64_t g = 0; g < a.nrg; ++g)
    for (int64_t j = 0; j < a.nruns; ++j) {
      const A v = A(t[g * a.ncg + a.runs[3 * j + 2]]);
      for (int64_t c = a.runs[3 * j]; c < a.runs[3 * j + 1]; ++c) m[size_t(g * a.C + c)] = v;
    }
  return m;
}

// Rows per chunk: fixed by the problem (never by the thread count), about 64 Ki
// elements and at least 8 rows, so the per-chunk reduction of the accumulators
// (one vector of C per row group touched) stays small next to the chunk's work.
inline int64_t rows_per_chunk(int64_t R, int64_t C) {
  int64_t rows = std::max<int64_t>(8, (int64_t(1) << 16) / std::max<int64_t>(C, 1));
  const int64_t max_chunks = 4096;
  if ((R + rows - 1) / rows > max_chunks) rows = (R + max_chunks - 1) / max_chunks;
  return std::max<int64_t>(1, std::min(rows, std::max<int64_t>(R, 1)));
}

template <typename S, typename TT>
void fwd_impl(const SuperposeArgs& a) {
  using acc = typename Conv<S>::acc;
  const S* w = static_cast<const S*>(a.w);
  S* out = static_cast<S*>(a.out);
  const int64_t R = a.R, C = a.C;
  const std::vector<acc> mrow = mask_rows<acc, TT>(a);
#pragma omp parallel for schedule(static) if (R * C > (1 << 15))
  for (int64_t r = 0; r < R; ++r) {
    const acc* m = mrow.data() + int64_t(a.rowgrp[r]) * C;
    const S* wr = w + r * C;
    S* orow = out + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) orow[c] = Conv<S>::store(Conv<S>::load(wr[c]) * m[c]);
  }
}

template <typename S, typename TT>
void bwd_impl(const SuperposeArgs& a) {
  using acc = typename Conv<S>::acc;
  const S* w = static_cast<const S*>(a.w);
  const S* g = static_cast<const S*>(a.g);
  S* dw = static_cast<S*>(a.out);
  TT* p = static_cast<TT*>(a.p);
  const int64_t R = a.R, C = a.C, ncg = a.ncg, nrg = a.nrg, nruns = a.nruns;
  const int64_t ncells = nrg * ncg;
  const int32_t* runs = a.runs;
  const std::vector<acc> mrow = mask_rows<acc, TT>(a);
  const int64_t rows_per = rows_per_chunk(R, C);
  const int64_t nch = std::max<int64_t>(1, (R + rows_per - 1) / rows_per);
  std::vector<double> partial(size_t(nch * ncells), 0.0);
  // Small tensors run on one thread: a parallel region costs more than the work, and
  // far more on a loaded machine. The result does not depend on this (fixed chunks).
#pragma omp parallel if (R * C > (1 << 15) && nch > 1)
  {
    // Per-thread accumulators: one length-C vector per row group, in double.
    std::vector<double> accum(static_cast<size_t>(nrg * C));
    std::vector<char> touched(static_cast<size_t>(nrg), 0);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < nch; ++ch) {
      std::fill(touched.begin(), touched.end(), 0);
      const int64_t r0 = ch * rows_per, r1 = std::min(R, r0 + rows_per);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t grp = a.rowgrp[r];
        double* q = accum.data() + grp * C;
        if (!touched[size_t(grp)]) {
          touched[size_t(grp)] = 1;
          std::fill(q, q + C, 0.0);
        }
        const acc* m = mrow.data() + grp * C;
        const S* wr = w + r * C;
        const S* gr = g + r * C;
        S* dr = dw + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc gv = Conv<S>::load(gr[c]);
          dr[c] = Conv<S>::store(gv * m[c]);
          q[c] += double(gv) * double(Conv<S>::load(wr[c]));
        }
      }
      double* pc = partial.data() + ch * ncells;
      for (int64_t grp = 0; grp < nrg; ++grp) {
        if (!touched[size_t(grp)]) continue;
        const double* q = accum.data() + grp * C;
        for (int64_t j = 0; j < nruns; ++j) {
          double sum = 0.0;
          for (int64_t c = runs[3 * j]; c < runs[3 * j + 1]; ++c) sum += q[c];
          pc[grp * ncg + runs[3 * j + 2]] += sum;
        }
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

// C++/OpenMP kernels of the superposed LayerNorm (tangle_kernels/ops/mixed_layernorm.py).
//
// Candidate k normalises the prefix [0, c_k) of each row of x [N, E] (as the
// sub-network of width c_k does); the soft forward superposes the candidates with
// weights m_k. With mu_k, r_k the mean and reciprocal std of the prefix,
// xhat_k = (x - mu_k) r_k, and the segments s of the width cut at every c_k:
//
//   y_j  = w_j * (x_j A[s] - Bv[s]) + bmix_j,   A[s] = sum_{k covers s} m_k r_k,
//                                              Bv[s] = sum_{k covers s} m_k mu_k r_k
//   backward (g' = g * w, SG_k = sum_{j<c_k} g'_j, H_k = sum_{j<c_k} g'_j xhat_k,j):
//   dx_j = g'_j A[s] - Q[s] - x_j R[s],   R[s] = sum m_k r_k^2 H_k / c_k,
//                                          Q[s] = sum m_k r_k (SG_k - r_k mu_k H_k) / c_k
//   d m_k = sum_rows H_k,  dw_j = sum_rows g_j (x_j A[s] - Bv[s]),  dbmix_j = sum_rows g_j
//
// A row (E values) stays in L1 while its statistics are formed, so each row costs one
// read of x (and g) from memory and one write of y (dx) whatever the number of
// candidates. Sums over one segment of a row (or over the rows of one chunk) in the
// storage precision, vectorised; across segments and chunks in double. Column and
// candidate sums per fixed chunk of rows, added in chunk order: bitwise deterministic
// for any thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef TK_WITH_OPENMP
#include <omp.h>
#endif

#include "tangle.h"

namespace tangle {
namespace {

constexpr int64_t kRows = 32;  // rows per chunk of the deterministic reductions

struct Segs {
  std::vector<int64_t> cut;          // segment s = [cut[s], cut[s+1])
  std::vector<std::vector<int>> by;  // candidates covering segment s
};

Segs segments(const MixedLayerNormArgs& a) {
  Segs sg;
  std::vector<int64_t> w(a.widths, a.widths + a.K);
  std::sort(w.begin(), w.end());
  w.erase(std::unique(w.begin(), w.end()), w.end());
  sg.cut.push_back(0);
  for (auto c : w) sg.cut.push_back(c);
  if (sg.cut.back() < a.E) sg.cut.push_back(a.E);  // columns no candidate covers
  const int ns = static_cast<int>(sg.cut.size()) - 1;
  sg.by.resize(ns);
  for (int s = 0; s < ns; ++s)
    for (int k = 0; k < a.K; ++k)
      if (a.widths[k] >= sg.cut[s + 1]) sg.by[s].push_back(k);
  return sg;
}

template <typename S>
void forward_impl(const MixedLayerNormArgs& a) {
  const Segs sg = segments(a);
  const int ns = static_cast<int>(sg.by.size());
  const int K = a.K;
  const S* X = static_cast<const S*>(a.x);
  const S* W = static_cast<const S*>(a.w);
  const S* Bm = static_cast<const S*>(a.bmix);
  S* Y = static_cast<S*>(a.y);
#pragma omp parallel if (a.N * a.E > (1 << 15))
  {
    std::vector<double> s1(ns), mu(K), rs(K);
    std::vector<S> A(ns), Bv(ns);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < a.N; ++n) {
      const S* x = X + n * a.sx;
      for (int s = 0; s < ns; ++s) {
        S acc = S(0);  // a segment (<= E terms) in S, the rest in double
#pragma omp simd reduction(+ : acc)
        for (int64_t j = sg.cut[s]; j < sg.cut[s + 1]; ++j) acc += x[j];
        s1[s] = double(acc);
      }
      for (int k = 0; k < K; ++k) {
        const int64_t c = a.widths[k];
        double sum = 0.0;
        for (int s = 0; s < ns && sg.cut[s + 1] <= c; ++s) sum += s1[s];
        const double m = sum / double(c);
        const S ms = S(m);
        S vs = S(0);  // two-pass variance around the (double) mean
#pragma omp simd reduction(+ : vs)
        for (int64_t j = 0; j < c; ++j) vs += (x[j] - ms) * (x[j] - ms);
        const double v = double(vs);
        mu[k] = m;
        rs[k] = 1.0 / std::sqrt(v / double(c) + a.eps);
        a.mu[n * K + k] = m;
        a.rstd[n * K + k] = rs[k];
      }
      for (int s = 0; s < ns; ++s) {
        double p = 0.0, q = 0.0;
        for (int k : sg.by[s]) {
          p += a.mix[k] * rs[k];
          q += a.mix[k] * mu[k] * rs[k];
        }
        A[s] = S(p);
        Bv[s] = S(q);
      }
      S* y = Y + n * a.E;
      for (int s = 0; s < ns; ++s) {
        const S As = A[s], Bs = Bv[s];
        const int64_t lo = sg.cut[s], hi = sg.cut[s + 1];
        if (W && Bm) {
#pragma omp simd
          for (int64_t j = lo; j < hi; ++j) y[j] = (x[j] * As - Bs) * W[j] + Bm[j];
        } else if (W) {
#pragma omp simd
          for (int64_t j = lo; j < hi; ++j) y[j] = (x[j] * As - Bs) * W[j];
        } else if (Bm) {
#pragma omp simd
          for (int64_t j = lo; j < hi; ++j) y[j] = x[j] * As - Bs + Bm[j];
        } else {
#pragma omp simd
          for (int64_t j = lo; j < hi; ++j) y[j] = x[j] * As - Bs;
        }
      }
    }
  }
}

template <typename S>
void backward_impl(const MixedLayerNormArgs& a) {
  const Segs sg = segments(a);
  const int ns = static_cast<int>(sg.by.size());
  const int K = a.K;
  const int64_t E = a.E;
  const int64_t nch = (a.N + kRows - 1) / kRows;
  const S* X = static_cast<const S*>(a.x);
  const S* W = static_cast<const S*>(a.w);
  const S* G = static_cast<const S*>(a.g);
  S* DX = static_cast<S*>(a.dx);
  const bool want_w = a.dw != nullptr, want_b = a.dbmix != nullptr;
  // per-chunk column sums (kRows terms) in S, the chunks added in double
  std::vector<S> pw(want_w ? nch * E : 0, S(0)), pb(want_b ? nch * E : 0, S(0));
  std::vector<double> pm(nch * K, 0.0);
#pragma omp parallel if (a.N * a.E > (1 << 15))
  {
    std::vector<double> sg1(ns), sgx(ns), H(K), SG(K);
    std::vector<S> A(ns), Bv(ns), Q(ns), R(ns), gp(E);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < nch; ++ch) {
      const int64_t n0 = ch * kRows, n1 = std::min(a.N, n0 + kRows);
      S* cw = want_w ? &pw[ch * E] : nullptr;
      S* cb = want_b ? &pb[ch * E] : nullptr;
      for (int64_t n = n0; n < n1; ++n) {
        const S* x = X + n * a.sx;
        const S* g = G + n * a.sg;
        if (W) {
#pragma omp simd
          for (int64_t j = 0; j < E; ++j) gp[j] = g[j] * W[j];
        } else {
          for (int64_t j = 0; j < E; ++j) gp[j] = g[j];
        }
        for (int s = 0; s < ns; ++s) {
          S u = S(0), v = S(0);  // a segment in S, the rest in double
#pragma omp simd reduction(+ : u, v)
          for (int64_t j = sg.cut[s]; j < sg.cut[s + 1]; ++j) {
            u += gp[j];
            v += gp[j] * x[j];
          }
          sg1[s] = double(u);
          sgx[s] = double(v);
        }
        const double* mu = a.mu + n * K;
        const double* rs = a.rstd + n * K;
        for (int k = 0; k < K; ++k) {
          double u = 0.0, v = 0.0;
          for (int s = 0; s < ns && sg.cut[s + 1] <= a.widths[k]; ++s) {
            u += sg1[s];
            v += sgx[s];
          }
          SG[k] = u;
          H[k] = rs[k] * (v - mu[k] * u);
          pm[ch * K + k] += H[k];
        }
        for (int s = 0; s < ns; ++s) {
          double p = 0.0, q = 0.0, qq = 0.0, rr = 0.0;
          for (int k : sg.by[s]) {
            const double mk = a.mix[k], r = rs[k], c = double(a.widths[k]);
            p += mk * r;
            q += mk * mu[k] * r;
            rr += mk * r * r * H[k] / c;
            qq += mk * r * (SG[k] - r * mu[k] * H[k]) / c;
          }
          A[s] = S(p);
          Bv[s] = S(q);
          R[s] = S(rr);
          Q[s] = S(qq);
        }
        S* dx = DX + n * E;
        for (int s = 0; s < ns; ++s) {
          const int64_t lo = sg.cut[s], hi = sg.cut[s + 1];
          const S As = A[s], Bs = Bv[s], Qs = Q[s], Rs = R[s];
#pragma omp simd
          for (int64_t j = lo; j < hi; ++j) dx[j] = gp[j] * As - Qs - x[j] * Rs;
          if (cw) {
#pragma omp simd
            for (int64_t j = lo; j < hi; ++j) cw[j] += g[j] * (x[j] * As - Bs);
          }
        }
        if (cb) {
#pragma omp simd
          for (int64_t j = 0; j < E; ++j) cb[j] += g[j];
        }
      }
    }
  }
  for (int k = 0; k < K; ++k) {
    double acc = 0.0;
    for (int64_t ch = 0; ch < nch; ++ch) acc += pm[ch * K + k];
    a.dmix[k] = acc;
  }
  if (want_w || want_b) {
#pragma omp parallel for schedule(static) if (nch * E > (1 << 15))
    for (int64_t j = 0; j < E; ++j) {
      double u = 0.0, v = 0.0;
      for (int64_t ch = 0; ch < nch; ++ch) {
        if (want_w) u += double(pw[ch * E + j]);
        if (want_b) v += double(pb[ch * E + j]);
      }
      if (want_w) static_cast<S*>(a.dw)[j] = S(u);
      if (want_b) static_cast<S*>(a.dbmix)[j] = S(v);
    }
  }
}

}  // namespace

void mixed_layernorm_forward_cpu(const MixedLayerNormArgs& a) {
  if (a.dtype == kF64) forward_impl<double>(a);
  else forward_impl<float>(a);
}

void mixed_layernorm_backward_cpu(const MixedLayerNormArgs& a) {
  if (a.dtype == kF64) backward_impl<double>(a);
  else backward_impl<float>(a);
}

}  // namespace tangle

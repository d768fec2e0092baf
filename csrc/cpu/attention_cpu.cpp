// Fused scaled-dot-product attention with dropout, CPU (float32 / float64), forward and
// backward, for the head-partition attention of the nanoGPT supernet
// (tangle_kernels/ops/attention.py has the Python side).
//
// Why: torch's CPU attention with dropout is its math path (no CPU flash kernel has
// dropout): it materialises and keeps, per call, the [B, H, Tq, Tk] scores, softmax,
// dropout mask and dropped probabilities, and draws the mask with aten::bernoulli_ (a
// fifth of a Tiny Shakespeare supernet step). This kernel keeps per call only the output
// O and the row log-sum-exp L, and regenerates the mask in backward from a seed.
//
// Math, per (batch, head) and query row i (s = scale, p = dropout probability, keep
// mask z_ij in {0, 1} drawn with P(z = 0) = p, causal: j <= i, top-left aligned):
//
//   S_ij = s q_i . k_j      P_ij = exp(S_ij - L_i),  L_i = log sum_j exp(S_ij)
//   Z_ij = z_ij / (1 - p)   O_i = sum_j P_ij Z_ij v_j
//
//   backward (dO given; D_i = dO_i . O_i = sum_j P_ij Z_ij (dO_i . v_j)):
//   dV_j = sum_i P_ij Z_ij dO_i        dP_ij = Z_ij (dO_i . v_j)
//   dS_ij = P_ij (dP_ij - D_i)         dQ_i = s sum_j dS_ij k_j    dK_j = s sum_i dS_ij q_i
//
// Tiling: each (batch, head) is one task (tasks are split over the OpenMP threads, so a
// task's dK, dV are accumulated by one thread in a fixed order: results are bitwise the
// same for any thread count). Query rows go in blocks of Bq; a block's scores against all
// the keys it sees ([Bq, kend], kend <= Tk; causal blocks skip the keys above the
// diagonal) fit in L2, so the softmax needs no online rescaling. The five block matmuls
// are BLAS calls (the sgemm_/dgemm_ that torch itself links, handed over by address
// from Python: see set_blas), one thread each.
//
// Dropout mask: z_ij = [h(i, j) >= p 2^32] with h a counter-based hash of (seed, task,
// row i, column j): a row key mix64(seed, task * Tq + i) and two murmur3 finalisers of
// (j, key). The keep probability is 1 - floor(p 2^32) / 2^32 (within 2^-32 of 1 - p);
// the scale is 1 / (1 - p) as torch's. The mask depends on (seed, B*H index, i, j) only:
// the same for any thread count, block size or direction (forward / backward), and
// dropout_keep_cpu writes it out for the tests' oracle.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef TK_WITH_OPENMP
#include <omp.h>
#endif

#include "tangle.h"

namespace tangle {

namespace {

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*,
                          const float*, const float*, const int*, const float*, const int*,
                          const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*,
                          const double*, const double*, const int*, const double*, const int*,
                          const double*, double*, const int*);
sgemm_fn g_sgemm = nullptr;
dgemm_fn g_dgemm = nullptr;

// Row-major C[M, N] = alpha op(A) op(B) + beta C (A, B, C row-major with leading
// dimensions lda, ldb, ldc), as the column-major C^T = op(B)^T op(A)^T.
template <typename S>
void gemm_rm(bool ta, bool tb, int M, int N, int K, S alpha, const S* A, int lda, const S* B,
             int ldb, S beta, S* C, int ldc) {
  if (M == 0 || N == 0) return;
  const char opa = tb ? 'T' : 'N', opb = ta ? 'T' : 'N';
  if constexpr (sizeof(S) == 4) {
    g_sgemm(&opa, &opb, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
  } else {
    g_dgemm(&opa, &opb, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
  }
}

inline uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// A column is dropped when its hash is below floor(p 2^32).
inline uint32_t keep_threshold(double p) {
  return static_cast<uint32_t>(std::min(std::floor(p * 4294967296.0), 4294967295.0));
}

inline uint64_t row_key(uint64_t seed, int64_t task, int64_t Tq, int64_t i) {
  return mix64(seed ^ mix64(static_cast<uint64_t>(task * Tq + i)));
}

// Dropout factors of one row: z[j] = keep(j) ? rs : 0 for j < n (vectorised hash).
template <typename S>
inline void row_factors(uint64_t key, uint32_t thr, S rs, int64_t n, S* z) {
  const uint32_t klo = static_cast<uint32_t>(key), khi = static_cast<uint32_t>(key >> 32);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t h = fmix32(fmix32(static_cast<uint32_t>(j) * 0x9E3779B9u + klo) ^ khi);
    z[j] = h >= thr ? rs : S(0);
  }
}

// exp for float on x <= 0 (softmax arguments): Cephes' expf polynomial, branch-free so
// the row loops vectorise; relative error ~1e-7 (2 ulp), flushes below e^-87.3 to ~1e-38.
inline float exp_neg(float x) {
  x = std::max(x, -87.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &e, sizeof(s));
  return y * s;
}
inline double exp_neg(double x) { return std::exp(x); }

template <typename S>
struct View {
  S* p;
  int64_t sB, sH, sT;
  S* at(int64_t b, int64_t h) const { return p + b * sB + h * sH; }
};

template <typename S, typename P>
View<S> view(P* p, const int64_t* s) {
  return View<S>{static_cast<S*>(p), s[0], s[1], s[2]};
}

// The dropout of a call: keep threshold on the hash and the scale 1 / (1 - p).
template <typename S>
struct Dropout {
  bool on;
  uint32_t thr;
  S rs;
  explicit Dropout(double p)
      : on(p > 0.0), thr(p > 0.0 ? keep_threshold(p) : 0u), rs(p > 0.0 ? S(1.0 / (1.0 - p)) : S(1)) {}
};

int64_t query_block(int64_t Tk) {
  // [Bq, Tk] scores + factors + a second buffer stay within ~384 KiB of float32.
  int64_t bq = 64;
  while (bq > 8 && bq * Tk > 32768) bq /= 2;
  return bq;
}

template <typename S>
void forward_impl(const AttentionArgs& a) {
  const auto Q = view<const S>(a.q, a.q_s), K = view<const S>(a.k, a.k_s), V = view<const S>(a.v, a.v_s);
  const auto O = view<S>(a.o, a.o_s);
  S* lse = static_cast<S*>(a.lse);
  const int64_t BH = a.B * a.H, Tq = a.Tq, Tk = a.Tk, D = a.D;
  const int64_t bq = query_block(Tk);
  const Dropout<S> dr(a.dropout_p);
  const bool drop = dr.on;
  const uint32_t thr = dr.thr;
  const S rs = dr.rs;
  const S scale = S(a.scale);
#pragma omp parallel if (BH > 1)
  {
    std::vector<S> sbuf(bq * Tk), zbuf(drop ? Tk : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < BH; ++task) {
      const int64_t b = task / a.H, hh = task % a.H;
      const S* q = Q.at(b, hh);
      const S* k = K.at(b, hh);
      const S* v = V.at(b, hh);
      S* o = O.at(b, hh);
      S* L = lse + task * Tq;
      for (int64_t i0 = 0; i0 < Tq; i0 += bq) {
        const int64_t mb = std::min(bq, Tq - i0);
        const int64_t kend = a.causal ? std::min(Tk, i0 + mb) : Tk;
        S* s = sbuf.data();
        gemm_rm<S>(false, true, mb, kend, D, scale, q + i0 * Q.sT, Q.sT, k, K.sT, S(0), s, kend);
        for (int64_t r = 0; r < mb; ++r) {
          const int64_t i = i0 + r;
          const int64_t jn = a.causal ? std::min(i + 1, kend) : kend;
          S* row = s + r * kend;
          S mx = row[0];
          for (int64_t j = 1; j < jn; ++j) mx = std::max(mx, row[j]);
          S sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < jn; ++j) {
            const S e = exp_neg(row[j] - mx);
            row[j] = e;
            sum += e;
          }
          L[i] = mx + std::log(sum);
          const S inv = S(1) / sum;
          if (drop) {
            S* z = zbuf.data();
            row_factors<S>(row_key(a.seed, task, Tq, i), thr, rs, jn, z);
#pragma omp simd
            for (int64_t j = 0; j < jn; ++j) row[j] = row[j] * inv * z[j];
          } else {
#pragma omp simd
            for (int64_t j = 0; j < jn; ++j) row[j] *= inv;
          }
          for (int64_t j = jn; j < kend; ++j) row[j] = S(0);
        }
        gemm_rm<S>(false, false, mb, D, kend, S(1), s, kend, v, V.sT, S(0), o + i0 * O.sT, O.sT);
      }
    }
  }
}

template <typename S>
void backward_impl(const AttentionArgs& a) {
  const auto Q = view<const S>(a.q, a.q_s), K = view<const S>(a.k, a.k_s), V = view<const S>(a.v, a.v_s);
  const auto O = view<const S>(a.o, a.o_s), G = view<const S>(a.g, a.g_s);
  const auto dQ = view<S>(a.dq, a.dq_s), dK = view<S>(a.dk, a.dk_s), dV = view<S>(a.dv, a.dv_s);
  const S* lse = static_cast<const S*>(a.lse);
  const int64_t BH = a.B * a.H, Tq = a.Tq, Tk = a.Tk, D = a.D;
  const int64_t bq = query_block(Tk);
  const Dropout<S> dr(a.dropout_p);
  const bool drop = dr.on;
  const uint32_t thr = dr.thr;
  const S rs = dr.rs;
  const S scale = S(a.scale);
#pragma omp parallel if (BH > 1)
  {
    std::vector<S> pbuf(bq * Tk), wbuf(bq * Tk), zbuf(drop ? bq * Tk : 0), dvec(bq);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < BH; ++task) {
      const int64_t b = task / a.H, hh = task % a.H;
      const S* q = Q.at(b, hh);
      const S* k = K.at(b, hh);
      const S* v = V.at(b, hh);
      const S* o = O.at(b, hh);
      const S* g = G.at(b, hh);
      S* dq = dQ.at(b, hh);
      S* dk = dK.at(b, hh);
      S* dv = dV.at(b, hh);
      const S* L = lse + task * Tq;
      for (int64_t j = 0; j < Tk; ++j) {
        std::fill(dk + j * dK.sT, dk + j * dK.sT + D, S(0));
        std::fill(dv + j * dV.sT, dv + j * dV.sT + D, S(0));
      }
      for (int64_t i0 = 0; i0 < Tq; i0 += bq) {
        const int64_t mb = std::min(bq, Tq - i0);
        const int64_t kend = a.causal ? std::min(Tk, i0 + mb) : Tk;
        if (kend == 0) continue;
        S* P = pbuf.data();
        S* W = wbuf.data();
        S* Z = zbuf.data();
        for (int64_t r = 0; r < mb; ++r) {
          const S* gi = g + (i0 + r) * G.sT;
          const S* oi = o + (i0 + r) * O.sT;
          S acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t u = 0; u < D; ++u) acc += gi[u] * oi[u];
          dvec[r] = acc;
        }
        gemm_rm<S>(false, true, mb, kend, D, scale, q + i0 * Q.sT, Q.sT, k, K.sT, S(0), P, kend);
        for (int64_t r = 0; r < mb; ++r) {
          const int64_t i = i0 + r;
          const int64_t jn = a.causal ? std::min(i + 1, kend) : kend;
          S* prow = P + r * kend;
          const S li = L[i];
#pragma omp simd
          for (int64_t j = 0; j < jn; ++j) prow[j] = exp_neg(prow[j] - li);
          for (int64_t j = jn; j < kend; ++j) prow[j] = S(0);
          if (drop) {
            S* z = Z + r * kend;
            row_factors<S>(row_key(a.seed, task, Tq, i), thr, rs, jn, z);
            for (int64_t j = jn; j < kend; ++j) z[j] = S(0);
            S* w = W + r * kend;
#pragma omp simd
            for (int64_t j = 0; j < kend; ++j) w[j] = prow[j] * z[j];
          }
        }
        const S* Pd = drop ? W : P;  // the dropped probabilities P Z
        gemm_rm<S>(true, false, kend, D, mb, S(1), Pd, kend, g + i0 * G.sT, G.sT, S(1), dv, dV.sT);
        gemm_rm<S>(false, true, mb, kend, D, S(1), g + i0 * G.sT, G.sT, v, V.sT, S(0), W, kend);
        for (int64_t r = 0; r < mb; ++r) {  // dS = P (Z dPd - D), into P
          S* prow = P + r * kend;
          const S* w = W + r * kend;
          const S dr = dvec[r];
          if (drop) {
            const S* z = Z + r * kend;
#pragma omp simd
            for (int64_t j = 0; j < kend; ++j) prow[j] = prow[j] * (w[j] * z[j] - dr);
          } else {
#pragma omp simd
            for (int64_t j = 0; j < kend; ++j) prow[j] = prow[j] * (w[j] - dr);
          }
        }
        gemm_rm<S>(false, false, mb, D, kend, scale, P, kend, k, K.sT, S(0), dq + i0 * dQ.sT, dQ.sT);
        gemm_rm<S>(true, false, kend, D, mb, scale, P, kend, q + i0 * Q.sT, Q.sT, S(1), dk, dK.sT);
      }
    }
  }
}

}  // namespace

void set_blas(uintptr_t sgemm, uintptr_t dgemm) {
  g_sgemm = reinterpret_cast<sgemm_fn>(sgemm);
  g_dgemm = reinterpret_cast<dgemm_fn>(dgemm);
}

bool have_blas() { return g_sgemm != nullptr && g_dgemm != nullptr; }

void attention_forward_cpu(const AttentionArgs& a) {
  if (a.dtype == kF64) forward_impl<double>(a);
  else forward_impl<float>(a);
}

void attention_backward_cpu(const AttentionArgs& a) {
  if (a.dtype == kF64) backward_impl<double>(a);
  else backward_impl<float>(a);
}

void dropout_keep_cpu(uint64_t seed, int64_t BH, int64_t Tq, int64_t Tk, double p, uint8_t* out) {
  const uint32_t thr = keep_threshold(p);
  std::vector<float> z(Tk);
  for (int64_t task = 0; task < BH; ++task)
    for (int64_t i = 0; i < Tq; ++i) {
      row_factors<float>(row_key(seed, task, Tq, i), thr, 1.0f, Tk, z.data());
      uint8_t* row = out + (task * Tq + i) * Tk;
      for (int64_t j = 0; j < Tk; ++j) row[j] = z[j] != 0.0f;
    }
}

}  // namespace tangle

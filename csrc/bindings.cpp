// The one binding file: every argument check of the compiled kernels lives here.
// Kernels take raw pointers (tensor.data_ptr()) and sizes, so the extension does
// not link libtorch; the Python side (tangle_kernels/backends) guarantees
// contiguity, dtype and device, and this file re-checks what it can see.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "tangle.h"

namespace py = pybind11;

#define TK_CHECK(cond, msg)                                           \
  do {                                                                \
    if (!(cond)) throw std::invalid_argument(std::string("tangle_kernels._C: ") + (msg)); \
  } while (0)

namespace tangle {
#ifdef TK_WITH_CUDA
void register_cuda(py::module_& m);
#endif
}  // namespace tangle

namespace {

tangle::SuperposeArgs make_args(int dtype, int64_t R, int64_t C, int64_t nrg, int64_t ncg,
                                uintptr_t w, uintptr_t g, uintptr_t out, uintptr_t t, uintptr_t p,
                                uintptr_t rowgrp, uintptr_t colgrp, uintptr_t runs, int64_t nruns) {
  TK_CHECK(dtype >= tangle::kF32 && dtype <= tangle::kBF16, "unknown dtype code (see _C.dtype_codes)");
  TK_CHECK(R >= 0 && C >= 0, "R and C must be non-negative");
  TK_CHECK(nrg > 0 && ncg > 0, "nrg and ncg must be positive");
  TK_CHECK(nruns >= 0, "nruns must be non-negative");
  TK_CHECK(R * C == 0 || (w && out && t && rowgrp), "null pointer for weight, out, T or rowgrp");
  auto a = tangle::args_from_addresses(dtype, R, C, nrg, ncg, w, g, out, t, p, rowgrp, colgrp);
  a.runs = reinterpret_cast<const int32_t*>(runs);
  a.nruns = nruns;
  return a;
}

void fwd_cpu(int dtype, int64_t R, int64_t C, int64_t nrg, int64_t ncg, uintptr_t w,
             uintptr_t out, uintptr_t t, uintptr_t rowgrp, uintptr_t runs, int64_t nruns) {
  auto a = make_args(dtype, R, C, nrg, ncg, w, 0, out, t, 0, rowgrp, 0, runs, nruns);
  TK_CHECK(R * C == 0 || runs, "null pointer for runs");
  py::gil_scoped_release nogil;
  tangle::superpose_forward_cpu(a);
}

void bwd_cpu(int dtype, int64_t R, int64_t C, int64_t nrg, int64_t ncg, uintptr_t w, uintptr_t g,
             uintptr_t dw, uintptr_t t, uintptr_t p, uintptr_t rowgrp, uintptr_t runs,
             int64_t nruns) {
  auto a = make_args(dtype, R, C, nrg, ncg, w, g, dw, t, p, rowgrp, 0, runs, nruns);
  TK_CHECK(p, "null pointer for P");
  TK_CHECK(R * C == 0 || (g && runs), "null pointer for G or runs");
  py::gil_scoped_release nogil;
  tangle::superpose_backward_cpu(a);
}

// Strides of a row set: a tuple (sB, sT) or (sB, sT, sH); missing entries are 0.
void strides(py::tuple t, int64_t* s, size_t n, const char* what) {
  TK_CHECK(py::len(t) <= n, std::string("head partition: too many strides for ") + what);
  for (size_t i = 0; i < n; ++i) s[i] = i < py::len(t) ? t[i].cast<int64_t>() : 0;
}

// One head-partition gather ([B, T, >=E] -> [B, T, h, D]) or scatter ([B, T, h, D] ->
// [B, T, E]) of csrc/cpu/head_partition_cpu.cpp. Strides are tuples: (sB, sT) on the
// flat side, (sB, sT, sH) on the [h, D] side; other (optional) has dst's layout.
struct HeadCall {
  tangle::HeadPartitionArgs a;
  std::vector<int64_t> w;
  std::vector<double> c;
};

HeadCall head_call(int dtype, int64_t B, int64_t T, int64_t E, int64_t h, py::list widths,
                   py::list coefs, uintptr_t src, py::tuple src_strides, uintptr_t dst,
                   py::tuple dst_strides, bool accumulate, uintptr_t other,
                   py::tuple other_strides, uintptr_t dots) {
  TK_CHECK(dtype == tangle::kF32 || dtype == tangle::kF64, "head partition: float32 or float64");
  TK_CHECK(B >= 0 && T >= 0 && E > 0 && h > 0 && E % h == 0, "head partition: bad sizes");
  TK_CHECK(py::len(widths) == py::len(coefs) && py::len(widths) > 0,
           "head partition: widths and coefs must have the same non-zero length");
  HeadCall hc;
  for (auto x : widths) hc.w.push_back(x.cast<int64_t>());
  for (auto x : coefs) hc.c.push_back(x.cast<double>());
  for (auto d : hc.w) TK_CHECK(d >= 1 && d * h <= E, "head partition: head width out of range");
  TK_CHECK(B * T == 0 || (src && dst), "head partition: null src or dst");
  TK_CHECK(!other || dots, "head partition: other needs dots");
  tangle::HeadPartitionArgs& a = hc.a;
  a.dtype = dtype; a.B = B; a.T = T; a.E = E; a.h = h; a.D = E / h;
  a.m = static_cast<int>(hc.w.size()); a.widths = hc.w.data(); a.coefs = hc.c.data();
  int64_t s[3], d[3], o[3];
  strides(src_strides, s, 3, "src");
  strides(dst_strides, d, 3, "dst");
  strides(other_strides, o, 3, "other");
  a.src = reinterpret_cast<const void*>(src); a.s_sB = s[0]; a.s_sT = s[1]; a.s_sH = s[2];
  a.dst = reinterpret_cast<void*>(dst); a.d_sB = d[0]; a.d_sT = d[1]; a.d_sH = d[2];
  a.accumulate = accumulate ? 1 : 0;
  a.other = reinterpret_cast<const void*>(other); a.o_sB = o[0]; a.o_sT = o[1]; a.o_sH = o[2];
  a.dots = reinterpret_cast<double*>(dots);
  return hc;
}

void head_gather(int dtype, int64_t B, int64_t T, int64_t E, int64_t h, py::list widths,
                 py::list coefs, uintptr_t src, py::tuple src_strides, uintptr_t dst,
                 py::tuple dst_strides, bool accumulate, uintptr_t other,
                 py::tuple other_strides, uintptr_t dots) {
  auto hc = head_call(dtype, B, T, E, h, widths, coefs, src, src_strides, dst, dst_strides,
                      accumulate, other, other_strides, dots);
  py::gil_scoped_release nogil;
  tangle::head_gather_cpu(hc.a);
}

void head_scatter(int dtype, int64_t B, int64_t T, int64_t E, int64_t h, py::list widths,
                  py::list coefs, uintptr_t src, py::tuple src_strides, uintptr_t dst,
                  py::tuple dst_strides, bool accumulate, uintptr_t other,
                  py::tuple other_strides, uintptr_t dots) {
  auto hc = head_call(dtype, B, T, E, h, widths, coefs, src, src_strides, dst, dst_strides,
                      accumulate, other, other_strides, dots);
  py::gil_scoped_release nogil;
  tangle::head_scatter_cpu(hc.a);
}

// The scatters of several head counts into one dst (csrc/cpu/head_partition_cpu.cpp):
// per head count j its heads, candidate head widths and coefficients, its source
// pointer and (B, T, head) strides; dots: [sum_j m_j] float64 when other is set.
void head_scatter_multi_cpu(int dtype, int64_t B, int64_t T, int64_t E, py::list heads,
                            py::list widths, py::list coefs, py::list srcs, py::list s_strides,
                            uintptr_t dst, int64_t d_sB, int64_t d_sT, bool accumulate,
                            uintptr_t other, int64_t o_sB, int64_t o_sT, uintptr_t dots) {
  TK_CHECK(dtype == tangle::kF32 || dtype == tangle::kF64, "head partition: float32 or float64");
  const size_t J = py::len(heads);
  TK_CHECK(J > 0 && py::len(widths) == J && py::len(coefs) == J && py::len(srcs) == J &&
               py::len(s_strides) == J,
           "head partition: heads, widths, coefs, srcs and strides must have one entry per head count");
  TK_CHECK(B >= 0 && T >= 0 && E > 0, "head partition: bad sizes");
  TK_CHECK(B * T == 0 || dst, "head partition: null dst");
  TK_CHECK(!other || dots, "head partition: other needs dots");
  std::vector<std::vector<int64_t>> w(J);
  std::vector<std::vector<double>> c(J);
  std::vector<tangle::HeadPartitionArgs> as(J);
  int64_t off = 0;
  for (size_t j = 0; j < J; ++j) {
    const int64_t h = heads[j].cast<int64_t>();
    TK_CHECK(h > 0 && E % h == 0, "head partition: heads must divide E");
    for (auto x : widths[j].cast<py::list>()) w[j].push_back(x.cast<int64_t>());
    for (auto x : coefs[j].cast<py::list>()) c[j].push_back(x.cast<double>());
    TK_CHECK(!w[j].empty() && w[j].size() == c[j].size(),
             "head partition: widths and coefs must have the same non-zero length");
    for (auto d : w[j]) TK_CHECK(d >= 1 && d * h <= E, "head partition: head width out of range");
    auto st = s_strides[j].cast<py::tuple>();
    TK_CHECK(py::len(st) == 3, "head partition: source strides are (B, T, head)");
    const uintptr_t src = srcs[j].cast<uintptr_t>();
    TK_CHECK(B * T == 0 || src, "head partition: null src");
    tangle::HeadPartitionArgs& a = as[j];
    a.dtype = dtype; a.B = B; a.T = T; a.E = E; a.h = h; a.D = E / h;
    a.m = static_cast<int>(w[j].size()); a.widths = w[j].data(); a.coefs = c[j].data();
    a.src = reinterpret_cast<const void*>(src);
    a.s_sB = st[0].cast<int64_t>(); a.s_sT = st[1].cast<int64_t>(); a.s_sH = st[2].cast<int64_t>();
    a.dst = reinterpret_cast<void*>(dst); a.d_sB = d_sB; a.d_sT = d_sT;
    a.accumulate = accumulate ? 1 : 0;
    a.other = reinterpret_cast<const void*>(other); a.o_sB = o_sB; a.o_sT = o_sT;
    a.dots = other ? reinterpret_cast<double*>(dots) + off : nullptr;
    off += a.m;
  }
  py::gil_scoped_release nogil;
  tangle::head_scatter_multi_cpu(as);
}

// Several head-partition gathers over the same rows in one pass
// (csrc/cpu/head_partition_cpu.cpp); each entry a tuple (E, h, widths, coefs, src,
// s_sB, s_sT, dst, d_sB, d_sT, d_sH, accumulate).
void head_gather_multi_cpu(int dtype, int64_t B, int64_t T, py::list gathers) {
  TK_CHECK(dtype == tangle::kF32 || dtype == tangle::kF64, "head partition: float32 or float64");
  TK_CHECK(B >= 0 && T >= 0, "head partition: bad sizes");
  const size_t J = py::len(gathers);
  TK_CHECK(J > 0, "head partition: no gathers");
  std::vector<std::vector<int64_t>> w(J);
  std::vector<std::vector<double>> c(J);
  std::vector<tangle::HeadPartitionArgs> as(J);
  for (size_t j = 0; j < J; ++j) {
    auto g = gathers[j].cast<py::tuple>();
    TK_CHECK(py::len(g) == 12, "head partition: a gather is (E, h, widths, coefs, src, s_sB, "
                               "s_sT, dst, d_sB, d_sT, d_sH, accumulate)");
    const int64_t E = g[0].cast<int64_t>(), h = g[1].cast<int64_t>();
    TK_CHECK(E > 0 && h > 0 && E % h == 0, "head partition: heads must divide E");
    for (auto x : g[2].cast<py::list>()) w[j].push_back(x.cast<int64_t>());
    for (auto x : g[3].cast<py::list>()) c[j].push_back(x.cast<double>());
    TK_CHECK(!w[j].empty() && w[j].size() == c[j].size(),
             "head partition: widths and coefs must have the same non-zero length");
    for (auto d : w[j]) TK_CHECK(d >= 1 && d * h <= E, "head partition: head width out of range");
    tangle::HeadPartitionArgs& a = as[j];
    a.dtype = dtype; a.B = B; a.T = T; a.E = E; a.h = h; a.D = E / h;
    a.m = static_cast<int>(w[j].size()); a.widths = w[j].data(); a.coefs = c[j].data();
    a.src = reinterpret_cast<const void*>(g[4].cast<uintptr_t>());
    a.s_sB = g[5].cast<int64_t>(); a.s_sT = g[6].cast<int64_t>();
    a.dst = reinterpret_cast<void*>(g[7].cast<uintptr_t>());
    a.d_sB = g[8].cast<int64_t>(); a.d_sT = g[9].cast<int64_t>(); a.d_sH = g[10].cast<int64_t>();
    a.accumulate = g[11].cast<bool>() ? 1 : 0;
    TK_CHECK(B * T == 0 || (a.src && a.dst), "head partition: null src or dst");
  }
  py::gil_scoped_release nogil;
  tangle::head_gather_multi_cpu(as);
}

// Superposed LayerNorm (csrc/cpu/layernorm_mix_cpu.cpp): the shared sizes and candidates.
tangle::MixedLayerNormArgs ln_args(int dtype, int64_t N, int64_t E, py::list widths,
                                   py::list mix, std::vector<int64_t>& wd,
                                   std::vector<double>& mx) {
  TK_CHECK(dtype == tangle::kF32 || dtype == tangle::kF64, "mixed layernorm: float32 or float64");
  TK_CHECK(N >= 0 && E > 0, "mixed layernorm: bad sizes");
  TK_CHECK(py::len(widths) == py::len(mix) && py::len(widths) > 0,
           "mixed layernorm: widths and mix must have the same non-zero length");
  for (auto v : widths) wd.push_back(v.cast<int64_t>());
  for (auto v : mix) mx.push_back(v.cast<double>());
  for (auto c : wd) TK_CHECK(c >= 1 && c <= E, "mixed layernorm: width out of range");
  tangle::MixedLayerNormArgs a;
  a.dtype = dtype; a.N = N; a.E = E; a.K = static_cast<int>(wd.size());
  a.widths = wd.data(); a.mix = mx.data();
  return a;
}

void mixed_layernorm_forward(int dtype, int64_t N, int64_t E, py::list widths, py::list mix,
                             double eps, uintptr_t x, int64_t sx, uintptr_t w, uintptr_t bmix,
                             uintptr_t y, uintptr_t mu, uintptr_t rstd) {
  std::vector<int64_t> wd;
  std::vector<double> mx;
  auto a = ln_args(dtype, N, E, widths, mix, wd, mx);
  TK_CHECK(N == 0 || (x && mu && rstd && y), "mixed layernorm: null x, y or statistics");
  a.eps = eps;
  a.x = reinterpret_cast<const void*>(x); a.sx = sx;
  a.w = reinterpret_cast<const void*>(w); a.bmix = reinterpret_cast<const void*>(bmix);
  a.y = reinterpret_cast<void*>(y);
  a.mu = reinterpret_cast<double*>(mu); a.rstd = reinterpret_cast<double*>(rstd);
  py::gil_scoped_release nogil;
  tangle::mixed_layernorm_forward_cpu(a);
}

void mixed_layernorm_backward(int dtype, int64_t N, int64_t E, py::list widths, py::list mix,
                              uintptr_t x, int64_t sx, uintptr_t w, uintptr_t mu,
                              uintptr_t rstd, uintptr_t g, int64_t sg, uintptr_t dx,
                              uintptr_t dw, uintptr_t dbmix, uintptr_t dmix) {
  std::vector<int64_t> wd;
  std::vector<double> mx;
  auto a = ln_args(dtype, N, E, widths, mix, wd, mx);
  TK_CHECK(N == 0 || (x && mu && rstd && g && dx), "mixed layernorm: null x, g, dx or statistics");
  TK_CHECK(dmix, "mixed layernorm: null dmix");
  a.x = reinterpret_cast<const void*>(x); a.sx = sx;
  a.w = reinterpret_cast<const void*>(w);
  a.mu = reinterpret_cast<double*>(mu); a.rstd = reinterpret_cast<double*>(rstd);
  a.g = reinterpret_cast<const void*>(g); a.sg = sg;
  a.dx = reinterpret_cast<void*>(dx); a.dw = reinterpret_cast<void*>(dw);
  a.dbmix = reinterpret_cast<void*>(dbmix); a.dmix = reinterpret_cast<double*>(dmix);
  py::gil_scoped_release nogil;
  tangle::mixed_layernorm_backward_cpu(a);
}

// Fused attention with dropout (csrc/cpu/attention_cpu.cpp). Each tensor: a tuple
// (address, sB, sH, sT) of a [B, H, T, D] view with contiguous last dim.
void take(py::tuple t, const void** p, int64_t* s) {
  TK_CHECK(py::len(t) == 4, "attention: tensors are (address, sB, sH, sT) tuples");
  *p = reinterpret_cast<const void*>(t[0].cast<uintptr_t>());
  for (int i = 0; i < 3; ++i) s[i] = t[i + 1].cast<int64_t>();
  TK_CHECK(*p != nullptr, "attention: null tensor");
}

void* take_out(py::tuple t, int64_t* s) {  // an output tensor's (address, strides)
  const void* p;
  take(t, &p, s);
  return const_cast<void*>(p);
}

tangle::AttentionArgs attention_args(int dtype, int64_t B, int64_t H, int64_t Tq, int64_t Tk,
                                     int64_t D, bool causal, double scale, double p,
                                     uint64_t seed, py::tuple q, py::tuple k, py::tuple v,
                                     py::tuple o, uintptr_t lse) {
  TK_CHECK(dtype == tangle::kF32 || dtype == tangle::kF64, "attention: float32 or float64");
  TK_CHECK(B > 0 && H > 0 && Tq > 0 && Tk > 0 && D > 0, "attention: sizes must be positive");
  TK_CHECK(B * H * Tq * Tk < (int64_t(1) << 62), "attention: too large");
  TK_CHECK(Tq < (1 << 30) && Tk < (1 << 30) && D < (1 << 30), "attention: too large for BLAS");
  TK_CHECK(p >= 0.0 && p < 1.0, "attention: dropout_p must be in [0, 1)");
  TK_CHECK(lse != 0, "attention: null lse");
  TK_CHECK(tangle::have_blas(), "attention: no BLAS (set_blas was not called)");
  tangle::AttentionArgs a;
  a.dtype = dtype; a.B = B; a.H = H; a.Tq = Tq; a.Tk = Tk; a.D = D;
  a.causal = causal ? 1 : 0; a.scale = scale; a.dropout_p = p; a.seed = seed;
  take(q, &a.q, a.q_s);
  take(k, &a.k, a.k_s);
  take(v, &a.v, a.v_s);
  a.o = take_out(o, a.o_s);
  a.lse = reinterpret_cast<void*>(lse);
  for (auto* s : {a.q_s, a.k_s, a.v_s, a.o_s})
    TK_CHECK(s[2] >= D, "attention: row stride below D");
  return a;
}

void attention_forward(int dtype, int64_t B, int64_t H, int64_t Tq, int64_t Tk, int64_t D,
                       bool causal, double scale, double p, uint64_t seed, py::tuple q,
                       py::tuple k, py::tuple v, py::tuple o, uintptr_t lse) {
  auto a = attention_args(dtype, B, H, Tq, Tk, D, causal, scale, p, seed, q, k, v, o, lse);
  py::gil_scoped_release nogil;
  tangle::attention_forward_cpu(a);
}

void attention_backward(int dtype, int64_t B, int64_t H, int64_t Tq, int64_t Tk, int64_t D,
                        bool causal, double scale, double p, uint64_t seed, py::tuple q,
                        py::tuple k, py::tuple v, py::tuple o, uintptr_t lse, py::tuple g,
                        py::tuple dq, py::tuple dk, py::tuple dv) {
  auto a = attention_args(dtype, B, H, Tq, Tk, D, causal, scale, p, seed, q, k, v, o, lse);
  take(g, &a.g, a.g_s);
  a.dq = take_out(dq, a.dq_s);
  a.dk = take_out(dk, a.dk_s);
  a.dv = take_out(dv, a.dv_s);
  for (auto* s : {a.g_s, a.dq_s, a.dk_s, a.dv_s})
    TK_CHECK(s[2] >= D, "attention: row stride below D");
  py::gil_scoped_release nogil;
  tangle::attention_backward_cpu(a);
}

void dropout_keep(uint64_t seed, int64_t BH, int64_t Tq, int64_t Tk, double p, uintptr_t out) {
  TK_CHECK(BH > 0 && Tq > 0 && Tk > 0 && out, "dropout_keep: bad arguments");
  TK_CHECK(p >= 0.0 && p < 1.0, "dropout_keep: p must be in [0, 1)");
  tangle::dropout_keep_cpu(seed, BH, Tq, Tk, p, reinterpret_cast<uint8_t*>(out));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tangle_kernels compiled kernels (C++/OpenMP CPU, CUDA where built)";
  m.def("superpose_forward_cpu", &fwd_cpu, py::arg("dtype"), py::arg("R"), py::arg("C"),
        py::arg("nrg"), py::arg("ncg"), py::arg("w"), py::arg("out"), py::arg("t"),
        py::arg("rowgrp"), py::arg("runs"), py::arg("nruns"),
        "out[r,c] = w[r,c] * t[rowgrp[r]*ncg + group(c)] over column runs (start, end, group).");
  m.def("superpose_backward_cpu", &bwd_cpu, py::arg("dtype"), py::arg("R"), py::arg("C"),
        py::arg("nrg"), py::arg("ncg"), py::arg("w"), py::arg("g"), py::arg("dw"), py::arg("t"),
        py::arg("p"), py::arg("rowgrp"), py::arg("runs"), py::arg("nruns"),
        "dw = g * t[cell]; p[cell] = sum over the cell of g * w (deterministic).");
  const char* head_doc = "see csrc/cpu/head_partition_cpu.cpp; strides are tuples (sB, sT) "
                         "on the [B, T, E] side and (sB, sT, sH) on the [B, T, h, D] side";
#define TK_HEAD_ARGS                                                                      \
  py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("E"), py::arg("h"), py::arg("widths"), \
      py::arg("coefs"), py::arg("src"), py::arg("src_strides"), py::arg("dst"),            \
      py::arg("dst_strides"), py::arg("accumulate") = false, py::arg("other") = 0,         \
      py::arg("other_strides") = py::tuple(), py::arg("dots") = 0
  m.def("head_gather_cpu", &head_gather, TK_HEAD_ARGS, head_doc);
  m.def("head_scatter_cpu", &head_scatter, TK_HEAD_ARGS, head_doc);
#undef TK_HEAD_ARGS
  m.def("head_scatter_multi_cpu", &head_scatter_multi_cpu, py::arg("dtype"), py::arg("B"),
        py::arg("T"), py::arg("E"), py::arg("heads"), py::arg("widths"), py::arg("coefs"),
        py::arg("srcs"), py::arg("src_strides"), py::arg("dst"), py::arg("d_sB"),
        py::arg("d_sT"), py::arg("accumulate"), py::arg("other"), py::arg("o_sB"),
        py::arg("o_sT"), py::arg("dots"),
        "The head-partition scatters of several head counts into one dst in one pass, see "
        "csrc/cpu/head_partition_cpu.cpp.");
  m.def("head_gather_multi_cpu", &head_gather_multi_cpu, py::arg("dtype"), py::arg("B"),
        py::arg("T"), py::arg("gathers"),
        "Several head-partition gathers over the same rows in one pass, see "
        "csrc/cpu/head_partition_cpu.cpp.");
  m.def("mixed_layernorm_forward_cpu", &mixed_layernorm_forward, py::arg("dtype"), py::arg("N"),
        py::arg("E"), py::arg("widths"), py::arg("mix"), py::arg("eps"), py::arg("x"),
        py::arg("sx"), py::arg("w"), py::arg("bmix"), py::arg("y"), py::arg("mu"),
        py::arg("rstd"), "Superposed LayerNorm forward, see csrc/cpu/layernorm_mix_cpu.cpp.");
  m.def("mixed_layernorm_backward_cpu", &mixed_layernorm_backward, py::arg("dtype"),
        py::arg("N"), py::arg("E"), py::arg("widths"), py::arg("mix"), py::arg("x"),
        py::arg("sx"), py::arg("w"), py::arg("mu"), py::arg("rstd"), py::arg("g"),
        py::arg("sg"), py::arg("dx"), py::arg("dw"), py::arg("dbmix"), py::arg("dmix"),
        "Superposed LayerNorm backward, see csrc/cpu/layernorm_mix_cpu.cpp.");
  m.def("set_blas", &tangle::set_blas, py::arg("sgemm"), py::arg("dgemm"),
        "Hand the fused attention the addresses of Fortran sgemm_ / dgemm_ (LP64).");
  m.def("have_blas", &tangle::have_blas);
#define TK_ATT_ARGS                                                                        \
  py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("Tq"), py::arg("Tk"), py::arg("D"), \
      py::arg("causal"), py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), py::arg("q"), \
      py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse")
  m.def("attention_forward_cpu", &attention_forward, TK_ATT_ARGS,
        "Fused attention with dropout, forward (csrc/cpu/attention_cpu.cpp); tensors are "
        "(address, sB, sH, sT) tuples.");
  m.def("attention_backward_cpu", &attention_backward, TK_ATT_ARGS, py::arg("g"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"),
        "Fused attention with dropout, backward (csrc/cpu/attention_cpu.cpp).");
#undef TK_ATT_ARGS
  m.def("dropout_keep_cpu", &dropout_keep, py::arg("seed"), py::arg("BH"), py::arg("Tq"),
        py::arg("Tk"), py::arg("p"), py::arg("out"),
        "The fused attention's dropout keep mask [BH, Tq, Tk] (uint8) for a seed.");
  py::dict codes;  // the one table of dtype codes (tangle::DType), read by tangle_kernels._ext
  codes["float32"] = int(tangle::kF32);
  codes["float64"] = int(tangle::kF64);
  codes["float16"] = int(tangle::kF16);
  codes["bfloat16"] = int(tangle::kBF16);
  m.attr("dtype_codes") = codes;
  m.def("cpu_num_threads", &tangle::cpu_num_threads);
#ifdef TK_WITH_OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
#ifdef TK_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = std::string(TK_CUDA_ARCHS);
  tangle::register_cuda(m);
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = std::string("");
#endif
}

// The one binding file: every argument check of the compiled kernels lives here.
// Kernels take raw pointers (tensor.data_ptr()) and sizes, so the extension does
// not link libtorch; the Python side (tangle_kernels/backends) guarantees
// contiguity, dtype and device, and this file re-checks what it can see.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

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
  TK_CHECK(dtype >= 0 && dtype <= 3, "dtype code must be 0 (f32), 1 (f64), 2 (f16) or 3 (bf16)");
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

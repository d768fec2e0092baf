// Python bindings of the CUDA kernels (compiled only when nvcc is found).
// Checks live here; kernels in csrc/cuda/*.cu see only SuperposeArgs.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "tangle.h"

namespace py = pybind11;

namespace tangle {

static SuperposeArgs cuda_args(int dtype, int64_t R, int64_t C, int64_t nrg, int64_t ncg,
                               uintptr_t w, uintptr_t g, uintptr_t out, uintptr_t t, uintptr_t p,
                               uintptr_t rowgrp, uintptr_t colgrp, uintptr_t workspace,
                               int64_t workspace_bytes, int deterministic) {
  if (dtype < kF32 || dtype > kBF16)
    throw std::invalid_argument("tangle_kernels._C: unknown dtype code (see _C.dtype_codes)");
  if (R < 0 || C < 0 || nrg <= 0 || ncg <= 0)
    throw std::invalid_argument("tangle_kernels._C: bad sizes");
  if (R * C > 0 && (!w || !out))
    throw std::invalid_argument("tangle_kernels._C: null pointer for w or out");
  auto a = args_from_addresses(dtype, R, C, nrg, ncg, w, g, out, t, p, rowgrp, colgrp);
  a.workspace = reinterpret_cast<void*>(workspace);
  a.workspace_bytes = workspace_bytes;
  a.deterministic = deterministic;
  return a;
}

static void check_tables(const SuperposeArgs& a) {
  if (a.R * a.C > 0 && (!a.t || !a.rowgrp || !a.colgrp))
    throw std::invalid_argument("tangle_kernels._C: null pointer for t, rowgrp or colgrp");
}

void register_cuda(py::module_& m) {
  m.def(
      "superpose_forward_cuda",
      [](int dtype, int64_t R, int64_t C, int64_t nrg, int64_t ncg, uintptr_t w, uintptr_t out,
         uintptr_t t, uintptr_t rowgrp, uintptr_t colgrp, uintptr_t stream) {
        auto a = cuda_args(dtype, R, C, nrg, ncg, w, 0, out, t, 0, rowgrp, colgrp, 0, 0, 1);
        check_tables(a);
        py::gil_scoped_release nogil;
        superpose_forward_cuda(a, stream);
      },
      py::arg("dtype"), py::arg("R"), py::arg("C"), py::arg("nrg"), py::arg("ncg"), py::arg("w"),
      py::arg("out"), py::arg("t"), py::arg("rowgrp"), py::arg("colgrp"), py::arg("stream"));
  m.def(
      "superpose_backward_cuda_workspace",
      [](int dtype, int64_t R, int64_t C, int64_t nrg, int64_t ncg, uintptr_t w, uintptr_t g,
         uintptr_t dw) {
        // The launch plan (hence the workspace) depends on the pointers' alignment and
        // on the current device's SM count: pass the very tensors of the launch.
        auto a = cuda_args(dtype, R, C, nrg, ncg, w, g, dw, 0, 0, 0, 0, 0, 0, 1);
        return superpose_backward_cuda_workspace(a);
      },
      py::arg("dtype"), py::arg("R"), py::arg("C"), py::arg("nrg"), py::arg("ncg"), py::arg("w"),
      py::arg("g"), py::arg("dw"),
      "Bytes of workspace the deterministic backward needs for these tensors.");
  m.def(
      "superpose_backward_cuda",
      [](int dtype, int64_t R, int64_t C, int64_t nrg, int64_t ncg, uintptr_t w, uintptr_t g,
         uintptr_t dw, uintptr_t t, uintptr_t p, uintptr_t rowgrp, uintptr_t colgrp,
         uintptr_t workspace, int64_t workspace_bytes, int deterministic, uintptr_t stream) {
        auto a = cuda_args(dtype, R, C, nrg, ncg, w, g, dw, t, p, rowgrp, colgrp, workspace,
                           workspace_bytes, deterministic);
        check_tables(a);
        if (!p) throw std::invalid_argument("tangle_kernels._C: null pointer for P");
        if (R * C > 0 && !g) throw std::invalid_argument("tangle_kernels._C: null pointer for G");
        if (deterministic && workspace_bytes < superpose_backward_cuda_workspace(a))
          throw std::invalid_argument("tangle_kernels._C: workspace too small");
        py::gil_scoped_release nogil;
        superpose_backward_cuda(a, stream);
      },
      py::arg("dtype"), py::arg("R"), py::arg("C"), py::arg("nrg"), py::arg("ncg"), py::arg("w"),
      py::arg("g"), py::arg("dw"), py::arg("t"), py::arg("p"), py::arg("rowgrp"),
      py::arg("colgrp"), py::arg("workspace"), py::arg("workspace_bytes"),
      py::arg("deterministic"), py::arg("stream"));
}

}  // namespace tangle

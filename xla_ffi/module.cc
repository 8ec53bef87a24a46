// pybind11 module jint4._jint4_native: one PyCapsule per FFI handler, for
// jax.ffi.register_ffi_target (see jint4/kernels/native.py).
#include <pybind11/pybind11.h>

#include "xla/ffi/api/c_api.h"
#include "cpu/handlers.h"
#if defined(JINT4_WITH_CUDA)
#include "cuda/handlers.h"
#endif

namespace py = pybind11;

namespace {

template <typename Fn>
py::capsule Capsule(Fn* fn) {
  return py::capsule(reinterpret_cast<void*>(fn));
}

py::dict CpuTargets() {
  py::dict d;
  d["jint4_hadamard_quantize"] = Capsule(jint4_cpu_hadamard_quantize);
  d["jint4_hadamard_quantize_weight"] = Capsule(jint4_cpu_hadamard_quantize_weight);
  d["jint4_residual_values"] = Capsule(jint4_cpu_residual_values);
  d["jint4_lsq_backward"] = Capsule(jint4_cpu_lsq_backward);
  d["jint4_lsq_weight_backward"] = Capsule(jint4_cpu_lsq_weight_backward);
  d["jint4_bit_split"] = Capsule(jint4_cpu_bit_split);
  d["jint4_int_gemm"] = Capsule(jint4_cpu_int_gemm);
  d["jint4_bit_split_joined"] = Capsule(jint4_cpu_bit_split_joined);
  d["jint4_resplit_rows"] = Capsule(jint4_cpu_resplit_rows);
  return d;
}

py::dict CudaTargets() {
  py::dict d;
#if defined(JINT4_WITH_CUDA)
  d["jint4_hadamard_quantize"] = Capsule(jint4_cuda_hadamard_quantize);
  d["jint4_hadamard_quantize_weight"] = Capsule(jint4_cuda_hadamard_quantize_weight);
  d["jint4_residual_values"] = Capsule(jint4_cuda_residual_values);
  d["jint4_lsq_backward"] = Capsule(jint4_cuda_lsq_backward);
  d["jint4_lsq_weight_backward"] = Capsule(jint4_cuda_lsq_weight_backward);
  d["jint4_bit_split"] = Capsule(jint4_cuda_bit_split);
  d["jint4_int_gemm"] = Capsule(jint4_cuda_int_gemm);
  d["jint4_bit_split_joined"] = Capsule(jint4_cuda_bit_split_joined);
  d["jint4_resplit_rows"] = Capsule(jint4_cuda_resplit_rows);
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_jint4_native, m) {
  m.doc() = "jint4 native engine: XLA FFI handlers (CPU, and CUDA when built).";
  m.def("cpu_targets", &CpuTargets, "FFI target name -> handler capsule (CPU).");
  m.def("cuda_targets", &CudaTargets, "FFI target name -> handler capsule (CUDA).");
  m.attr("ffi_api_version") = py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
#if defined(JINT4_WITH_CUDA)
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = JINT4_CUDA_ARCHS_STRING;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
}

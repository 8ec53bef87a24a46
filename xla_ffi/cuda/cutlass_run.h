// The CUTLASS launch sequence shared by the sm_80 and sm_90a GEMMs:
// can_implement (a refusal means "fall back", not an error), workspace from
// the handler's scratch, initialize, run, and the launch error check. Only
// the CUTLASS translation units include this header.
#ifndef JINT4_XLA_FFI_CUDA_CUTLASS_RUN_H_
#define JINT4_XLA_FFI_CUDA_CUTLASS_RUN_H_

#include <cuda_runtime.h>

#include <string>

#include "cutlass/cutlass.h"
#include "gemm_kernels.h"

namespace jint4 {
namespace cuda {

template <class GemmOp>
GemmStatus RunCutlassGemm(const typename GemmOp::Arguments& args, const ScratchFn& scratch,
                          cudaStream_t stream, const char* name, std::string* message) {
  cutlass::Status st = GemmOp::can_implement(args);
  if (st != cutlass::Status::kSuccess) {
    *message = std::string(name) + " can_implement: " + cutlassGetStatusString(st);
    return GemmStatus::kUnsupported;
  }
  const size_t ws_bytes = GemmOp::get_workspace_size(args);
  void* ws = nullptr;
  if (ws_bytes > 0) {
    ws = scratch(ws_bytes);
    if (ws == nullptr) {
      *message = std::string(name) + ": workspace allocation failed";
      return GemmStatus::kError;
    }
  }
  GemmOp gemm;
  st = gemm.initialize(args, ws, stream);
  if (st != cutlass::Status::kSuccess) {
    *message = std::string(name) + " initialize: " + cutlassGetStatusString(st);
    return GemmStatus::kError;
  }
  st = gemm.run(stream);
  const cudaError_t err = cudaGetLastError();
  if (st != cutlass::Status::kSuccess || err != cudaSuccess) {
    *message = std::string(name) + " run: " + cutlassGetStatusString(st) + " (" +
               cudaGetErrorString(err) + ")";
    return GemmStatus::kError;
  }
  return GemmStatus::kOk;
}

}  // namespace cuda
}  // namespace jint4

#endif  // JINT4_XLA_FFI_CUDA_CUTLASS_RUN_H_

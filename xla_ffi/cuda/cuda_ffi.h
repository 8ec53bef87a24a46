// FFI-facing helpers of jint4's CUDA handlers: error conversion and scratch
// allocation. Only the handler translation units include this header.
#ifndef JINT4_XLA_FFI_CUDA_CUDA_FFI_H_
#define JINT4_XLA_FFI_CUDA_CUDA_FFI_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "xla/ffi/api/ffi.h"
#include "../common/ffi_util.h"
#include "cuda_common.h"

namespace jint4 {
namespace cuda {

namespace ffi = ::xla::ffi;

inline ffi::Error CudaErrorToFfi(const char* what, cudaError_t err) {
  return ffi::Error::Internal(LaunchErrorMessage(what, err));
}

// After one or more kernel launches: cudaGetLastError -> ffi::Error::Internal.
inline ffi::Error CheckLaunch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return CudaErrorToFfi(what, err);
  return ffi::Error::Success();
}

inline ffi::Error CheckCuda(const char* what, cudaError_t err) {
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear a non-sticky error
    return CudaErrorToFfi(what, err);
  }
  return ffi::Error::Success();
}

inline ffi::Error InvalidArgument(const std::string& msg) {
  return ffi::Error::InvalidArgument("jint4 CUDA: " + msg);
}

// The integer grid [-qn, qp] of the codes: the CPU handlers' check
// (ffi_util::CheckQuantRange), with this file's "jint4 CUDA: " prefix.
inline ffi::Error CheckQuantRange(int32_t qn, int32_t qp, const std::string& op) {
  return ffi_util::CheckQuantRange(qn, qp, ("jint4 CUDA: " + op).c_str());
}

// Scratch device memory for the duration of the handler (stream-ordered use
// only). 16-byte aligned: XLA rejects any alignment above 16 ("Unsupported
// alignment"); 16 is what TMA needs (XLA's GPU allocator gives 256 in
// practice). Size 0 gives a null pointer and succeeds.
inline bool AllocateScratch(ffi::ScratchAllocator& scratch, size_t bytes,
                            void** ptr) {
  *ptr = nullptr;
  if (bytes == 0) return true;
  std::optional<void*> p = scratch.Allocate(bytes, 16);
  if (!p.has_value() || *p == nullptr) return false;
  *ptr = *p;
  return true;
}

inline ffi::Error ScratchError(size_t bytes) {
  return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                    "jint4 CUDA: failed to allocate " + std::to_string(bytes) +
                        " bytes of scratch memory");
}

inline int64_t Dim(ffi::AnyBuffer::Dimensions dims, size_t i) {
  return i < dims.size() ? dims[i] : int64_t{1};
}

}  // namespace cuda
}  // namespace jint4

#endif  // JINT4_XLA_FFI_CUDA_CUDA_FFI_H_

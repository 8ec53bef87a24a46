// Interface between the GEMM dispatcher (gemm.cu, FFI handlers) and the
// CUTLASS translation units (gemm_sm90.cu, gemm_sm80.cu). No FFI types here.
#ifndef JINT4_XLA_FFI_CUDA_GEMM_KERNELS_H_
#define JINT4_XLA_FFI_CUDA_GEMM_KERNELS_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace jint4 {
namespace cuda {

enum class GemmStatus {
  kOk = 0,
  kUnsupported = 1,  // CUTLASS rejected the problem (can_implement): fall back
  kError = 2,        // launch / runtime failure: report
};

// Scratch allocation callback (returns nullptr on failure; 16-byte aligned).
using ScratchFn = std::function<void*(size_t bytes)>;

// sm_90a CUTLASS 3.x INT8 x INT8 -> INT32 TN GEMM with the fused epilogue
//   out[m, n] = (float(sum_k a[m, k] b[n, k]) * (*scale)) * row_scale[m]
// (row_scale == nullptr: the factor is 1, i.e. skipped exactly).
// Requirements (the caller pads otherwise): K % 16 == 0, a/b 16-byte aligned
// with leading dimension K; out 16-byte aligned, ldo * sizeof(out) % 16 == 0.
struct Sm90GemmArgs {
  const int8_t* a = nullptr;  // [M, K] row-major
  const int8_t* b = nullptr;  // [N, K] row-major
  int M = 0, N = 0, K = 0;
  const float* scale = nullptr;      // device scalar
  const float* row_scale = nullptr;  // device [M], or nullptr
  const float* col_bias = nullptr;   // device [N], or nullptr
  void* out = nullptr;               // [M, ldo] f32 or bf16
  int64_t ldo = 0;
  bool out_bf16 = false;
  int device = 0;
  int sm_count = 0;
};

// True when this build holds the sm_90a kernels (gemm_sm90.cu compiled with
// CUTLASS 3 support).
bool Sm90GemmAvailable();
GemmStatus Sm90Gemm(const Sm90GemmArgs& args, const ScratchFn& scratch,
                    cudaStream_t stream, std::string* message);

// sm_80 CUTLASS 2.x INT4 tensor-core GEMM (int4b_t, m16n8k64):
//   d[m, n] = (*alpha) * float(sum_k a[m, k] b[n, k])
// a4: [M, K] packed int4 (two per byte, low nibble first), b4: [N, K] likewise;
// K % 32 == 0; d: f32 [M, ldd], ldd % 4 == 0; all 16-byte aligned.
struct Sm80Int4GemmArgs {
  const void* a4 = nullptr;
  const void* b4 = nullptr;
  int M = 0, N = 0, K = 0;
  const float* alpha = nullptr;  // device scalar
  float* d = nullptr;
  int64_t ldd = 0;
};

GemmStatus Sm80Int4Gemm(const Sm80Int4GemmArgs& args, const ScratchFn& scratch,
                        cudaStream_t stream, std::string* message);

}  // namespace cuda
}  // namespace jint4

#endif  // JINT4_XLA_FFI_CUDA_GEMM_KERNELS_H_

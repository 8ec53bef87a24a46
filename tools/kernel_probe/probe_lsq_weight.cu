// Probe of jint4_lsq_weight_backward (xla_ffi/cuda/lsq_weight_backward.cu):
// the kernel's STE mask, step-size gradient and Hadamard^T.
#include "../../xla_ffi/cuda/lsq_weight_backward.cu"
#include "probe.h"

#include <string>

namespace probe {

void RunLsqWeightBackward(const Shape& s) {
  const int64_t D = s.D, C = s.C;
  const int32_t qn = 7, qp = 7;
  int32_t log2_h = 5;
  float step_h = 0.001f;
  void* log2 = DevAlloc(4);
  void* step = DevAlloc(4);
  cudaMemcpy(log2, &log2_h, 4, cudaMemcpyHostToDevice);
  cudaMemcpy(step, &step_h, 4, cudaMemcpyHostToDevice);
  Buf log2_b(ffi::DataType::S32, {}, log2);
  Buf step_b(ffi::DataType::F32, {}, step);
  // Kernel in bf16 (what a bf16-compute model passes) with a bf16 grad (the
  // dW GEMM's output for it) and an f32 one; kernel and grad in f32.
  for (int variant = 0; variant < 3; ++variant) {
    const bool bf16 = variant < 2;
    const bool grad16 = variant == 0;
    const ffi::DataType t = bf16 ? ffi::DataType::BF16 : ffi::DataType::F32;
    const int64_t es = bf16 ? 2 : 4;
    const int64_t gs = grad16 ? 2 : 4;
    Buf grad(grad16 ? ffi::DataType::BF16 : ffi::DataType::F32, {D, C},
             grad16 ? RandomBf16(D * C, 7, 1.0f) : RandomF32(D * C, 7, 1.0f));
    Buf k(t, {D, C}, bf16 ? RandomBf16(D * C, 8, 0.02f) : RandomF32(D * C, 8, 0.02f));
    Buf dk(t, {D, C}, DevAlloc(es * D * C));
    Buf dsum(ffi::DataType::F32, {}, DevAlloc(4));
    const std::string name = std::string("lsq weight backward ") + (bf16 ? "bf16" : "f32") +
                             " [D,C] grad " + (grad16 ? "bf16" : "f32");
    Time(name.c_str(), D * C * (gs + 2.0 * es), [&] {
      FfiCheck(jint4::cuda::LsqWeightBackwardImpl(0, grad.any(), k.any(), step_b.any(),
                                                  log2_b.any(), dk.out(), dsum.out(), qn, qp, 5),
               "lsq weight backward");
    });
  }
}

}  // namespace probe

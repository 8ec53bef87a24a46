// Probe of jint4_lsq_backward, jint4_residual_values and
// jint4_lsq_weight_backward (xla_ffi/cuda/lsq.cu). The residual is random
// bytes (the decode does the same work for any content).
#include "../../xla_ffi/cuda/lsq.cu"
#include "probe.h"

#include <string>

namespace probe {

void RunLsq(const Shape& s) {
  const int64_t N = s.N, D = s.D, C = s.C;
  const int32_t qn = 7, qp = 7;
  int32_t log2_h = 5;
  float step_h = 0.001f;
  void* log2 = DevAlloc(4);
  void* step = DevAlloc(4);
  cudaMemcpy(log2, &log2_h, 4, cudaMemcpyHostToDevice);
  cudaMemcpy(step, &step_h, 4, cudaMemcpyHostToDevice);
  Buf log2_b(XLA_FFI_DataType_S32, {}, log2);
  Buf step_b(XLA_FFI_DataType_F32, {}, step);
  const int64_t total = N * D;
  Buf nib(XLA_FFI_DataType_U8, {(total + 1) / 2}, RandomF32((total + 1) / 8 + 1, 4, 1.0f));
  Buf flg(XLA_FFI_DataType_U8, {1, (total + 7) / 8}, RandomF32((total + 7) / 32 + 1, 5, 1.0f));
  Buf rows0(XLA_FFI_DataType_S32, {0}, nullptr);
  Buf slots0(XLA_FFI_DataType_S32, {2, 0}, nullptr);
  {
    Buf qt(XLA_FFI_DataType_S8, {D, N}, DevAlloc(total));
    Time("decode x^T [D,N]", total * (1.0 + 0.625), [&] {
      FfiCheck(jint4::cuda::ResidualValuesImpl(0, nib.any(), flg.any(), rows0.any(), qt.out(), qn,
                                               qp, static_cast<int32_t>(N), 0, 1),
               "decode t");
    });
  }
  {
    Buf grad(XLA_FFI_DataType_BF16, {N, D}, RandomBf16(total, 6, 1.0f));
    Buf dt(XLA_FFI_DataType_BF16, {N, D}, DevAlloc(2 * total));
    Buf dsum(XLA_FFI_DataType_F32, {}, DevAlloc(4));
    Time("lsq backward bf16 [N,D]", total * (2.0 + 2.0 + 0.625), [&] {
      FfiCheck(jint4::cuda::LsqBackwardImpl(0, grad.any(), nib.any(), flg.any(), slots0.any(),
                                            log2_b.any(), dt.out(), dsum.out(), qn, qp, 0),
               "lsq backward");
    });
  }
  // Kernel in bf16 (what a bf16-compute model passes) with a bf16 grad (the
  // dW GEMM's output for it) and an f32 one; kernel and grad in f32.
  for (int variant = 0; variant < 3; ++variant) {
    const bool bf16 = variant < 2;
    const bool grad16 = variant == 0;
    const XLA_FFI_DataType t = bf16 ? XLA_FFI_DataType_BF16 : XLA_FFI_DataType_F32;
    const int64_t es = bf16 ? 2 : 4;
    const int64_t gs = grad16 ? 2 : 4;
    Buf grad(grad16 ? XLA_FFI_DataType_BF16 : XLA_FFI_DataType_F32, {D, C},
             grad16 ? RandomBf16(D * C, 7, 1.0f) : RandomF32(D * C, 7, 1.0f));
    Buf k(t, {D, C}, bf16 ? RandomBf16(D * C, 8, 0.02f) : RandomF32(D * C, 8, 0.02f));
    Buf dk(t, {D, C}, DevAlloc(es * D * C));
    Buf dsum(XLA_FFI_DataType_F32, {}, DevAlloc(4));
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

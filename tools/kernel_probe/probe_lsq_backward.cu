// Probe of jint4_lsq_backward (xla_ffi/cuda/lsq_backward.cu): the activation
// gradient's STE mask, step-size gradient and Hadamard^T. The residual is
// random bytes (the decode does the same work for any content).
#include "../../xla_ffi/cuda/lsq_backward.cu"
#include "probe.h"

namespace probe {

void RunLsqBackward(const Shape& s) {
  const int64_t N = s.N, D = s.D;
  const int32_t qn = 7, qp = 7;
  int32_t log2_h = 5;
  void* log2 = DevAlloc(4);
  cudaMemcpy(log2, &log2_h, 4, cudaMemcpyHostToDevice);
  Buf log2_b(ffi::DataType::S32, {}, log2);
  const int64_t total = N * D;
  Buf nib(ffi::DataType::U8, {(total + 1) / 2}, RandomF32((total + 1) / 8 + 1, 4, 1.0f));
  Buf flg(ffi::DataType::U8, {1, (total + 7) / 8}, RandomF32((total + 7) / 32 + 1, 5, 1.0f));
  Buf slots0(ffi::DataType::S32, {2, 0}, nullptr);
  Buf grad(ffi::DataType::BF16, {N, D}, RandomBf16(total, 6, 1.0f));
  Buf dt(ffi::DataType::BF16, {N, D}, DevAlloc(2 * total));
  Buf dsum(ffi::DataType::F32, {}, DevAlloc(4));
  Time("lsq backward bf16 [N,D]", total * (2.0 + 2.0 + 0.625), [&] {
    FfiCheck(jint4::cuda::LsqBackwardImpl(0, grad.any(), nib.any(), flg.any(), slots0.any(),
                                          log2_b.any(), dt.out(), dsum.out(), qn, qp, 0),
             "lsq backward");
  });
}

}  // namespace probe

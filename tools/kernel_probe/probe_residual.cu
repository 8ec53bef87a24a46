// Probe of jint4_residual_values (xla_ffi/cuda/residual_values.cu): the
// transposed decode of a saved activation, as the dW GEMM's operand. The
// residual is random bytes (the decode does the same work for any content).
#include "../../xla_ffi/cuda/residual_values.cu"
#include "probe.h"

namespace probe {

void RunResidualValues(const Shape& s) {
  const int64_t N = s.N, D = s.D;
  const int32_t qn = 7, qp = 7;
  const int64_t total = N * D;
  Buf nib(ffi::DataType::U8, {(total + 1) / 2}, RandomF32((total + 1) / 8 + 1, 4, 1.0f));
  Buf flg(ffi::DataType::U8, {1, (total + 7) / 8}, RandomF32((total + 7) / 32 + 1, 5, 1.0f));
  Buf rows0(ffi::DataType::S32, {0}, nullptr);
  Buf qt(ffi::DataType::S8, {D, N}, DevAlloc(total));
  Time("decode x^T [D,N]", total * (1.0 + 0.625), [&] {
    FfiCheck(jint4::cuda::ResidualValuesImpl(0, nib.any(), flg.any(), rows0.any(), qt.out(), qn,
                                             qp, static_cast<int32_t>(N), 0, 1),
             "decode t");
  });
}

}  // namespace probe

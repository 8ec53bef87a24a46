// Probe of jint4_bit_split_joined (xla_ffi/cuda/bitsplit.cu).
#include "../../xla_ffi/cuda/bitsplit.cu"
#include "probe.h"

namespace probe {

void RunBitSplit(const Shape& s) {
  const int64_t N = s.N, C = s.C;
  uint32_t seed_h[2] = {99u, 7u};
  void* seed = DevAlloc(8);
  cudaMemcpy(seed, seed_h, 8, cudaMemcpyHostToDevice);
  Buf seed_b(XLA_FFI_DataType_U32, {2}, seed);
  Buf g(XLA_FFI_DataType_BF16, {N, C}, RandomBf16(N * C, 3, 1e-3f));
  Buf v(XLA_FFI_DataType_S8, {N, C}, DevAlloc(N * C));
  Buf vt(XLA_FFI_DataType_S8, {C, N}, DevAlloc(N * C));
  Buf scales(XLA_FFI_DataType_F32, {2}, DevAlloc(8));
  // Two reads of g (max pass, split pass) and two int8 writes.
  Time("split joined bf16 [N,C] (v, vt)", N * C * (2.0 + 2.0 + 2.0), [&] {
    FfiCheck(jint4::cuda::BitSplitJoinedImpl(0, Scratch(), g.any(), seed_b.any(), v.out(),
                                             vt.out(), scales.out()),
             "split joined");
  });
}

}  // namespace probe

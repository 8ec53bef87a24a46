// Probe of jint4_bit_split_joined (xla_ffi/cuda/bitsplit.cu).
#include "../../xla_ffi/cuda/bitsplit.cu"
#include "probe.h"

namespace probe {

void RunBitSplit(const Shape& s) {
  const int64_t N = s.N, C = s.C;
  uint32_t seed_h[2] = {99u, 7u};
  void* seed = DevAlloc(8);
  cudaMemcpy(seed, seed_h, 8, cudaMemcpyHostToDevice);
  Buf seed_b(ffi::DataType::U32, {2}, seed);
  Buf g(ffi::DataType::BF16, {N, C}, RandomBf16(N * C, 3, 1e-3f));
  Buf v(ffi::DataType::S8, {N, C}, DevAlloc(N * C));
  Buf vt(ffi::DataType::S8, {C, N}, DevAlloc(N * C));
  Buf scales(ffi::DataType::F32, {2}, DevAlloc(8));
  // abs_max f32[0]: the handler computes max|g| itself (a second read of g).
  Buf no_max(ffi::DataType::F32, {0}, nullptr);
  Time("split joined bf16 [N,C] (v, vt)", N * C * (2.0 + 2.0 + 2.0), [&] {
    FfiCheck(jint4::cuda::BitSplitJoinedImpl(0, Scratch(), g.any(), seed_b.any(), no_max.any(),
                                             v.out(), vt.out(), scales.out()),
             "split joined");
  });
  // abs_max f32[]: the caller's max|g| (RandomBf16's bound), one read of g.
  const float max_h = 1e-3f;
  void* max_d = DevAlloc(4);
  cudaMemcpy(max_d, &max_h, 4, cudaMemcpyHostToDevice);
  Buf given_max(ffi::DataType::F32, {}, max_d);
  Time("split joined bf16, max given", N * C * (2.0 + 2.0), [&] {
    FfiCheck(jint4::cuda::BitSplitJoinedImpl(0, Scratch(), g.any(), seed_b.any(),
                                             given_max.any(), v.out(), vt.out(), scales.out()),
             "split joined, max given");
  });
}

}  // namespace probe

// Probe of jint4_hadamard_quantize (xla_ffi/cuda/quantize.cu).
#include "../../xla_ffi/cuda/quantize.cu"
#include "probe.h"

namespace probe {

void RunQuantize(const Shape& s) {
  const int64_t N = s.N, D = s.D, C = s.C;
  const int32_t qn = 7, qp = 7;
  // Steps that put the quantized values at a few steps' spread, as trained.
  float step_h = 0.6f, wstep_h = 0.005f;
  int32_t log2_h = 5;
  uint32_t seed_h[2] = {1234u, 5678u};
  void* step = DevAlloc(4);
  void* wstep = DevAlloc(4);
  void* log2 = DevAlloc(4);
  void* seed = DevAlloc(8);
  cudaMemcpy(step, &step_h, 4, cudaMemcpyHostToDevice);
  cudaMemcpy(wstep, &wstep_h, 4, cudaMemcpyHostToDevice);
  cudaMemcpy(log2, &log2_h, 4, cudaMemcpyHostToDevice);
  cudaMemcpy(seed, seed_h, 8, cudaMemcpyHostToDevice);
  Buf step_b(ffi::DataType::F32, {}, step);
  Buf wstep_b(ffi::DataType::F32, {}, wstep);
  Buf log2_b(ffi::DataType::S32, {}, log2);
  Buf seed_b(ffi::DataType::U32, {2}, seed);

  // Activations: x bf16 [N, D] with the residual.
  {
    Buf x(ffi::DataType::BF16, {N, D}, RandomBf16(N * D, 1, 3.0f));
    Buf q(ffi::DataType::S8, {N, D}, DevAlloc(N * D));
    Buf nib(ffi::DataType::U8, {(N * D + 1) / 2}, DevAlloc((N * D + 1) / 2));
    Buf flg(ffi::DataType::U8, {1, (N * D + 7) / 8}, DevAlloc((N * D + 7) / 8));
    Buf norms(ffi::DataType::F32, {N}, DevAlloc(4 * N));
    const double bytes = N * D * (2.0 + 1.0 + 0.5 + 0.125);
    Time("hq x bf16 [N,D] +residual", bytes, [&] {
      FfiCheck(jint4::cuda::HadamardQuantizeImpl(0, Scratch(), x.any(), step_b.any(), seed_b.any(),
                                                 log2_b.any(), q.out(), nib.out(), flg.out(),
                                                 norms.out(), qn, qp, 1, 1, 0, 5),
               "hq x");
    });
    Buf nib0(ffi::DataType::U8, {0}, nullptr);
    Buf flg0(ffi::DataType::U8, {1, 0}, nullptr);
    Buf norms0(ffi::DataType::F32, {0}, nullptr);
    Time("hq x bf16 [N,D] no residual", N * D * 3.0, [&] {
      FfiCheck(jint4::cuda::HadamardQuantizeImpl(0, Scratch(), x.any(), step_b.any(), seed_b.any(),
                                                 log2_b.any(), q.out(), nib0.out(), flg0.out(),
                                                 norms0.out(), qn, qp, 0, 1, 0, 5),
               "hq x nores");
    });
  }
  // Weights: kernel [D, C] (f32 and bf16), Hadamard down the columns,
  // written [C, D] (forward) or [D, C] (backward).
  for (int bf16 = 0; bf16 < 2; ++bf16) {
    const ffi::DataType t = bf16 ? ffi::DataType::BF16 : ffi::DataType::F32;
    Buf k(t, {D, C}, bf16 ? RandomBf16(D * C, 2, 0.02f) : RandomF32(D * C, 2, 0.02f));
    Buf qt(ffi::DataType::S8, {C, D}, DevAlloc(D * C));
    Buf q(ffi::DataType::S8, {D, C}, DevAlloc(D * C));
    Buf nib0(ffi::DataType::U8, {0}, nullptr);
    Buf flg0(ffi::DataType::U8, {1, 0}, nullptr);
    Buf norms0(ffi::DataType::F32, {0}, nullptr);
    Buf col_poison(ffi::DataType::F32, {C}, DevAlloc(4 * C));
    const double bytes = D * C * ((bf16 ? 2.0 : 4.0) + 1.0);
    for (int transpose = 1; transpose >= 0; --transpose) {
      const std::string name = std::string("hq w ") + (bf16 ? "bf16" : "f32") +
                               (transpose ? " [D,C] -> [C,D]" : " [D,C] -> [D,C]");
      const Buf& out = transpose ? qt : q;
      Time(name.c_str(), bytes, [&] {
        FfiCheck(jint4::cuda::HadamardQuantizeImpl(0, Scratch(), k.any(), wstep_b.any(),
                                                   seed_b.any(), log2_b.any(), out.out(),
                                                   nib0.out(), flg0.out(), norms0.out(), qn, qp,
                                                   0, 0, transpose, 5),
                 "hq w");
      });
    }
    // Both layouts in one pass (the forward's jint4_hadamard_quantize_weight).
    Time((std::string("hq w ") + (bf16 ? "bf16" : "f32") + " [D,C] -> both").c_str(),
         D * C * ((bf16 ? 2.0 : 4.0) + 2.0), [&] {
           FfiCheck(jint4::cuda::HadamardQuantizeWeightImpl(0, k.any(), wstep_b.any(),
                                                            log2_b.any(), qt.out(), q.out(),
                                                            col_poison.out(), qn, qp, 5),
                    "hq w both");
         });
  }
}

}  // namespace probe

// The math of jint4's CPU handlers as plain functions on pointers and sizes
// (no FFI types), so the handlers in handlers.cc are thin adapters and these
// can be tested on their own. Semantics: the op contract in xla_ffi/README.md
// and its oracle jint4/kernels/reference.py. All arrays are row-major and
// dense; callers validate shapes and attributes beforehand (ffi_util.h).
//
// Single-threaded, plain C++17. Build with IEEE float semantics
// (-ffp-contract=off, no -ffast-math): the integer outputs are bit-identical
// to the reference only then.
#ifndef JINT4_XLA_FFI_CPU_KERNELS_H_
#define JINT4_XLA_FFI_CPU_KERNELS_H_

#include <cstdint>

namespace jint4 {
namespace cpu {

// jint4_hadamard_quantize on x[m, k]: per row, the block-diagonal Hadamard
// transform (blocks of 2^log2_block, which must divide k), v = xh / step,
// q = QuantizeCode(v). If `nibbles` and `flags` are both non-null, also
// writes the packed residual of EncodeBackwardState(v, Uniform(seed, i)):
// nibbles[ceil(m*k/2)] and flags[planes][ceil(m*k/8)] (planes = 1 if
// qn <= 7 else 2), padding bits zero.
void HadamardQuantize(const float* x, int64_t m, int64_t k, float step,
                      uint32_t seed0, uint32_t seed1, int log2_block, int qn,
                      int qp, int8_t* q, uint8_t* nibbles, uint8_t* flags);

// jint4_residual_values: q[n] = DecodeBackwardState(code_i, flags_i).q for
// the n elements of a packed residual.
void ResidualValues(const uint8_t* nibbles, const uint8_t* flags, int64_t n,
                    int qn, int qp, int8_t* q);

// jint4_lsq_backward: dt[i] = inside_i ? grad[i] : 0; returns
// sum_i grad[i] * delta_hat_i (products in float32, summed in double).
float LsqBackward(const float* grad, const uint8_t* nibbles,
                  const uint8_t* flags, int64_t n, int qn, int qp, float* dt);

// jint4_bit_split on g[r, c]: hi, lo [r, c]; scales[2] = {s_hi, s_lo};
// hi_norm[r] = s_hi * sqrt(sum_j hi[i, j]^2), lo_norm likewise.
void BitSplit(const float* g, int64_t r, int64_t c, uint32_t seed0,
              uint32_t seed1, int8_t* hi, int8_t* lo, float* scales,
              float* hi_norm, float* lo_norm);

// out[m, n] = sum_k a[m, k] b[n, k] in int32 (wrapping on overflow, as XLA).
void IntGemmS32(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                int64_t k, int32_t* out);

// jint4_int_gemm: out[i, j] = ((float)acc[i, j] * scale) * row_scale[i],
// stored as float32 (IntGemmF32) or as bfloat16 bits (IntGemmBF16,
// round-to-nearest-even, NaN stays NaN).
void IntGemmF32(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                int64_t k, float scale, const float* row_scale, float* out);
void IntGemmBF16(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                 int64_t k, float scale, const float* row_scale,
                 uint16_t* out);

// out[i, j] = sum_t a[t, i] b[rows[t], j] in int32 over t < r, for a[r, m],
// b[*, n] and rows[r] (each in range; the caller checks).
void IntGemmGatherRowsS32(const int8_t* a, const int8_t* b,
                          const int32_t* rows, int64_t r, int64_t m, int64_t n,
                          int32_t* out);

// jint4_int_gemm_gather_rows: out = (float)IntGemmGatherRowsS32(...) * scale.
void IntGemmGatherRowsF32(const int8_t* a, const int8_t* b,
                          const int32_t* rows, int64_t r, int64_t m, int64_t n,
                          float scale, float* out);

// float32 -> bfloat16 bits, round-to-nearest-even; NaN -> the canonical
// quiet NaN 0x7FC0 / 0xFFC0 of the same sign (bit-identical to XLA's convert).
uint16_t FloatToBF16Bits(float v);

}  // namespace cpu
}  // namespace jint4

#endif  // JINT4_XLA_FFI_CPU_KERNELS_H_

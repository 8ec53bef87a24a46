// Exact 16-bit float loads and round-to-nearest-even stores, shared by the
// CPU and CUDA handlers ("float" operands of the op contract are f32, bf16 or
// f16, converted to f32 on load; float results are rounded from f32).
//
// Pure integer bit manipulation plus exact float products, so host and device
// agree bit for bit with XLA's converts (jnp's astype): bf16 -> f32 is a
// 16-bit shift, f16 -> f32 is exact; f32 -> bf16 / f16 round to nearest even,
// overflow to Inf, NaN stays a quiet NaN of the same sign.
#ifndef JINT4_XLA_FFI_COMMON_FLOAT_CONVERT_H_
#define JINT4_XLA_FFI_COMMON_FLOAT_CONVERT_H_

#include <cstdint>
#include <cstring>

#include "jint4_math.h"  // JINT4_HD, RoundEven, FloatBits, BitsToFloat

namespace jint4 {

// bfloat16 bits -> float32 (exact: the upper half of the float32).
JINT4_HD float BF16BitsToFloat(uint16_t h) {
  return BitsToFloat(static_cast<uint32_t>(h) << 16);
}

// IEEE binary16 bits -> float32 (exact; subnormals, Inf and NaN included).
JINT4_HD float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t exp = (static_cast<uint32_t>(h) >> 10) & 0x1Fu;
  const uint32_t mant = static_cast<uint32_t>(h) & 0x3FFu;
  if (exp == 0x1Fu) return BitsToFloat(sign | 0x7F800000u | (mant << 13));
  if (exp != 0u) return BitsToFloat(sign | ((exp + 112u) << 23) | (mant << 13));
  // Zero or subnormal: mant * 2^-24, a normal (or zero) float32, exact.
  const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
  return BitsToFloat(FloatBits(v) | sign);
}

// float32 -> bfloat16 bits, round to nearest even; NaN -> the canonical quiet
// NaN 0x7FC0 / 0xFFC0 of the same sign (as XLA / ml_dtypes).
JINT4_HD uint16_t FloatToBF16Bits(float v) {
  uint32_t bits = FloatBits(v);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    return static_cast<uint16_t>(((bits >> 16) & 0x8000u) | 0x7FC0u);
  }
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// float32 -> IEEE binary16 bits, round to nearest even (subnormal halves
// included), |v| >= 65520 -> Inf; NaN -> a quiet NaN keeping the sign and the
// top payload bits (as the x86 / PTX conversions).
JINT4_HD uint16_t FloatToHalfBits(float v) {
  const uint32_t bits = FloatBits(v);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t a = bits & 0x7FFFFFFFu;
  if (a > 0x7F800000u) {  // NaN
    return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
  }
  if (a >= 0x47800000u) {  // >= 2^16 (Inf included): overflow
    return static_cast<uint16_t>(sign | 0x7C00u);
  }
  if (a >= 0x38800000u) {  // >= 2^-14: a normal half (or a carry to Inf)
    uint32_t h = (((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3FFu);
    const uint32_t rest = a & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry
    return static_cast<uint16_t>(sign | h);
  }
  // Below the smallest normal half: the nearest multiple of 2^-24 (scaling by
  // 2^24 is exact; 1024 = 0x400 is the smallest normal half, as it should be).
  const float scaled = BitsToFloat(a) * 16777216.0f;
  return static_cast<uint16_t>(sign | static_cast<uint32_t>(RoundEven(scaled)));
}

}  // namespace jint4

#endif  // JINT4_XLA_FFI_COMMON_FLOAT_CONVERT_H_

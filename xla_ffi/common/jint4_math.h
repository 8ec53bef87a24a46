// Scalar math shared by jint4's CPU and CUDA handlers.
//
// Each function mirrors one step of the pure-JAX reference engine
// (jint4/kernels/reference.py and jint4/quant/*.py) operation for operation, so
// that the integer outputs (quantized codes, bit-split halves, packed
// residuals) are bit-identical to the reference. Rules that keep it so:
//   * float32 throughout, IEEE rounding (no fast-math);
//   * the same operation order as the reference (comments give its line);
//   * NaN handled explicitly (fmin/fmax would silently drop it).
// The contract is chosen to be cheap per element on a GPU: the Hadamard runs
// as +-1 butterflies with one scale at the end (HadamardScale), the LSQ
// divide is one multiply by a per-tensor factor (QuantFactor), and one hash,
// built from wide multiplies, gives the noise of two neighbouring elements
// (Uniform). The butterflies of a block of 2^L run on the input times
// Pow2(-L) and their result is multiplied by Pow2(L) last, so that their
// sums (up to 2^L times the largest input) stay finite for every finite
// input: one exact multiply per element on load and one at the end,
//   LSQ:      v  = (H+-(x * Pow2(-L)) * QuantFactor(L, step)) * Pow2(L)
//   gradient: dt = (H+-(g * Pow2(-L)) * HadamardScale(L)) * Pow2(L)
// (reference.py `hadamard_prescale`). Where no intermediate overflows or
// goes subnormal, this is the float of the unscaled form (scaling by a power
// of two commutes with rounding).
#ifndef JINT4_XLA_FFI_COMMON_JINT4_MATH_H_
#define JINT4_XLA_FFI_COMMON_JINT4_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define JINT4_HD __host__ __device__ __forceinline__
#else
#define JINT4_HD inline
#endif

namespace jint4 {

// float32(1 / sqrt(2)): the orthonormal Hadamard's factor per stage.
constexpr float kInvSqrt2 = 0.70710678118654752440f;
// Bit splitting: t = G * (98 / max|G|), hi = round(t / 14), lo = t - 14 hi.
constexpr float kSplitRange = 98.0f;
constexpr float kSplitStep = 14.0f;
// float32 reciprocals, as bitsplit.py: t * fl(1/14), s_lo = M * fl(1/98),
// s_hi = M * fl(1/7).
constexpr float kInvSplitStep = static_cast<float>(1.0 / 14.0);
constexpr float kInvSplitRange = static_cast<float>(1.0 / 98.0);
constexpr float kInvSeven = static_cast<float>(1.0 / 7.0);
// The 4-bit code a [-7, 7] quantizer never uses; marks a clipped element.
constexpr int kClipCode = -8;

// The 32 x 32 -> 64-bit product x * c folded to 32 bits, low word xor high
// word: reference.py `_mul_fold`. One wide multiply (on a GPU the
// multiply-add pipe, not the integer-logic one that bounds the kernels which
// draw noise) and one xor.
JINT4_HD uint32_t MulFold(uint32_t x, uint32_t c) {
  const uint64_t p = static_cast<uint64_t>(x) * c;
  return static_cast<uint32_t>(p) ^ static_cast<uint32_t>(p >> 32);
}

// Odd multipliers of the three MulFold rounds of PairHash.
constexpr uint32_t kHashMul0 = 0x9E3779B1u;
constexpr uint32_t kHashMul1 = 0x85EBCA77u;
constexpr uint32_t kHashMul2 = 0xC2B2AE3Du;

// The hash of element pair `pair` (elements 2 pair and 2 pair + 1) of a
// tensor drawn with `seed`: reference.py `_pair_hash`. Three MulFold rounds
// over the Weyl sequence pair * golden + seed0, seed1 mixed in after the
// first (two of the GPU's integer-logic operations per pair: the folds'
// xors, the one with seed1 fused into a three-input xor).
JINT4_HD uint32_t PairHash(uint32_t seed0, uint32_t seed1, uint32_t pair) {
  const uint32_t h = MulFold(pair * 0x9E3779B9u + seed0, kHashMul0) ^ seed1;
  return MulFold(MulFold(h, kHashMul1), kHashMul2);
}

JINT4_HD uint32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
#endif
}

JINT4_HD float BitsToFloat(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
#endif
}

// 16 bits as a float in [0, 1): bits * 2^-16 (exact), formed as
// (1 + bits * 2^-16) - 1: the 16 bits placed at the top of the mantissa of
// 1.0f, then one exact subtraction (no int-to-float conversion). `bits7` is
// the 16 bits already shifted left by 7 and masked (0x7FFF80).
JINT4_HD float Unit16Shifted(uint32_t bits7) {
  return BitsToFloat(0x3F800000u + bits7) - 1.0f;  // no carry: + is |
}
JINT4_HD float Unit16(uint32_t bits) { return Unit16Shifted((bits << 7) & 0x7FFF80u); }

// Counter-based uniform in [0, 1) with 16 random bits: reference.py
// `uniform`, element `index` (the row-major flat index, mod 2^32) of a tensor
// drawn with `seed`: the low half of PairHash(index / 2) for an even index,
// the high half for an odd one.
JINT4_HD float Uniform(uint32_t seed0, uint32_t seed1, uint32_t index) {
  const uint32_t h = PairHash(seed0, seed1, index >> 1);
  return Unit16((index & 1u) ? (h >> 16) : h);
}

// Uniform of the elements 2 pair and 2 pair + 1 from one hash.
JINT4_HD void UniformPair(uint32_t seed0, uint32_t seed1, uint32_t pair, float* u0,
                          float* u1) {
  const uint32_t h = PairHash(seed0, seed1, pair);
#if defined(__CUDA_ARCH__)
  // The same bits through multiply-adds (the GPU's multiply-add pipe; the
  // shift-and-mask form runs on its integer-logic pipe, which bounds the
  // kernels that draw noise): hi(x * 2^16) = x >> 16 (PTX, so that it stays
  // a multiply), then bits * 128 + 0x3F800000 = 1 + bits * 2^-16 as a float.
  uint32_t lo16, hi16;
  asm("mul.hi.u32 %0, %1, 65536;" : "=r"(hi16) : "r"(h));
  asm("mul.hi.u32 %0, %1, 65536;" : "=r"(lo16) : "r"(h * 65536u));
  *u0 = BitsToFloat(lo16 * 128u + 0x3F800000u) - 1.0f;
  *u1 = BitsToFloat(hi16 * 128u + 0x3F800000u) - 1.0f;
#else
  *u0 = Unit16Shifted((h & 0xFFFFu) * 128u);
  *u1 = Unit16Shifted((h >> 16) * 128u);
#endif
}

// One butterfly pair of a +-1 Hadamard stage, (a, b) -> (a + b, a - b):
// hadamard.py `_butterfly_stage` with normalized=False. The orthonormal
// transform is HadamardScale(L) times L such stages.
JINT4_HD void Butterfly(float& a, float& b) {
  const float s = a + b;
  const float d = a - b;
  a = s;
  b = d;
}

// 2^e in float32 for -126 <= e <= 127, exactly (its bits built directly):
// Pow2(-L) and Pow2(L) are the float contract's pre- and post-scale of the
// butterflies (reference.py `hadamard_prescale`).
JINT4_HD float Pow2(int e) { return BitsToFloat(static_cast<uint32_t>(127 + e) << 23); }

// 2^(-L/2) in float32, exactly as reference.py `hadamard_scale`: 1 or
// fl(1/sqrt(2)) times the power of two 2^-floor(L/2) (0 <= L <= 10).
JINT4_HD float HadamardScale(int L) {
  return ldexpf((L & 1) ? kInvSqrt2 : 1.0f, -(L >> 1));  // exact scaling
}

// The per-tensor factor of the LSQ quantizer, fl(HadamardScale(L) / step):
// v = T / step = (y * QuantFactor(L, step)) * Pow2(L) for y the +-1
// transform of the input times Pow2(-L) (reference.py `hadamard_quantize`).
JINT4_HD float QuantFactor(int L, float step) { return HadamardScale(L) / step; }

// In-place block-diagonal +-1 Hadamard transform of `n` contiguous floats with
// blocks of 2^log2_block; stage 0 (pairs at distance 1) first. Callers pass
// the input times Pow2(-log2_block) (the float contract above).
JINT4_HD void HadamardInPlace(float* v, int64_t n, int log2_block) {
  for (int stage = 0; stage < log2_block; ++stage) {
    const int64_t half = int64_t{1} << stage;
    for (int64_t base = 0; base < n; base += 2 * half) {
      for (int64_t j = 0; j < half; ++j) Butterfly(v[base + j], v[base + half + j]);
    }
  }
}

// round-half-to-even, as jnp.round.
JINT4_HD float RoundEven(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}

JINT4_HD float Clamp(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);  // NaN passes through
}

// Round-half-even of a small float with the 1.5 * 2^23 shifter: for |c| <=
// 2^21, c + 1.5 * 2^23 rounds c to an integer (IEEE nearest-even, as
// RoundEven) and holds it in its low mantissa bits. Full-rate adds and
// integer ops instead of the GPU's quarter-rate round and float-to-int
// conversions. Clamping to integer bounds commutes with rounding, so
// Clamp(RoundEven(v)) == rounded Clamp(v).
constexpr float kShifter = 12582912.0f;     // 1.5 * 2^23
constexpr uint32_t kShifterBits = 0x4B400000u;  // its bit pattern
struct SmallRound {
  float value;  // the rounded float
  int integer;  // the same as an int
};
JINT4_HD SmallRound RoundSmall(float c) {
  const float t = c + kShifter;
  return SmallRound{t - kShifter,
                    static_cast<int32_t>(FloatBits(t)) - static_cast<int32_t>(kShifterBits)};
}

// LSQ code of v = T / s: clamp(round(v), -qn, qp), NaN -> -qn
// (reference.py `hadamard_quantize`: where(isnan(q), -qn, q), what the GPU's
// min/max clamp gives a NaN; the row or column holding it is NaN-poisoned
// through the GEMM epilogue anyway, and the residual decodes a NaN element
// as -qn too).
JINT4_HD int8_t QuantizeCode(float v, int qn, int qp) {
  const float c = Clamp(v, -static_cast<float>(qn), static_cast<float>(qp));
  return c == c ? static_cast<int8_t>(RoundSmall(c).integer) : static_cast<int8_t>(-qn);
}

// lsq.py `encode_backward_state` for one element: the 4-bit code and the
// flag bits (bit 0: stochastic delta bit or clip side; bit 1, only for
// qn == 8: clipped).
JINT4_HD void EncodeBackwardState(float v, float u, int qn, int qp,
                                  int8_t* code, uint8_t* flags) {
  const SmallRound r =
      RoundSmall(Clamp(v, -static_cast<float>(qn), static_cast<float>(qp)));
  const float q = r.value;
  const bool inside = (v >= -qn) && (v <= qp);
  const bool frac_bit = u < ((q - v) + 0.5f);
  const bool side_bit = v > 0.0f;
  const bool bit0 = inside ? frac_bit : side_bit;
  if (qn <= 7) {
    *code = inside ? static_cast<int8_t>(r.integer) : static_cast<int8_t>(kClipCode);
    *flags = static_cast<uint8_t>(bit0);
  } else {
    *code = inside ? static_cast<int8_t>(r.integer)
                   : static_cast<int8_t>(side_bit ? qp : -qn);
    *flags = static_cast<uint8_t>(bit0) | static_cast<uint8_t>((!inside) << 1);
  }
}

// min(max(v, lo), hi) with IEEE minNum / maxNum: a (quiet) NaN gives lo,
// unlike Clamp, which passes it through. One instruction each on the GPU.
JINT4_HD float ClampMinMax(float v, float lo, float hi) {
#if defined(__CUDA_ARCH__)
  return fminf(fmaxf(v, lo), hi);
#else
  return std::fmin(std::fmax(v, lo), hi);
#endif
}

// QuantizeCode and EncodeBackwardState of one element at once, in the
// operations a GPU runs cheaply; bit-identical to the two (tests compare
// the handlers built on it with the reference):
//   c = min(max(v, lo), hi) (NaN -> lo), t = c + kShifter: the bits of t
//   carry round(c) in their low byte (kShifterBits has a zero low byte);
//   inside <=> c == v (false for NaN); NaN gives the GEMM code -qn (c = lo).
// lo = -qn, hi = qp; clip_code = qn <= 7 (clipped elements get kClipCode;
// for qn == 8 their code is the clamp value, which c already is, NaN too).
// v is an arithmetic result (v = y * factor), so a NaN is quiet: min/max of
// a signalling NaN may differ between host libm and the GPU.
struct ElementCodes {
  uint32_t q_bits;     // low byte: QuantizeCode(v, qn, qp)
  uint32_t code_bits;  // low byte: the residual's code (low nibble stored)
  float q;             // QuantizeCode(v, qn, qp) as a float (exact)
  uint32_t bit0_word;  // flag bit 0 in bit 31
  bool bit0;           // flag bit 0
  bool clipped;        // flag bit 1 (stored when qn == 8)
};
JINT4_HD ElementCodes QuantizeEncode(float v, float u, float lo, float hi, bool clip_code) {
  const float c = ClampMinMax(v, lo, hi);
  const float t = c + kShifter;
  const uint32_t r_bits = FloatBits(t);
  const float r = t - kShifter;
  const bool inside = c == v;
  // bit0 = inside ? u < (r - v) + 0.5 : v > 0, as the sign of one float
  // difference (adds instead of two compares and a select of booleans):
  // u < d <=> u - d < 0 (rounding never flips a sign, and u == d gives +0;
  // no flush to zero); outside, v > 0 <=> 0 - c < 0 (c = hi or lo: v's side;
  // a NaN v has c = lo, so false, as v > 0).
  const float d = (r - v) + 0.5f;
  ElementCodes out;
  out.q_bits = r_bits;
  out.code_bits = (inside || !clip_code) ? r_bits : (kShifterBits - 8u);  // kClipCode
  out.q = r;
  out.bit0_word = FloatBits(inside ? u - d : 0.0f - c);
  out.bit0 = (out.bit0_word >> 31) != 0u;
  out.clipped = !inside;
  return out;
}

// lsq.py `decode_backward_state`: the GEMM operand q, the STE mask and
// the unbiased delta estimate.
JINT4_HD void DecodeBackwardState(int8_t code, uint8_t flags, int qn, int qp,
                                  int8_t* q, bool* inside, float* delta_hat) {
  const bool bit0 = flags & 1;
  bool clipped;
  if (qn <= 7) {
    clipped = code == kClipCode;
    *q = clipped ? static_cast<int8_t>(bit0 ? qp : -qn) : code;
  } else {
    clipped = (flags >> 1) & 1;
    *q = code;
  }
  *inside = !clipped;
  *delta_hat = clipped ? static_cast<float>(*q) : static_cast<float>(bit0) - 0.5f;
}

// 4-bit two's complement nibble -> int8.
JINT4_HD int8_t NibbleToInt(uint8_t nibble) {
  int v = nibble & 0xF;
  return static_cast<int8_t>(v > 7 ? v - 16 : v);
}

// floor(y) + kShifter for |y| < 2^22 (and +-Inf, NaN through): on the GPU
// one add rounded toward -Inf (the integers near kShifter are 1 apart).
JINT4_HD float FloorShifted(float y) {
#if defined(__CUDA_ARCH__)
  return __fadd_rd(y, kShifter);
#else
  return std::floor(y) + kShifter;  // exact: an integer plus kShifter
#endif
}

// The bits of a float t = FloorShifted(y) (or t = c + kShifter) clamped to
// those of kShifter + [lo, hi]: compared as int32, float bit patterns keep
// the order of positive values and every negative one (sign bit) sorts
// below, so +Inf lands on hi and -Inf on lo, as a float clamp would.
JINT4_HD uint32_t ClampBits(uint32_t bits, int lo, int hi) {
  const int32_t b = static_cast<int32_t>(bits);
  const int32_t l = static_cast<int32_t>(kShifterBits) + lo;
  const int32_t h = static_cast<int32_t>(kShifterBits) + hi;
  return static_cast<uint32_t>(b < l ? l : (b > h ? h : b));
}

// bitsplit.py `bit_split` for one element, given f = 98 / safe_max, as
// shifted digits: hi_bits / lo_bits are kShifterBits + hi / + lo (their
// low bytes are the int8 digits, and the low byte of 14 hi_bits + lo_bits
// is the joined digit 14 hi + lo); nan: t is NaN (both digits are then 0).
//   t = g * f;  hi = round(clamp(t * fl(1/14), -7, 7))  (min/max: NaN -> -7,
//   flagged by nan);  lo = clamp(floor((t - 14 hi) + u), -7, 7), the floor
//   by FloorShifted and the clamp on the shifted bits (+-Inf land on +-7, as
//   the reference's float clamp). t - 14 hi is one FMA: 14 hi is exact, so it
//   rounds once, as the reference's subtraction.
struct SplitDigits {
  uint32_t hi_bits;
  uint32_t lo_bits;
  bool nan;
};
JINT4_HD SplitDigits SplitBits(float g, float f, float u) {
  const float t = g * f;
  const float th = ClampMinMax(t * kInvSplitStep, -7.0f, 7.0f) + kShifter;
#if defined(__CUDA_ARCH__)
  const float r = __fmaf_rn(-kSplitStep, th - kShifter, t);
#else
  const float r = std::fma(-kSplitStep, th - kShifter, t);
#endif
  SplitDigits d;
  d.hi_bits = FloatBits(th);
  d.lo_bits = ClampBits(FloatBits(FloorShifted(r + u)), -7, 7);
  d.nan = t != t;
  return d;
}

// The int8 digits of SplitDigits (0 and 0 for NaN).
JINT4_HD void DigitsToInt8(const SplitDigits& d, int8_t* hi, int8_t* lo) {
  *hi = d.nan ? int8_t{0} : static_cast<int8_t>(d.hi_bits - kShifterBits);
  *lo = d.nan ? int8_t{0} : static_cast<int8_t>(d.lo_bits - kShifterBits);
}

// The int8 digits of SplitBits.
JINT4_HD void SplitValue(float g, float f, float u, int8_t* hi, int8_t* lo) {
  DigitsToInt8(SplitBits(g, f, u), hi, lo);
}

// The joined digit 14 hi + lo (in [-98, 98]): reference.py `_join`.
JINT4_HD int8_t JoinDigits(int8_t hi, int8_t lo) {
  return static_cast<int8_t>(14 * static_cast<int>(hi) + static_cast<int>(lo));
}

// The joined digit of SplitBits in the low byte (0 for NaN): the low byte
// of 14 hi_bits + lo_bits (15 kShifterBits has a zero low byte).
JINT4_HD uint32_t JoinedBits(const SplitDigits& d) {
  return d.nan ? 0u : 14u * d.hi_bits + d.lo_bits;
}

// bitsplit.py: the divisor guard for max|G| (0, NaN or Inf -> 1).
JINT4_HD float SafeMax(float m) {
  return (m > 0.0f && m - m == 0.0f) ? m : 1.0f;
}

}  // namespace jint4

#endif  // JINT4_XLA_FFI_COMMON_JINT4_MATH_H_

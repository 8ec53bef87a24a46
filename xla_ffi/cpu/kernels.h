// The math of jint4's CPU handlers as plain functions on pointers and sizes
// (no FFI types), so the handlers in handlers.cc are thin adapters and these
// can be tested on their own. Semantics: the op contract in xla_ffi/README.md
// and its oracle jint4/kernels/reference.py. All arrays are row-major and
// dense; callers validate shapes, attributes and indices beforehand
// (ffi_util.h).
//
// Single-threaded, plain C++17. Build with IEEE float semantics
// (-ffp-contract=off, no -ffast-math): the integer outputs are bit-identical
// to the reference only then.
#ifndef JINT4_XLA_FFI_CPU_KERNELS_H_
#define JINT4_XLA_FFI_CPU_KERNELS_H_

#include <cstdint>

namespace jint4 {
namespace cpu {

// Element type of a "float" operand or result (f32, bf16 or f16 bits).
enum class FloatType { kF32, kBF16, kF16 };

// dst[i] = float32(src[offset + i]) for i < n (exact).
void LoadFloats(const void* src, FloatType type, int64_t offset, int64_t n,
                float* dst);
// dst[offset + i] = src[i] rounded to `type` (nearest even) for i < n.
void StoreFloats(const float* src, int64_t n, FloatType type, void* dst,
                 int64_t offset);

// jint4_hadamard_quantize on x[r, s] (of `type`): the block-diagonal Hadamard
// transform along `axis` (1: each row, blocks of 2^log2_block dividing s;
// 0: each column, dividing r) as +-1 butterflies (HadamardInPlace) of x *
// Pow2(-L), v = (xh * QuantFactor(L, step)) * Pow2(L) (L = log2_block; the
// float contract of jint4_math.h), q = QuantizeCode(v) written at
// q[i, j] ([r, s]) or, if `transpose`, at q[j, i] ([s, r]). If `nibbles`,
// `flags` and `norms` are all non-null (only for axis 1 without transpose),
// also writes the packed residual of EncodeBackwardState(v, Uniform(seed,
// i*s + j)): nibbles[ceil(r*s/2)] and flags[planes][ceil(r*s/8)] (planes = 1
// if qn <= 7 else 2), padding bits zero, and norms[i] = sqrtf(sum_j q^2), NaN
// when x[i, :] holds a NaN or Inf.
void HadamardQuantize(const void* x, FloatType type, int64_t r, int64_t s,
                      float step, uint32_t seed0, uint32_t seed1,
                      int log2_block, int qn, int qp, int axis, bool transpose,
                      int8_t* q, uint8_t* nibbles, uint8_t* flags,
                      float* norms);

// The column poison of x[r, s] (of `type`): out[j] = NaN if x[:, j] holds a
// NaN or Inf, else 0 (jint4_hadamard_quantize_weight's third result).
void ColumnPoison(const void* x, FloatType type, int64_t r, int64_t s, float* out);

// jint4_residual_values: of the packed residual of an [m, k] tensor, row t of
// the result is source row rows[t] (rows non-null, t < num_rows) or t
// (rows null, num_rows = m); q[t, c] = DecodeBackwardState(...).q, written
// [num_rows, k], or [k, num_rows] if `transpose`.
void ResidualValues(const uint8_t* nibbles, const uint8_t* flags, int64_t m,
                    int64_t k, const int32_t* rows, int64_t num_rows,
                    bool transpose, int qn, int qp, int8_t* q);

// jint4_lsq_backward: grad (of `grad_type`, widened to float32) gives
// g[t, :] = grad[t, :] (slots null, s_rows = m) or
// (slots[0,t] >= 0 ? grad[slots[0,t], :] : 0) + (slots[1,t] >= 0 ?
// grad[slots[1,t], :] : 0) for slots[2, m]; with the residual of [m, k]:
// dt[t, :] = (H+-((inside ? g : 0) * Pow2(-L)) * HadamardScale(L)) * Pow2(L)
// (blocks of 2^L, L = log2_block) stored as `dt_type`;
// returns sum g * delta_hat (products in float32, summed in double).
float LsqBackward(const void* grad, FloatType grad_type, int64_t s_rows, int64_t k,
                  const int32_t* slots, int64_t m, const uint8_t* nibbles,
                  const uint8_t* flags, int qn, int qp, int log2_block,
                  FloatType dt_type, void* dt);

// jint4_lsq_weight_backward: with v = (H+-(kernel * Pow2(-L)) * QuantFactor) *
// Pow2(L) (kernel[d, c] of `kernel_type`, Hb down each column in blocks of
// 2^L dividing d, L = log2_block, as HadamardQuantize with axis 0), dk[d, c] =
// (H+-((inside(v) ? grad : 0) * Pow2(-L)) * HadamardScale) * Pow2(L) down each
// column (grad[d, c] of `grad_type`, widened to float32), stored as
// `dk_type`; returns sum grad * delta(v) (lsq.py in_range and
// delta; products in float32, summed in double).
float LsqWeightBackward(const void* grad, FloatType grad_type, const void* kernel,
                        FloatType kernel_type, int64_t d, int64_t c, float step,
                        int qn, int qp, int log2_block, FloatType dk_type,
                        void* dk);

// jint4_bit_split on g[r, c] (of `type`): g2[2r, c] (hi rows over lo rows),
// scales[2] = {s_hi, s_lo}, norms[2r] = {s_hi * |hi_i|, then s_lo * |lo_i|}.
// abs_max: the caller's m = max|g| (NaN if g holds a NaN), used as given;
// null: computed here. row_inv (float[r], or null): the rows g[i, :] *
// row_inv[i] (one float product each) are split in g's place, abs_max being
// their max.
void BitSplit(const void* g, FloatType type, int64_t r, int64_t c,
              uint32_t seed0, uint32_t seed1, int8_t* g2, float* scales,
              float* norms, const float* abs_max = nullptr,
              const float* row_inv = nullptr);

// jint4_bit_split_joined on g[r, c]: v[r, c] = vt[c, r] = 14 hi + lo;
// scales[2] = {s_hi, s_lo}. Either of v, vt may be null (not written).
// abs_max: the caller's m = max|g| (NaN if g holds a NaN), used as given;
// null: computed here. row_inv (float[r], or null): v is instead the split
// of the unit rows g[i, :] * row_inv[i] with m = 1, with the same noise
// (vt and the scales stay g's).
void BitSplitJoined(const void* g, FloatType type, int64_t r, int64_t c,
                    uint32_t seed0, uint32_t seed1, int8_t* v, int8_t* vt,
                    float* scales, const float* abs_max = nullptr,
                    const float* row_inv = nullptr);

// jint4_resplit_rows: t[j, :] = float(g2[rows[j], :]) * row_scale[j] for
// g2[*, c] and j < num_rows; vt[c, num_rows] = the joined bit split of t,
// transposed; scales[2] = {s_hi, s_lo}.
void ResplitRows(const int8_t* g2, int64_t c, const int32_t* rows,
                 const float* row_scale, int64_t num_rows, uint32_t seed0,
                 uint32_t seed1, int8_t* vt, float* scales);

// out[m, n] = sum_k a[m, k] b[n, k] in int32 (wrapping on overflow, as XLA).
void IntGemmS32(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                int64_t k, int32_t* out);

// jint4_int_gemm: out[i, j] = (((float)acc[i, j] * scale) * row_scale[i]) +
// col_bias[j], stored as float32 (IntGemmF32) or as bfloat16 bits
// (IntGemmBF16, round-to-nearest-even, NaN stays NaN).
void IntGemmF32(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                int64_t k, float scale, const float* row_scale,
                const float* col_bias, float* out);
void IntGemmBF16(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                 int64_t k, float scale, const float* row_scale,
                 const float* col_bias, uint16_t* out);

}  // namespace cpu
}  // namespace jint4

#endif  // JINT4_XLA_FFI_CPU_KERNELS_H_

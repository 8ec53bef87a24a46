// Plain single-threaded C++ implementations of jint4's ops (see kernels.h).
#include "cpu/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/ffi_util.h"
#include "common/float_convert.h"
#include "common/jint4_math.h"

namespace jint4 {
namespace cpu {
namespace {

using ffi_util::FlagBytes;
using ffi_util::FlagPlanes;
using ffi_util::NibbleBytes;

// The 4-bit code and the flag bits of element i of a packed residual.
inline void LoadResidual(const uint8_t* nibbles, const uint8_t* flags,
                         int64_t flag_bytes, int planes, int64_t i,
                         int8_t* code, uint8_t* f) {
  *code = NibbleToInt(static_cast<uint8_t>(nibbles[i >> 1] >> ((i & 1) * 4)));
  const int bit = static_cast<int>(i & 7);
  uint8_t v = (flags[i >> 3] >> bit) & 1;
  if (planes == 2) {
    v |= static_cast<uint8_t>(((flags[flag_bytes + (i >> 3)] >> bit) & 1) << 1);
  }
  *f = v;
}

// Exact int8 dot product of length k. int32 partial sums over chunks short
// enough never to overflow (2^15 * 2^14 = 2^29), combined modulo 2^32 like an
// int32 accumulator that wraps (XLA's semantics), without signed overflow.
constexpr int64_t kDotChunk = int64_t{1} << 15;

// Fixed-length inner runs: GCC vectorizes these even at -O2 (its "very
// cheap" cost model only takes loops that need no scalar epilogue).
constexpr int64_t kRun = 64;

inline int32_t DotS8(const int8_t* a, const int8_t* b, int64_t k) {
  uint32_t total = 0;
  for (int64_t k0 = 0; k0 < k; k0 += kDotChunk) {
    const int64_t k1 = std::min(k, k0 + kDotChunk);
    int32_t acc = 0;
    int64_t t = k0;
    for (; t + kRun <= k1; t += kRun) {
      for (int64_t u = 0; u < kRun; ++u) {
        acc += static_cast<int32_t>(a[t + u]) * static_cast<int32_t>(b[t + u]);
      }
    }
    for (; t < k1; ++t) {
      acc += static_cast<int32_t>(a[t]) * static_cast<int32_t>(b[t]);
    }
    total += static_cast<uint32_t>(acc);
  }
  return static_cast<int32_t>(total);
}

// Drives a[m, k] . b[n, k]^T and calls store(i, j, acc) for every element.
// Blocks of b's rows (about 128 KiB) are reused by every row of a; each dot
// product runs over contiguous k.
template <typename Store>
void IntGemmDriver(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                   int64_t k, Store store) {
  const int64_t block_n =
      std::max<int64_t>(1, (int64_t{128} << 10) / std::max<int64_t>(k, 1));
  for (int64_t j0 = 0; j0 < n; j0 += block_n) {
    const int64_t j1 = std::min(n, j0 + block_n);
    for (int64_t i = 0; i < m; ++i) {
      const int8_t* ai = a + i * k;
      for (int64_t j = j0; j < j1; ++j) store(i, j, DotS8(ai, b + j * k, k));
    }
  }
}

// Calls fn(load) with load(i, j) = float32(g[i * cols + j]) for g of `type`.
template <typename Fn>
void WithLoader(const void* g, FloatType type, int64_t cols, Fn fn) {
  switch (type) {
    case FloatType::kF32: {
      const float* p = static_cast<const float*>(g);
      fn([p, cols](int64_t i, int64_t j) { return p[i * cols + j]; });
      return;
    }
    case FloatType::kBF16: {
      const uint16_t* p = static_cast<const uint16_t*>(g);
      fn([p, cols](int64_t i, int64_t j) { return BF16BitsToFloat(p[i * cols + j]); });
      return;
    }
    case FloatType::kF16: {
      const uint16_t* p = static_cast<const uint16_t*>(g);
      fn([p, cols](int64_t i, int64_t j) { return HalfBitsToFloat(p[i * cols + j]); });
      return;
    }
  }
}

// load(i, j) times row_inv[i] (one float product: bitsplit.unit_rows).
template <typename Load>
auto RowScaled(Load load, const float* row_inv) {
  return [load, row_inv](int64_t i, int64_t j) { return load(i, j) * row_inv[i]; };
}

// WithLoader, through RowScaled when row_inv is given.
template <typename Fn>
void WithRowLoader(const void* g, FloatType type, int64_t cols, const float* row_inv,
                   Fn fn) {
  WithLoader(g, type, cols, [&](auto load) {
    if (row_inv == nullptr) {
      fn(load);
    } else {
      fn(RowScaled(load, row_inv));
    }
  });
}

// The joined digit 14 hi + lo of SplitBits as int8 (the low byte of JoinedBits).
int8_t JoinedDigit(const SplitDigits& d) {
  return static_cast<int8_t>(JoinedBits(d) & 0xFFu);
}

// max|t| of t[rows, cols] given by load(i, j), NaN if any element is NaN
// (as bitsplit.abs_max spells it out).
template <typename Load>
float AbsMax(int64_t rows, int64_t cols, Load load) {
  float m = 0.0f;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const float a = std::fabs(load(i, j));
      if (a != a) return std::numeric_limits<float>::quiet_NaN();
      if (a > m) m = a;
    }
  }
  return m;
}

// Bit splitting of t[rows, cols] given by load(i, j) (bitsplit.py): m =
// *given_max when the caller has it, else AbsMax; then SplitBits with the
// noise of flat index i * cols + j; emit(i, j, digits) per element (the CUDA
// kernels' forms: DigitsToInt8 for the stacked halves, JoinedBits for the
// joined digit, so the CPU tests check both against the reference); scales =
// {m * fl(1/7), m * fl(1/98)}.
template <typename Load, typename Emit>
void SplitCore(int64_t rows, int64_t cols, Load load, uint32_t seed0,
               uint32_t seed1, float* scales, Emit emit,
               const float* given_max = nullptr) {
  const float m = given_max != nullptr ? *given_max : AbsMax(rows, cols, load);
  const float f = kSplitRange / SafeMax(m);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      emit(i, j, SplitBits(load(i, j), f,
                           Uniform(seed0, seed1, static_cast<uint32_t>(i * cols + j))));
    }
  }
  scales[0] = m * kInvSeven;
  scales[1] = m * kInvSplitRange;
}

// Hb down each column of t[rows, cols] (blocks of 2^log2_block dividing
// rows): butterfly stage `stage` pairs rows at distance 2^stage, elementwise
// over the columns (the same float operations per element as HadamardInPlace
// on a column, in the same order).
void HadamardColumns(float* t, int64_t rows, int64_t cols, int log2_block) {
  for (int stage = 0; stage < log2_block; ++stage) {
    const int64_t half = int64_t{1} << stage;
    for (int64_t base = 0; base < rows; base += 2 * half) {
      for (int64_t i = base; i < base + half; ++i) {
        float* a = t + i * cols;
        float* b = t + (i + half) * cols;
        for (int64_t j = 0; j < cols; ++j) Butterfly(a[j], b[j]);
      }
    }
  }
}

}  // namespace

void LoadFloats(const void* src, FloatType type, int64_t offset, int64_t n,
                float* dst) {
  switch (type) {
    case FloatType::kF32:
      std::memcpy(dst, static_cast<const float*>(src) + offset,
                  static_cast<size_t>(n) * sizeof(float));
      return;
    case FloatType::kBF16: {
      const uint16_t* p = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = BF16BitsToFloat(p[i]);
      return;
    }
    case FloatType::kF16: {
      const uint16_t* p = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = HalfBitsToFloat(p[i]);
      return;
    }
  }
}

void StoreFloats(const float* src, int64_t n, FloatType type, void* dst,
                 int64_t offset) {
  switch (type) {
    case FloatType::kF32:
      std::memcpy(static_cast<float*>(dst) + offset, src,
                  static_cast<size_t>(n) * sizeof(float));
      return;
    case FloatType::kBF16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = FloatToBF16Bits(src[i]);
      return;
    }
    case FloatType::kF16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = FloatToHalfBits(src[i]);
      return;
    }
  }
}

void ColumnPoison(const void* x, FloatType type, int64_t r, int64_t s, float* out) {
  std::vector<float> row(static_cast<size_t>(s));
  for (int64_t j = 0; j < s; ++j) out[j] = 0.0f;
  for (int64_t i = 0; i < r; ++i) {
    LoadFloats(x, type, i * s, s, row.data());
    for (int64_t j = 0; j < s; ++j) {
      if (!std::isfinite(row[j])) out[j] = std::numeric_limits<float>::quiet_NaN();
    }
  }
}

void HadamardQuantize(const void* x, FloatType type, int64_t r, int64_t s,
                      float step, uint32_t seed0, uint32_t seed1,
                      int log2_block, int qn, int qp, int axis, bool transpose,
                      int8_t* q, uint8_t* nibbles, uint8_t* flags,
                      float* norms) {
  const bool residual = nibbles != nullptr && flags != nullptr && norms != nullptr;
  const int64_t count = r * s;
  const int planes = FlagPlanes(qn);
  const int64_t flag_bytes = FlagBytes(count);
  if (residual) {
    std::memset(nibbles, 0, static_cast<size_t>(NibbleBytes(count)));
    std::memset(flags, 0, static_cast<size_t>(planes * flag_bytes));
  }
  // q[i, j] of the [r, s] result, stored at (i, j) or (j, i).
  auto store_q = [&](int64_t i, int64_t j, int8_t v) {
    q[transpose ? j * r + i : i * s + j] = v;
  };
  // The float contract: v = (H+-(x * down) * factor) * up.
  const float down = Pow2(-log2_block);
  const float up = Pow2(log2_block);
  const float factor = QuantFactor(log2_block, step);

  if (axis == 0) {
    std::vector<float> t(static_cast<size_t>(count));
    LoadFloats(x, type, 0, count, t.data());
    for (float& value : t) value *= down;
    HadamardColumns(t.data(), r, s, log2_block);
    // Row tiles, so that the transposed stores run contiguously.
    constexpr int64_t kTile = 32;
    for (int64_t i0 = 0; i0 < r; i0 += kTile) {
      const int64_t i1 = std::min(r, i0 + kTile);
      for (int64_t j = 0; j < s; ++j) {
        for (int64_t i = i0; i < i1; ++i) {
          const float v = (t[static_cast<size_t>(i * s + j)] * factor) * up;
          store_q(i, j, QuantizeCode(v, qn, qp));
        }
      }
    }
    return;  // no residual for axis 0 (the handler checks)
  }

  std::vector<float> row(static_cast<size_t>(s));
  for (int64_t i = 0; i < r; ++i) {
    LoadFloats(x, type, i * s, s, row.data());
    bool finite = true;
    if (residual) {
      for (int64_t j = 0; j < s; ++j) finite = finite && std::isfinite(row[j]);
    }
    for (int64_t j = 0; j < s; ++j) row[j] *= down;
    HadamardInPlace(row.data(), s, log2_block);
    int64_t sum_sq = 0;  // exact
    for (int64_t j = 0; j < s; ++j) {
      const int64_t e = i * s + j;
      const float v = (row[j] * factor) * up;
      if (!residual) {
        store_q(i, j, QuantizeCode(v, qn, qp));
        continue;
      }
      // The CUDA kernels' one-pass form (bit-identical to QuantizeCode +
      // EncodeBackwardState), so the CPU tests check it against the reference.
      const ElementCodes ec =
          QuantizeEncode(v, Uniform(seed0, seed1, static_cast<uint32_t>(e)),
                         -static_cast<float>(qn), static_cast<float>(qp), qn <= 7);
      const int8_t qv = static_cast<int8_t>(ec.q_bits & 0xFFu);
      store_q(i, j, qv);
      sum_sq += int64_t{qv} * qv;
      nibbles[e >> 1] |= static_cast<uint8_t>((ec.code_bits & 0xFu) << ((e & 1) * 4));
      const int bit = static_cast<int>(e & 7);
      flags[e >> 3] |= static_cast<uint8_t>(static_cast<uint32_t>(ec.bit0) << bit);
      if (planes == 2) {
        flags[flag_bytes + (e >> 3)] |=
            static_cast<uint8_t>(static_cast<uint32_t>(ec.clipped) << bit);
      }
    }
    if (residual) {
      norms[i] = finite ? std::sqrt(static_cast<float>(sum_sq))
                        : std::numeric_limits<float>::quiet_NaN();
    }
  }
}

void ResidualValues(const uint8_t* nibbles, const uint8_t* flags, int64_t m,
                    int64_t k, const int32_t* rows, int64_t num_rows,
                    bool transpose, int qn, int qp, int8_t* q) {
  const int planes = FlagPlanes(qn);
  const int64_t flag_bytes = FlagBytes(m * k);
  for (int64_t t = 0; t < num_rows; ++t) {
    const int64_t src = rows != nullptr ? static_cast<int64_t>(rows[t]) : t;
    for (int64_t c = 0; c < k; ++c) {
      int8_t code, qv;
      uint8_t f;
      LoadResidual(nibbles, flags, flag_bytes, planes, src * k + c, &code, &f);
      bool inside;
      float delta_hat;
      DecodeBackwardState(code, f, qn, qp, &qv, &inside, &delta_hat);
      q[transpose ? c * num_rows + t : t * k + c] = qv;
    }
  }
}

float LsqBackward(const void* grad, FloatType grad_type, int64_t s_rows, int64_t k,
                  const int32_t* slots, int64_t m, const uint8_t* nibbles,
                  const uint8_t* flags, int qn, int qp, int log2_block,
                  FloatType dt_type, void* dt) {
  (void)s_rows;  // the handler checked every slot against it
  const int planes = FlagPlanes(qn);
  const int64_t flag_bytes = FlagBytes(m * k);
  std::vector<float> row(static_cast<size_t>(k));
  std::vector<float> a(static_cast<size_t>(k)), b(static_cast<size_t>(k));
  const float scale = HadamardScale(log2_block);
  const float down = Pow2(-log2_block);  // the float contract's pre- and post-scale
  const float up = Pow2(log2_block);
  double sum = 0.0;
  for (int64_t t = 0; t < m; ++t) {
    // grad rows widened to float32 (exact), as the reference's astype.
    const float* g0 = nullptr;
    const float* g1 = nullptr;
    if (slots != nullptr) {
      const int32_t s0 = slots[t];
      const int32_t s1 = slots[m + t];
      if (s0 >= 0) {
        LoadFloats(grad, grad_type, static_cast<int64_t>(s0) * k, k, a.data());
        g0 = a.data();
      }
      if (s1 >= 0) {
        LoadFloats(grad, grad_type, static_cast<int64_t>(s1) * k, k, b.data());
        g1 = b.data();
      }
    } else {
      LoadFloats(grad, grad_type, t * k, k, a.data());
      g0 = a.data();
    }
    for (int64_t c = 0; c < k; ++c) {
      // The reference's slot sum: pick(slot 0) + pick(slot 1), 0 for none.
      const float g = slots != nullptr
                          ? (g0 != nullptr ? g0[c] : 0.0f) + (g1 != nullptr ? g1[c] : 0.0f)
                          : g0[c];
      int8_t code, qv;
      uint8_t f;
      LoadResidual(nibbles, flags, flag_bytes, planes, t * k + c, &code, &f);
      bool inside;
      float delta_hat;
      DecodeBackwardState(code, f, qn, qp, &qv, &inside, &delta_hat);
      row[c] = (inside ? g : 0.0f) * down;
      sum += static_cast<double>(g * delta_hat);
    }
    HadamardInPlace(row.data(), k, log2_block);
    for (int64_t c = 0; c < k; ++c) row[c] = (row[c] * scale) * up;
    StoreFloats(row.data(), k, dt_type, dt, t * k);
  }
  return static_cast<float>(sum);
}

float LsqWeightBackward(const void* grad, FloatType grad_type, const void* kernel,
                        FloatType kernel_type, int64_t d, int64_t c, float step,
                        int qn, int qp, int log2_block, FloatType dk_type,
                        void* dk) {
  if (d == 0 || c == 0) return 0.0f;
  // One Hadamard block of rows (2^log2_block rows, every column) at a time:
  // the column transforms never mix blocks.
  const int64_t block = int64_t{1} << log2_block;
  const int64_t n = block * c;
  std::vector<float> v(static_cast<size_t>(n));
  std::vector<float> masked(static_cast<size_t>(n));
  std::vector<float> g(static_cast<size_t>(n));
  const float lo = -static_cast<float>(qn);
  const float hi = static_cast<float>(qp);
  const float factor = QuantFactor(log2_block, step);
  const float scale = HadamardScale(log2_block);
  const float down = Pow2(-log2_block);  // the float contract's pre- and post-scale
  const float up = Pow2(log2_block);
  double sum = 0.0;
  for (int64_t r0 = 0; r0 < d; r0 += block) {
    LoadFloats(kernel, kernel_type, r0 * c, n, v.data());
    for (float& value : v) value *= down;
    HadamardColumns(v.data(), block, c, log2_block);
    LoadFloats(grad, grad_type, r0 * c, n, g.data());
    for (int64_t e = 0; e < n; ++e) {
      // lsq.py in_range / delta of v = (kernel Hb) / step (the +-1 transform
      // times QuantFactor, then Pow2(L), as the reference).
      const float x = (v[static_cast<size_t>(e)] * factor) * up;
      const bool inside = (x >= lo) && (x <= hi);
      const float delta = x < lo ? lo : (x > hi ? hi : RoundEven(x) - x);
      const float ge = g[static_cast<size_t>(e)];
      masked[static_cast<size_t>(e)] = (inside ? ge : 0.0f) * down;
      sum += static_cast<double>(ge * delta);
    }
    HadamardColumns(masked.data(), block, c, log2_block);
    for (float& value : masked) value = (value * scale) * up;
    StoreFloats(masked.data(), n, dk_type, dk, r0 * c);
  }
  return static_cast<float>(sum);
}

void BitSplit(const void* g, FloatType type, int64_t r, int64_t c,
              uint32_t seed0, uint32_t seed1, int8_t* g2, float* scales,
              float* norms, const float* abs_max, const float* row_inv) {
  const int64_t count = r * c;
  WithRowLoader(g, type, c, row_inv, [&](auto load) {
    SplitCore(
        r, c, load, seed0, seed1, scales,
        [&](int64_t i, int64_t j, const SplitDigits& d) {
          DigitsToInt8(d, &g2[i * c + j], &g2[count + i * c + j]);
        },
        abs_max);
  });
  for (int64_t half = 0; half < 2; ++half) {
    for (int64_t i = 0; i < r; ++i) {
      const int8_t* v = g2 + half * count + i * c;
      int64_t sum_sq = 0;  // exact
      for (int64_t j = 0; j < c; ++j) sum_sq += int64_t{v[j]} * v[j];
      norms[half * r + i] = scales[half] * std::sqrt(static_cast<float>(sum_sq));
    }
  }
}

void BitSplitJoined(const void* g, FloatType type, int64_t r, int64_t c,
                    uint32_t seed0, uint32_t seed1, int8_t* v, int8_t* vt,
                    float* scales, const float* abs_max, const float* row_inv) {
  WithLoader(g, type, c, [&](auto load) {
    SplitCore(
        r, c, load, seed0, seed1, scales,
        [&](int64_t i, int64_t j, const SplitDigits& d) {
          const int8_t joined = JoinedDigit(d);
          if (v != nullptr && row_inv == nullptr) v[i * c + j] = joined;
          if (vt != nullptr) vt[j * r + i] = joined;
        },
        abs_max);
    if (v == nullptr || row_inv == nullptr) return;
    // The unit rows with m = 1 and the same noise (index i * c + j).
    const float unit = 1.0f;
    float unit_scales[2];
    SplitCore(
        r, c, RowScaled(load, row_inv), seed0, seed1, unit_scales,
        [&](int64_t i, int64_t j, const SplitDigits& d) { v[i * c + j] = JoinedDigit(d); },
        &unit);
  });
}

void ResplitRows(const int8_t* g2, int64_t c, const int32_t* rows,
                 const float* row_scale, int64_t num_rows, uint32_t seed0,
                 uint32_t seed1, int8_t* vt, float* scales) {
  auto load = [&](int64_t j, int64_t col) {
    return static_cast<float>(g2[static_cast<int64_t>(rows[j]) * c + col]) *
           row_scale[j];
  };
  SplitCore(num_rows, c, load, seed0, seed1, scales,
            [&](int64_t j, int64_t col, const SplitDigits& d) {
              vt[col * num_rows + j] = JoinedDigit(d);
            });
}

void IntGemmS32(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                int64_t k, int32_t* out) {
  IntGemmDriver(a, b, m, n, k,
                [&](int64_t i, int64_t j, int32_t acc) { out[i * n + j] = acc; });
}

void IntGemmF32(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                int64_t k, float scale, const float* row_scale,
                const float* col_bias, float* out) {
  IntGemmDriver(a, b, m, n, k, [&](int64_t i, int64_t j, int32_t acc) {
    out[i * n + j] = ((static_cast<float>(acc) * scale) * row_scale[i]) + col_bias[j];
  });
}

void IntGemmBF16(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                 int64_t k, float scale, const float* row_scale,
                 const float* col_bias, uint16_t* out) {
  IntGemmDriver(a, b, m, n, k, [&](int64_t i, int64_t j, int32_t acc) {
    out[i * n + j] = FloatToBF16Bits(
        ((static_cast<float>(acc) * scale) * row_scale[i]) + col_bias[j]);
  });
}

}  // namespace cpu
}  // namespace jint4

// Plain single-threaded C++ implementations of jint4's ops (see kernels.h).
#include "cpu/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/ffi_util.h"
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

// Drives sum_t a[t, i] b[rows[t], j] (a[r, m], b[*, n]) and calls
// store(i, j, acc). Tiles of the accumulator stay in cache while all r rank-1
// updates run over them; the innermost loop is contiguous over j.
template <typename Store>
void GatherRowsDriver(const int8_t* a, const int8_t* b, const int32_t* rows,
                      int64_t r, int64_t m, int64_t n, Store store) {
  constexpr int64_t kTileM = 64;
  constexpr int64_t kTileN = 256;
  std::vector<uint32_t> tile(kTileM * kTileN);
  for (int64_t i0 = 0; i0 < m; i0 += kTileM) {
    const int64_t mi = std::min(kTileM, m - i0);
    for (int64_t j0 = 0; j0 < n; j0 += kTileN) {
      const int64_t nj = std::min(kTileN, n - j0);
      std::fill(tile.begin(), tile.end(), 0u);
      for (int64_t t = 0; t < r; ++t) {
        const int8_t* at = a + t * m + i0;
        const int8_t* bt = b + static_cast<int64_t>(rows[t]) * n + j0;
        for (int64_t i = 0; i < mi; ++i) {
          const int32_t av = at[i];
          if (av == 0) continue;
          uint32_t* acc = tile.data() + i * kTileN;
          // Modulo 2^32, as a wrapping int32 accumulator.
          int64_t j = 0;
          for (; j + kRun <= nj; j += kRun) {
            for (int64_t u = 0; u < kRun; ++u) {
              acc[j + u] +=
                  static_cast<uint32_t>(av * static_cast<int32_t>(bt[j + u]));
            }
          }
          for (; j < nj; ++j) {
            acc[j] += static_cast<uint32_t>(av * static_cast<int32_t>(bt[j]));
          }
        }
      }
      for (int64_t i = 0; i < mi; ++i) {
        for (int64_t j = 0; j < nj; ++j) {
          store(i0 + i, j0 + j, static_cast<int32_t>(tile.data()[i * kTileN + j]));
        }
      }
    }
  }
}

}  // namespace

uint16_t FloatToBF16Bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    // NaN -> the canonical quiet NaN of the same sign, as XLA / ml_dtypes.
    return static_cast<uint16_t>(((bits >> 16) & 0x8000u) | 0x7FC0u);
  }
  bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

void HadamardQuantize(const float* x, int64_t m, int64_t k, float step,
                      uint32_t seed0, uint32_t seed1, int log2_block, int qn,
                      int qp, int8_t* q, uint8_t* nibbles, uint8_t* flags) {
  const bool residual = nibbles != nullptr && flags != nullptr;
  const int64_t count = m * k;
  const int planes = FlagPlanes(qn);
  const int64_t flag_bytes = FlagBytes(count);
  if (residual) {
    std::memset(nibbles, 0, static_cast<size_t>(NibbleBytes(count)));
    std::memset(flags, 0, static_cast<size_t>(planes * flag_bytes));
  }
  std::vector<float> row(static_cast<size_t>(k));
  for (int64_t r = 0; r < m; ++r) {
    std::copy(x + r * k, x + (r + 1) * k, row.begin());
    HadamardInPlace(row.data(), k, log2_block);
    for (int64_t c = 0; c < k; ++c) {
      const int64_t i = r * k + c;
      const float v = row.data()[c] / step;
      q[i] = QuantizeCode(v, qn, qp);
      if (!residual) continue;
      int8_t code;
      uint8_t f;
      EncodeBackwardState(v, Uniform(seed0, seed1, static_cast<uint32_t>(i)),
                          qn, qp, &code, &f);
      nibbles[i >> 1] |=
          static_cast<uint8_t>((static_cast<uint8_t>(code) & 0xFu) << ((i & 1) * 4));
      const int bit = static_cast<int>(i & 7);
      flags[i >> 3] |= static_cast<uint8_t>((f & 1u) << bit);
      if (planes == 2) {
        flags[flag_bytes + (i >> 3)] |=
            static_cast<uint8_t>(((f >> 1) & 1u) << bit);
      }
    }
  }
}

void ResidualValues(const uint8_t* nibbles, const uint8_t* flags, int64_t n,
                    int qn, int qp, int8_t* q) {
  const int planes = FlagPlanes(qn);
  const int64_t flag_bytes = FlagBytes(n);
  for (int64_t i = 0; i < n; ++i) {
    int8_t code;
    uint8_t f;
    LoadResidual(nibbles, flags, flag_bytes, planes, i, &code, &f);
    bool inside;
    float delta_hat;
    DecodeBackwardState(code, f, qn, qp, &q[i], &inside, &delta_hat);
  }
}

float LsqBackward(const float* grad, const uint8_t* nibbles,
                  const uint8_t* flags, int64_t n, int qn, int qp, float* dt) {
  const int planes = FlagPlanes(qn);
  const int64_t flag_bytes = FlagBytes(n);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    int8_t code, qv;
    uint8_t f;
    LoadResidual(nibbles, flags, flag_bytes, planes, i, &code, &f);
    bool inside;
    float delta_hat;
    DecodeBackwardState(code, f, qn, qp, &qv, &inside, &delta_hat);
    dt[i] = inside ? grad[i] : 0.0f;
    sum += static_cast<double>(grad[i] * delta_hat);
  }
  return static_cast<float>(sum);
}

void BitSplit(const float* g, int64_t r, int64_t c, uint32_t seed0,
              uint32_t seed1, int8_t* hi, int8_t* lo, float* scales,
              float* hi_norm, float* lo_norm) {
  const int64_t count = r * c;
  // m = max|g|, NaN if any element is NaN (as jnp.max).
  float m = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    const float a = std::fabs(g[i]);
    if (a != a) {
      m = std::numeric_limits<float>::quiet_NaN();
      break;
    }
    if (a > m) m = a;
  }
  const float f = kSplitRange / SafeMax(m);
  for (int64_t i = 0; i < count; ++i) {
    SplitValue(g[i], f, Uniform(seed0, seed1, static_cast<uint32_t>(i)), &hi[i],
               &lo[i]);
  }
  const float s_lo = m * kInvSplitRange;
  const float s_hi = m * kInvSeven;
  scales[0] = s_hi;
  scales[1] = s_lo;
  for (int64_t row = 0; row < r; ++row) {
    int64_t hi_sq = 0, lo_sq = 0;  // exact sums of squares
    for (int64_t j = row * c; j < (row + 1) * c; ++j) {
      hi_sq += int64_t{hi[j]} * hi[j];
      lo_sq += int64_t{lo[j]} * lo[j];
    }
    hi_norm[row] = s_hi * std::sqrt(static_cast<float>(hi_sq));
    lo_norm[row] = s_lo * std::sqrt(static_cast<float>(lo_sq));
  }
}

void IntGemmS32(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                int64_t k, int32_t* out) {
  IntGemmDriver(a, b, m, n, k,
                [&](int64_t i, int64_t j, int32_t acc) { out[i * n + j] = acc; });
}

void IntGemmF32(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                int64_t k, float scale, const float* row_scale, float* out) {
  IntGemmDriver(a, b, m, n, k, [&](int64_t i, int64_t j, int32_t acc) {
    out[i * n + j] = (static_cast<float>(acc) * scale) * row_scale[i];
  });
}

void IntGemmBF16(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                 int64_t k, float scale, const float* row_scale,
                 uint16_t* out) {
  IntGemmDriver(a, b, m, n, k, [&](int64_t i, int64_t j, int32_t acc) {
    out[i * n + j] =
        FloatToBF16Bits((static_cast<float>(acc) * scale) * row_scale[i]);
  });
}

void IntGemmGatherRowsS32(const int8_t* a, const int8_t* b,
                          const int32_t* rows, int64_t r, int64_t m, int64_t n,
                          int32_t* out) {
  GatherRowsDriver(a, b, rows, r, m, n, [&](int64_t i, int64_t j, int32_t acc) {
    out[i * n + j] = acc;
  });
}

void IntGemmGatherRowsF32(const int8_t* a, const int8_t* b,
                          const int32_t* rows, int64_t r, int64_t m, int64_t n,
                          float scale, float* out) {
  GatherRowsDriver(a, b, rows, r, m, n, [&](int64_t i, int64_t j, int32_t acc) {
    out[i * n + j] = static_cast<float>(acc) * scale;
  });
}

}  // namespace cpu
}  // namespace jint4

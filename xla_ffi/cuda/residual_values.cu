// jint4_residual_values (CUDA): the quantized activation q held by a packed
// backward residual (README layout: nibble of element 2j in the low half of
// byte j; bit b of byte j of flag plane p = bit p of element 8j + b), plain,
// with gathered rows and/or transposed. Whole groups of 8 decode with word
// operations (DecodeGroupQ, residual_decode.cuh).
//   Plain: groups of 8 consecutive elements per thread (one flag byte, four
//   nibble bytes), grid-stride (ResidualValuesKernel). With K % 8 == 0 and
//   aligned pointers: transposed output (gathered or not, T % 4 == 0):
//   ResidualTransposeKernel, 16 rows x 8 columns per thread transposed in
//   registers, 16- or 4-byte stores; gathered rows, not transposed:
//   ResidualGatherRowsKernel, groups of 8 per thread. Otherwise (ragged):
//   64 x 64 tiles decoded into shared memory (ResidualTileKernel), then
//   written row- or column-wise.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/jint4_math.h"
#include "cuda_common.h"
#include "cuda_ffi.h"
#include "device_util.cuh"
#include "handlers.h"
#include "residual_decode.cuh"

namespace jint4 {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 8192;

// The group's nibble bytes (those past the end read as 0).
__device__ __forceinline__ uint32_t LoadNibbles(const uint8_t* __restrict__ nibbles,
                                                int64_t g, int64_t total, bool vec) {
  const int64_t e0 = g << 3;
  if (vec && e0 + 8 <= total) {
    return *reinterpret_cast<const uint32_t*>(nibbles + (e0 >> 1));  // 4-aligned
  }
  uint32_t nib = 0;
  for (int k = 0; k < 4; ++k) {
    if (e0 + 2 * k < total) nib |= static_cast<uint32_t>(nibbles[(e0 >> 1) + k]) << (8 * k);
  }
  return nib;
}

// vec: nibbles 4-byte aligned and q 8-byte aligned.
__global__ void __launch_bounds__(kThreads)
ResidualValuesKernel(const uint8_t* __restrict__ nibbles,
                     const uint8_t* __restrict__ flags, int64_t total, int qn, int qp, bool vec,
                     int8_t* __restrict__ q) {
  const int64_t groups = (total + 7) >> 3;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       g < groups; g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t f0 = flags[g];  // (the q values need no second plane)
    const uint32_t nib = LoadNibbles(nibbles, g, total, vec);
    const int64_t e0 = g << 3;
    const uint2 out = DecodeGroupQ(nib, f0, qn, qp);
    if (vec && e0 + 8 <= total) {
      *reinterpret_cast<uint2*>(q + e0) = out;  // 8-aligned
    } else {
      for (int b = 0; b < 8; ++b) {
        const uint32_t word = b < 4 ? out.x : out.y;
        if (e0 + b < total) q[e0 + b] = static_cast<int8_t>((word >> (8 * (b & 3))) & 0xFFu);
      }
    }
  }
}

constexpr int kTile = 64;

// Residual rows (gathered or not) decoded to a 64 x 64 tile, then written as
// out[T, K] or, transposed, out[K, T].
__global__ void __launch_bounds__(kThreads)
ResidualTileKernel(const uint8_t* __restrict__ nibbles,
                   const uint8_t* __restrict__ flags, int64_t plane_stride,
                   int planes, int64_t K, int64_t T,
                   const int32_t* __restrict__ rows, int transpose, int qn, int qp,
                   int8_t* __restrict__ out) {
  __shared__ int8_t tile[kTile][kTile + 4];
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t t_tiles = CeilDivDev(T, kTile);
  const bool words = transpose && (T % 4 == 0) &&
                     (reinterpret_cast<uintptr_t>(out) & 3) == 0;
  for (int64_t tt = blockIdx.y; tt < t_tiles; tt += gridDim.y) {
    const int64_t t0 = tt * kTile;
    for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
      const int r = i / kTile;
      const int c = i - r * kTile;
      const int64_t t = t0 + r;
      const int64_t k = k0 + c;
      int8_t qv = 0;
      if (t < T && k < K) {
        const int64_t src = rows != nullptr ? static_cast<int64_t>(rows[t]) : t;
        bool inside;
        float dh;
        DecodeAt(nibbles, flags, plane_stride, planes, src * K + k, qn, qp, &qv, &inside, &dh);
      }
      tile[r][c] = qv;
    }
    __syncthreads();
    if (!transpose) {
      for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
        const int r = i / kTile;
        const int c = i - r * kTile;
        if (t0 + r < T && k0 + c < K) out[(t0 + r) * K + k0 + c] = tile[r][c];
      }
    } else if (words) {  // four consecutive t per 4-byte store
      for (int i = threadIdx.x; i < kTile * kTile / 4; i += kThreads) {
        const int c = i / (kTile / 4);
        const int r = 4 * (i - c * (kTile / 4));
        if (k0 + c < K && t0 + r < T) {  // T % 4 == 0: all four are in range
          const uint32_t w = static_cast<uint32_t>(static_cast<uint8_t>(tile[r][c])) |
                             (static_cast<uint32_t>(static_cast<uint8_t>(tile[r + 1][c])) << 8) |
                             (static_cast<uint32_t>(static_cast<uint8_t>(tile[r + 2][c])) << 16) |
                             (static_cast<uint32_t>(static_cast<uint8_t>(tile[r + 3][c])) << 24);
          *reinterpret_cast<uint32_t*>(out + (k0 + c) * T + t0 + r) = w;
        }
      }
    } else {
      for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
        const int c = i / kTile;
        const int r = i - c * kTile;
        if (t0 + r < T && k0 + c < K) out[(k0 + c) * T + t0 + r] = tile[r][c];
      }
    }
    __syncthreads();
  }
}

// Transposed output out[K, T] (rows gathered or not), K % 8 == 0, nibbles
// 4-byte aligned, T % 4 == 0 and out 4-byte aligned (wide: T % 16 == 0 and
// out 16-byte aligned). Block tile: 128 columns k x 128 rows t, 4 warps of
// 32 t each; lane l takes the 8 columns 8 (l >> 1) .. +7 of the 16 rows
// 16 (l & 1) .. +15 of its warp's rows. Each thread issues all its loads
// first (the 16 rows' sources, then per row one 4-byte nibble load and one
// flag byte: a whole group of 8 elements; q needs no second plane), decodes
// each row's group to two words of q along k (DecodeGroupQ), transposes the
// 16 x 8 bytes into words along t (4 x 4 byte transposes, 8 byte permutes
// each), and stores them as out[k, t .. t+15] for each of its 8 columns: one
// 16-byte store (wide) or four 4-byte ones. Rows t >= T and columns k >= K
// are neither read nor written.
constexpr int kTrThreads = 128;
constexpr int kTrCols = 128;                 // k per block: 16 groups of 8
constexpr int kTrRows = 32 * (kTrThreads / 32);  // t per block: 32 per warp

// out[c] = byte c of each of a, b, c, d (a in byte 0): a 4 x 4 byte transpose.
__device__ __forceinline__ void Transpose4x4(uint32_t a, uint32_t b, uint32_t c, uint32_t d,
                                             uint32_t* out) {
  const uint32_t ab01 = __byte_perm(a, b, 0x5140);  // a0 b0 a1 b1
  const uint32_t cd01 = __byte_perm(c, d, 0x5140);
  const uint32_t ab23 = __byte_perm(a, b, 0x7362);  // a2 b2 a3 b3
  const uint32_t cd23 = __byte_perm(c, d, 0x7362);
  out[0] = __byte_perm(ab01, cd01, 0x5410);  // a0 b0 c0 d0
  out[1] = __byte_perm(ab01, cd01, 0x7632);
  out[2] = __byte_perm(ab23, cd23, 0x5410);
  out[3] = __byte_perm(ab23, cd23, 0x7632);
}

__global__ void __launch_bounds__(kTrThreads)
ResidualTransposeKernel(const uint8_t* __restrict__ nibbles,
                        const uint8_t* __restrict__ flags, int K, int T,
                        const int32_t* __restrict__ rows, int qn, int qp, bool wide,
                        int8_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int k = blockIdx.x * kTrCols + 8 * (lane >> 1);
  const bool col_ok = k < K;  // K % 8 == 0: the group is whole
  // Row r's group: nib_col[r * K / 2] (4-aligned), flag_col[r * K / 8] (one
  // wide multiply-add per address).
  const uint8_t* nib_col = nibbles + (k >> 1);
  const uint8_t* flag_col = flags + (k >> 3);
  const uint32_t k_half = static_cast<uint32_t>(K) >> 1, k_eighth = static_cast<uint32_t>(K) >> 3;
  const int t_tiles = (T + kTrRows - 1) / kTrRows;
  for (int tt = blockIdx.y; tt < t_tiles; tt += gridDim.y) {
    const int t0 = tt * kTrRows + 32 * warp + 16 * (lane & 1);
    int src[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int t = t0 + j;
      src[j] = -1;
      if (col_ok && t < T) src[j] = rows != nullptr ? rows[t] : t;
    }
    uint32_t nib[16], f0[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      nib[j] = 0u;
      f0[j] = 0u;
      if (src[j] >= 0) {
        const uint32_t r = static_cast<uint32_t>(src[j]);
        nib[j] = *reinterpret_cast<const uint32_t*>(nib_col + static_cast<uint64_t>(r) * k_half);
        f0[j] = flag_col[static_cast<uint64_t>(r) * k_eighth];
      }
    }
    if (col_ok) {
      uint2 q[16];  // row j: columns k .. k+3 (x), k+4 .. k+7 (y)
#pragma unroll
      for (int j = 0; j < 16; ++j) q[j] = DecodeGroupQ(nib[j], f0[j], qn, qp);
      uint32_t w[8][4];  // column k + b: rows t0 + 4m .. +3 in word m
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        uint32_t lo[4], hi[4];
        Transpose4x4(q[4 * m].x, q[4 * m + 1].x, q[4 * m + 2].x, q[4 * m + 3].x, lo);
        Transpose4x4(q[4 * m].y, q[4 * m + 1].y, q[4 * m + 2].y, q[4 * m + 3].y, hi);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          w[c][m] = lo[c];
          w[4 + c][m] = hi[c];
        }
      }
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        int8_t* dst = out + static_cast<int64_t>(k + b) * T + t0;  // 4-aligned (T % 4 == 0)
        if (wide) {  // T % 16 == 0: the 16 rows are all in range or all out
          if (t0 < T) *reinterpret_cast<uint4*>(dst) = make_uint4(w[b][0], w[b][1], w[b][2], w[b][3]);
        } else {  // T % 4 == 0: each word is all in range or all out
#pragma unroll
          for (int m = 0; m < 4; ++m) {
            if (t0 + 4 * m < T) reinterpret_cast<uint32_t*>(dst)[m] = w[b][m];
          }
        }
      }
    }
  }
}

// Gathered rows, not transposed: out[t, :] = row rows[t] of the residual,
// K % 8 == 0, nibbles 4-byte and out 8-byte aligned. Block (x, y): groups
// x * 1024 .. +1023 (8 elements each) of rows y, y + gridDim.y, ...; each
// thread loads 4 groups of the row (stride kThreads groups; one 4-byte
// nibble load and one flag byte each; q needs no second plane) before decoding them, then
// writes each group with one 8-byte store.
constexpr int kGatherGroups = 4;

__global__ void __launch_bounds__(kThreads)
ResidualGatherRowsKernel(const uint8_t* __restrict__ nibbles,
                         const uint8_t* __restrict__ flags, int64_t K, int64_t T,
                         const int32_t* __restrict__ rows, int qn, int qp,
                         int8_t* __restrict__ out) {
  const int64_t KG = K >> 3;  // groups per row
  const int64_t g0 = static_cast<int64_t>(blockIdx.x) * (kThreads * kGatherGroups) + threadIdx.x;
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    const int64_t src = rows[t];
    uint32_t nib[kGatherGroups], f0[kGatherGroups];
#pragma unroll
    for (int j = 0; j < kGatherGroups; ++j) {
      const int64_t g = g0 + j * kThreads;
      nib[j] = 0u;
      f0[j] = 0u;
      if (g < KG) LoadCodes(nibbles, flags, src * K + 8 * g, &nib[j], &f0[j]);
    }
#pragma unroll
    for (int j = 0; j < kGatherGroups; ++j) {
      const int64_t g = g0 + j * kThreads;
      if (g < KG) {
        *reinterpret_cast<uint2*>(out + t * K + 8 * g) =
            DecodeGroupQ(nib[j], f0[j], qn, qp);  // 8-aligned
      }
    }
  }
}

unsigned GridFor(int64_t groups) {
  int64_t blocks = CeilDiv(groups, kThreads);
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

ffi::Error ResidualValuesImpl(cudaStream_t stream, ffi::AnyBuffer nibbles,
                              ffi::AnyBuffer flags, ffi::AnyBuffer rows,
                              ffi::Result<ffi::AnyBuffer> q, int32_t qn, int32_t qp,
                              int32_t m, int32_t gather, int32_t transpose) {
  if (q->element_type() != ffi::DataType::S8 || rows.element_type() != ffi::DataType::S32) {
    return InvalidArgument("residual_values: q must be int8, rows int32");
  }
  auto qd = q->dimensions();
  if (qd.size() != 2 || m < 0) {
    return InvalidArgument("residual_values: q must be rank 2 and m >= 0");
  }
  const int64_t T = transpose ? qd[1] : qd[0];
  const int64_t K = transpose ? qd[0] : qd[1];
  if (gather ? static_cast<int64_t>(rows.element_count()) != T : T != m) {
    return InvalidArgument("residual_values: need len(rows) == output rows with gather,"
                           " else output rows == m");
  }
  int planes = 1;
  ffi::Error err = CheckResidual("residual_values", nibbles, flags, int64_t{m} * K, qn, qp,
                                 &planes);
  if (err.failure()) return err;
  if (T * K == 0) return ffi::Error::Success();
  const uint8_t* nib = reinterpret_cast<const uint8_t*>(nibbles.untyped_data());
  const uint8_t* flg = reinterpret_cast<const uint8_t*>(flags.untyped_data());
  int8_t* out = reinterpret_cast<int8_t*>(q->untyped_data());
  const int64_t Q = CeilDiv(int64_t{m} * K, 8);
  if (!gather && !transpose) {
    const int64_t total = T * K;
    const bool vec = IsAligned(nib, 4) && IsAligned(out, 8);
    ResidualValuesKernel<<<GridFor(CeilDiv(total, 8)), kThreads, 0, stream>>>(
        nib, flg, total, qn, qp, vec, out);
    return CheckLaunch("residual_values kernel launch");
  }
  const int32_t* rows_p = gather ? reinterpret_cast<const int32_t*>(rows.untyped_data()) : nullptr;
  const bool groups = K % 8 == 0 && IsAligned(nib, 4);  // whole, aligned groups of 8
  constexpr int64_t kInt32Max = 0x7FFFFFFF;
  if (groups && transpose && T % 4 == 0 && IsAligned(out, 4) && K <= kInt32Max - kTrCols &&
      T <= kInt32Max - kTrRows) {
    const int64_t k_blocks = CeilDiv(K, kTrCols);
    const int64_t t_blocks = CeilDiv(T, kTrRows);
    const dim3 grid(static_cast<unsigned>(k_blocks),
                    static_cast<unsigned>(t_blocks < 65535 ? t_blocks : 65535));
    const bool wide = T % 16 == 0 && IsAligned(out, 16);
    ResidualTransposeKernel<<<grid, kTrThreads, 0, stream>>>(
        nib, flg, static_cast<int>(K), static_cast<int>(T), rows_p, qn, qp, wide, out);
    return CheckLaunch("residual_values (transposed) kernel launch");
  }
  if (groups && !transpose && IsAligned(out, 8)) {  // gather (the plain case is above)
    const int64_t k_blocks = CeilDiv(K / 8, int64_t{kThreads} * kGatherGroups);
    if (k_blocks > 0x7FFFFFFF) return InvalidArgument("residual_values: too large");
    const dim3 grid(static_cast<unsigned>(k_blocks),
                    static_cast<unsigned>(T < 65535 ? T : 65535));
    ResidualGatherRowsKernel<<<grid, kThreads, 0, stream>>>(nib, flg, K, T, rows_p, qn, qp,
                                                            out);
    return CheckLaunch("residual_values (gathered rows) kernel launch");
  }
  const int64_t k_tiles = CeilDiv(K, kTile);
  const int64_t t_tiles = CeilDiv(T, kTile);
  if (k_tiles > 0x7FFFFFFF) return InvalidArgument("residual_values: too large");
  const dim3 grid(static_cast<unsigned>(k_tiles),
                  static_cast<unsigned>(t_tiles < 65535 ? t_tiles : 65535));
  ResidualTileKernel<<<grid, kThreads, 0, stream>>>(
      nib, flg, Q, planes, K, T, rows_p, transpose, qn, qp, out);
  return CheckLaunch("residual_values (tiled) kernel launch");
}

}  // namespace
}  // namespace cuda
}  // namespace jint4

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_residual_values, jint4::cuda::ResidualValuesImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()     // nibbles u8[P]
        .Arg<xla::ffi::AnyBuffer>()     // flags u8[F, Q]
        .Arg<xla::ffi::AnyBuffer>()     // rows s32[T] or [0]
        .Ret<xla::ffi::AnyBuffer>()     // q s8[T, K] or [K, T]
        .Attr<int32_t>("qn")
        .Attr<int32_t>("qp")
        .Attr<int32_t>("m")
        .Attr<int32_t>("gather")
        .Attr<int32_t>("transpose"));

// jint4_residual_values, jint4_lsq_backward and jint4_lsq_weight_backward
// (CUDA): decoders of the packed residual (README layout: nibble of element 2j
// in the low half of byte j; bit b of byte j of flag plane p = bit p of
// element 8j + b) and the LSQ backward of the weight. Whole groups of 8
// decode with word operations (DecodeGroupQ, ClipTops).
//   residual_values, plain: groups of 8 consecutive elements per thread (one
//     flag byte, four nibble bytes), grid-stride (ResidualValuesKernel).
//     With K % 8 == 0 and aligned pointers: transposed output (gathered or
//     not, T % 4 == 0): ResidualTransposeKernel, 16 rows x 8 columns per
//     thread transposed in registers, 16- or 4-byte stores; gathered rows,
//     not transposed: ResidualGatherRowsKernel, groups of 8 per thread.
//     Otherwise (ragged): 64 x 64 tiles decoded into shared memory
//     (ResidualTileKernel), then written row- or column-wise.
//   lsq_backward: chunks of 2048 elements of dT[M, K]; each element gathers
//     its gradient (the kept-row slots), applies the STE mask and adds its
//     delta term, then the chunk runs the block +-1 Hadamard, is scaled by
//     HadamardScale(L) and stored in dT's dtype. Full chunks with K % 8 ==
//     0 and aligned pointers: LsqBackwardChunksKernel (two chunks per block,
//     every load issued first, Hadamard in registers / warp shuffles:
//     ChunkHadamard8); the rest
//     (partial last chunk, ragged or misaligned): LsqBackwardKernel, through
//     shared memory (the same Butterfly calls on the same values).
//   lsq_weight_backward: Hadamard down the columns of kernel[D, C] (v = +-1
//     transform * QuantFactor; dk = +-1 transform * HadamardScale); blocks of
//     at most 16 rows: one thread per column, tiles in registers
//     (LsqWeightBackwardColumnsRegKernel); 32 rows: two threads per column,
//     16 rows each (LsqWeightBackwardColumnsPairKernel); larger blocks:
//     column tiles in shared memory (LsqWeightBackwardKernel).
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/jint4_math.h"
#include "cuda_common.h"
#include "cuda_ffi.h"
#include "device_util.cuh"
#include "handlers.h"

namespace jint4 {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 8192;

// The codes and first flag plane of the whole group of 8 elements at flat
// index e (a multiple of 8; nibbles 4-byte aligned): its four nibble bytes
// (one 4-byte load) and its flag byte. Enough for the q values (DecodeGroupQ).
__device__ __forceinline__ void LoadCodes(const uint8_t* __restrict__ nibbles,
                                          const uint8_t* __restrict__ flags, int64_t e,
                                          uint32_t* nib, uint32_t* f0) {
  *nib = *reinterpret_cast<const uint32_t*>(nibbles + (e >> 1));  // 4-aligned
  *f0 = flags[e >> 3];
}

// LoadCodes plus the second flag plane's byte (f1 stays as it is for one
// plane): the STE mask and delta of two-plane residuals need it.
__device__ __forceinline__ void LoadGroup(const uint8_t* __restrict__ nibbles,
                                          const uint8_t* __restrict__ flags,
                                          int64_t plane_stride, int planes, int64_t e,
                                          uint32_t* nib, uint32_t* f0, uint32_t* f1) {
  LoadCodes(nibbles, flags, e, nib, f0);
  if (planes == 2) *f1 = flags[plane_stride + (e >> 3)];
}

// SWAR decoders of a group of 8 (the same values as DecodeBackwardState of
// each element, from a few word operations per group instead of a dozen
// integer operations per element; the integer pipe bounds these kernels on
// Hopper).

// Elements 4h .. 4h+3 of a group as int8 q, element 4h + c in byte c:
// the code nibbles spread to bytes and sign-extended (two's complement
// nibble: bytes with bit 3 set get 0xF0); with one flag plane (qn <= 7) the
// bytes whose nibble is kClipCode (unsigned 8) take bit0 ? qp : -qn (qp4 /
// qn4: those values in every byte). Byte arithmetic never carries across
// bytes: every byte stays below 0x100 (w ^ 8 <= 15, + 0x7F <= 0x8E; 8 * 0x1E =
// 0xF0; the bit spread multiply places bits 0..3 of b at bits 0, 8, 16, 24
// with no two partial products on one bit).
__device__ __forceinline__ uint32_t DecodeHalfQ(uint32_t nib, uint32_t f0, int h, int qn,
                                                uint32_t qp4, uint32_t qn4) {
  const uint32_t x = __byte_perm(nib, 0u, h ? 0x3322 : 0x1100);  // nibble bytes b, b, b', b'
  const uint32_t w = (x & 0x000F000Fu) | ((x >> 4) & 0x0F000F00u);  // one nibble per byte
  const uint32_t q = w | ((w & 0x08080808u) * 0x1Eu);
  if (qn > 7) return q;  // two planes: the code is q
  const uint32_t inside_top = ((w ^ 0x08080808u) + 0x7F7F7F7Fu) & 0x80808080u;
  const uint32_t clip_mask = ((~inside_top & 0x80808080u) >> 7) * 0xFFu;
  const uint32_t bit0 = (((f0 >> (4 * h)) & 0xFu) * 0x00204081u) & 0x01010101u;
  const uint32_t bit0_mask = bit0 * 0xFFu;
  const uint32_t clip_value = (bit0_mask & qp4) | (~bit0_mask & qn4);
  return (clip_mask & clip_value) | (~clip_mask & q);
}

// qp and -qn (as int8) in every byte, for DecodeHalfQ.
__device__ __forceinline__ uint32_t ByteSplat(int v) {
  return static_cast<uint32_t>(static_cast<uint8_t>(v)) * 0x01010101u;
}

// The eight codes q of a group, one byte each, element b in byte b of the
// pair of words.
__device__ __forceinline__ uint2 DecodeGroupQ(uint32_t nib, uint32_t f0, int qn, int qp) {
  const uint32_t qp4 = ByteSplat(qp), qn4 = ByteSplat(-qn);
  return make_uint2(DecodeHalfQ(nib, f0, 0, qn, qp4, qn4), DecodeHalfQ(nib, f0, 1, qn, qp4, qn4));
}

// Bit 4b + 3 set for each clipped element b of a group with one flag plane
// (qn <= 7; the STE mask's zeros): its code nibble is kClipCode, 1000b
// (low3 + 7 sets bit 3 of its nibble exactly when low3 != 0, and never
// carries out of it).
__device__ __forceinline__ uint32_t ClipTops(uint32_t nib) {
  const uint32_t low3_nonzero = ((nib & 0x77777777u) + 0x77777777u) & 0x88888888u;
  return nib & ~low3_nonzero & 0x88888888u;
}

// (x & mask) != 0 ? a : b, written in PTX so that the test stays one
// logic-op-to-predicate (LLVM would rewrite a C++ bit test as shift, mask and
// compare: three integer operations instead of one).
template <uint32_t kMask>
__device__ __forceinline__ float SelectIfBits(uint32_t x, float a, float b) {
  float r;
  asm("{\n\t.reg .pred p;\n\t.reg .b32 t;\n\t"
      "and.b32 t, %1, %2;\n\tsetp.ne.u32 p, t, 0;\n\tselp.f32 %0, %3, %4, p;\n\t}"
      : "=f"(r) : "r"(x), "n"(kMask), "f"(a), "f"(b));
  return r;
}

// Element i of a group with one flag plane (ClipTops): acc += g[i] *
// delta_hat, v[i] = STE-masked g[i], delta_hat = clipped ? (bit0 ? qp : -qn)
// : (bit0 ? 0.5 : -0.5) (DecodeBackwardState; qp_f = qp, qn_f = -qn).
template <int i>
__device__ __forceinline__ void DecodeMaskDelta(uint32_t tops, uint32_t f0, float qp_f,
                                                float qn_f, const float* g, float* v,
                                                float* acc) {
  constexpr uint32_t kClip = 8u << (4 * i), kBit0 = 1u << i;
  const float dh = SelectIfBits<kClip>(tops, SelectIfBits<kBit0>(f0, qp_f, qn_f),
                                       SelectIfBits<kBit0>(f0, 0.5f, -0.5f));
  *acc = *acc + g[i] * dh;
  v[i] = SelectIfBits<kClip>(tops, 0.0f, g[i]);
}

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

constexpr int kChunk = 2048;  // multiple of the largest Hadamard block (1024)
constexpr int kChunksPerBlock = 2;

// Full chunks, vec (K % 8 == 0, grad and dt 16-byte aligned, nibbles 4-byte
// aligned): block b runs chunks kChunksPerBlock * b .. +1 (those below
// full_chunks); thread t holds elements 8t .. 8t+7 of each (one row, so one
// slot pair; one flag byte per plane, four nibble bytes). All of a thread's
// loads (slots, then the gradient rows, nibbles and flags of both chunks)
// are issued before any decoding; then per chunk: gather sum, STE mask and
// delta term, ChunkHadamard8 (registers / warp shuffles), 16-byte stores.
template <typename G, typename OutT, bool kGather>
__global__ void __launch_bounds__(kThreads)
LsqBackwardChunksKernel(const G* __restrict__ grad,
                        const int32_t* __restrict__ slots, int64_t M, int64_t K,
                        int64_t full_chunks, const uint8_t* __restrict__ nibbles,
                        const uint8_t* __restrict__ flags, int64_t plane_stride,
                        int planes, int qn, int qp, const int32_t* __restrict__ log2_ptr,
                        int max_log2, OutT* __restrict__ dt,
                        float* __restrict__ delta_sum) {
  __shared__ __align__(16) float sx[kChunk];
  static_assert(kChunk == 8 * kThreads, "8 elements per thread");
  constexpr int U = kChunksPerBlock;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * U;
  const int L = ClampedLog2(log2_ptr, max_log2);
  const float scale = HadamardScale(L);
  bool live[U];
  int64_t e0[U];
#pragma unroll
  for (int j = 0; j < U; ++j) {
    live[j] = first + j < full_chunks;  // uniform across the block
    e0[j] = (first + j) * kChunk + 8 * threadIdx.x;
  }
  float g[U][8];
  if (kGather) {
    int32_t s0[U], s1[U];
    int64_t k[U];
#pragma unroll
    for (int j = 0; j < U; ++j) {
      s0[j] = -1;
      s1[j] = -1;
      k[j] = 0;
      if (live[j]) {
        const int64_t t = e0[j] / K;
        k[j] = e0[j] - t * K;
        s0[j] = slots[t];
        s1[j] = slots[M + t];
      }
    }
#pragma unroll
    for (int j = 0; j < U; ++j) {
      float a[8], b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = b[i] = 0.0f;
      if (s0[j] >= 0) Load8(grad + static_cast<int64_t>(s0[j]) * K + k[j], a);
      if (s1[j] >= 0) Load8(grad + static_cast<int64_t>(s1[j]) * K + k[j], b);
#pragma unroll
      for (int i = 0; i < 8; ++i) g[j][i] = a[i] + b[i];
    }
  } else {
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (live[j]) {
        Load8(grad + e0[j], g[j]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) g[j][i] = 0.0f;
      }
    }
  }
  uint32_t nib[U], f0[U], f1[U];
#pragma unroll
  for (int j = 0; j < U; ++j) {
    nib[j] = 0u;
    f0[j] = 0u;
    f1[j] = 0u;
    if (live[j]) LoadGroup(nibbles, flags, plane_stride, planes, e0[j], &nib[j], &f0[j], &f1[j]);
  }
  float acc = 0.0f;
  const float qp_f = static_cast<float>(qp), qn_f = -static_cast<float>(qn);
#pragma unroll
  for (int j = 0; j < U; ++j) {
    if (!live[j]) continue;  // uniform: ChunkHadamard8's barriers are safe
    float v[8];
    if (qn <= 7) {  // uniform
      // DecodeBackwardState from two bit tests per element: clipped (the STE
      // mask's zero, ClipTops) and bit0; delta_hat = clipped ? (bit0 ? qp :
      // -qn) : bit0 - 0.5.
      const uint32_t tops = ClipTops(nib[j]);
      DecodeMaskDelta<0>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<1>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<2>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<3>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<4>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<5>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<6>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<7>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
    } else {  // two flag planes (qn == 8)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int8_t code = NibbleToInt(static_cast<uint8_t>((nib[j] >> (4 * i)) & 0xFu));
        const uint8_t fl =
            static_cast<uint8_t>(((f0[j] >> i) & 1u) | (((f1[j] >> i) & 1u) << 1));
        int8_t qv;
        bool inside;
        float dh;
        DecodeBackwardState(code, fl, qn, qp, &qv, &inside, &dh);
        acc = acc + g[j][i] * dh;
        v[i] = inside ? g[j][i] : 0.0f;
      }
    }
    ChunkHadamard8<kThreads>(v, L, sx);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] *= scale;
    Store8(dt + e0[j], v);
  }
  BlockSumToGlobal<kThreads>(acc, delta_sum);  // any summation order is allowed
}

// General path (the partial last chunk, or ragged / misaligned operands): one
// chunk per block, chunk first_chunk + blockIdx.x; element i of the chunk
// per thread i, i + kThreads, ...: gather, STE mask and delta term into
// shared memory, BlockHadamardSmem, store.
template <typename G, typename OutT>
__global__ void __launch_bounds__(kThreads)
LsqBackwardKernel(const G* __restrict__ grad, int64_t S,
                  const int32_t* __restrict__ slots, int64_t M, int64_t K,
                  const uint8_t* __restrict__ nibbles,
                  const uint8_t* __restrict__ flags, int64_t plane_stride,
                  int planes, int qn, int qp, const int32_t* __restrict__ log2_ptr,
                  int max_log2, int64_t first_chunk, OutT* __restrict__ dt,
                  float* __restrict__ delta_sum) {
  __shared__ __align__(16) float sx[kChunk];
  const int64_t total = M * K;
  const int64_t start = (first_chunk + blockIdx.x) * kChunk;
  const int len = static_cast<int>(total - start < kChunk ? total - start : kChunk);
  const int L = ClampedLog2(log2_ptr, max_log2);
  float acc = 0.0f;
  // Element e = start + i of row t, column k; i advances by kThreads.
  int64_t t = (start + threadIdx.x) / K;
  int64_t k = (start + threadIdx.x) - t * K;
  for (int i = threadIdx.x; i < len; i += kThreads) {
    float g;
    if (slots != nullptr) {
      const int32_t s0 = slots[t];
      const int32_t s1 = slots[M + t];
      const float a = s0 >= 0 ? ToFloat(grad[static_cast<int64_t>(s0) * K + k]) : 0.0f;
      const float b = s1 >= 0 ? ToFloat(grad[static_cast<int64_t>(s1) * K + k]) : 0.0f;
      g = a + b;
    } else {
      g = ToFloat(grad[start + i]);
    }
    int8_t qv;
    bool inside;
    float dh;
    DecodeAt(nibbles, flags, plane_stride, planes, start + i, qn, qp, &qv, &inside, &dh);
    acc = acc + g * dh;
    sx[i] = inside ? g : 0.0f;
    k += kThreads;
    while (k >= K) {
      k -= K;
      ++t;
    }
  }
  BlockHadamardSmem<kThreads>(sx, len, L);
  const float scale = HadamardScale(L);
  for (int i = threadIdx.x; i < len; i += kThreads) {
    dt[start + i] = FromFloat<OutT>(sx[i] * scale);
  }

  BlockSumToGlobal<kThreads>(acc, delta_sum);  // any summation order is allowed
}

// LSQ's backward for one kernel element with v = its column transform *
// QuantFactor and g its grad: adds g * delta(v) to *acc and returns the
// STE-masked g (lsq.py in_range and delta: inside [-qn, qp]; delta = the clip
// value outside, RoundEven(v) - v inside).
__device__ __forceinline__ float WeightMaskDelta(float v, float g, int qn, int qp, float* acc) {
  const bool inside = (v >= -qn) && (v <= qp);
  const float delta = v < -qn ? -static_cast<float>(qn)
                              : (v > qp ? static_cast<float>(qp) : RoundEven(v) - v);
  *acc = *acc + g * delta;
  return inside ? g : 0.0f;
}

// axis-0 register path (max_log2 <= 4; 32 rows: the pair kernel below):
// thread = column c (consecutive
// threads: consecutive columns, coalesced), kTiles consecutive tiles of TR =
// 2^max_log2 rows per step (at least 8 rows, so enough loads are in flight).
// It loads the TR kernel and TR grad values of each tile at once (the first
// tile unconditionally: it starts below R), RegisterHadamard on the kernel,
// v = k * QuantFactor, the delta term and the STE mask as
// LsqWeightBackwardKernel, RegisterHadamard on the masked grad, and stores
// the dk rows, converted as they are produced. Tiles past R (R % TR == 0)
// are skipped whole. (Two columns per thread, for 128-byte warp accesses of
// a 16-bit kernel, measured slower on an H200: 2.4 against 3.1 TB/s at
// [4096, 16384], tools/kernel_probe, session 7.)
constexpr int kColThreads = 256;

template <typename T, typename G, int TR>
__global__ void __launch_bounds__(kColThreads)
LsqWeightBackwardColumnsRegKernel(const G* __restrict__ grad,
                                  const T* __restrict__ kernel, int64_t R, int64_t S,
                                  const float* __restrict__ step_ptr,
                                  const int32_t* __restrict__ log2_ptr, int max_log2,
                                  int qn, int qp, T* __restrict__ dk,
                                  float* __restrict__ delta_sum) {
  constexpr int kTiles = TR >= 8 ? 1 : 8 / TR;
  constexpr int kRows = TR * kTiles;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  const int L = ClampedLog2(log2_ptr, max_log2);
  const float factor = QuantFactor(L, *step_ptr);
  const float scale = HadamardScale(L);
  const int64_t steps = CeilDivDev(R, kRows);
  float acc = 0.0f;
  if (c < S) {  // no early return: BlockSumToGlobal has a barrier
    for (int64_t rs = blockIdx.y; rs < steps; rs += gridDim.y) {
      const int64_t r0 = rs * kRows;
      bool live[kTiles];
      float kv[kRows], gv[kRows];
#pragma unroll
      for (int u = 0; u < kTiles; ++u) {
        live[u] = u == 0 || r0 + u * TR < R;  // whole tiles: TR divides R
#pragma unroll
        for (int i = u * TR; i < (u + 1) * TR; ++i) {
          kv[i] = 0.0f;
          gv[i] = 0.0f;
          if (live[u]) {
            const int64_t e = (r0 + i) * S + c;
            kv[i] = ToFloat(kernel[e]);
            gv[i] = ToFloat(grad[e]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kTiles; ++u) RegisterHadamard<TR>(kv + u * TR, L);
#pragma unroll
      for (int u = 0; u < kTiles; ++u) {
        if (!live[u]) continue;
#pragma unroll
        for (int i = u * TR; i < (u + 1) * TR; ++i) {
          gv[i] = WeightMaskDelta(kv[i] * factor, gv[i], qn, qp, &acc);
        }
      }
      T out[kRows];
#pragma unroll
      for (int u = 0; u < kTiles; ++u) {
        RegisterHadamard<TR>(gv + u * TR, L);
#pragma unroll
        for (int i = u * TR; i < (u + 1) * TR; ++i) out[i] = FromFloat<T>(gv[i] * scale);
      }
#pragma unroll
      for (int u = 0; u < kTiles; ++u) {
        if (!live[u]) continue;
#pragma unroll
        for (int i = u * TR; i < (u + 1) * TR; ++i) dk[(r0 + i) * S + c] = out[i];
      }
    }
  }
  BlockSumToGlobal<kColThreads>(acc, delta_sum);  // any summation order is allowed
}

// max_log2 == 5: the 32-row tile of a column split over two threads, rows
// 0-15 in warps 0-3 and rows 16-31 in warps 4-7 (the same lane of warps w
// and w + 4: the same column), so a thread holds 16 kernel and 16 grad
// values and twice as many warps fit on an SM (one thread per column needs
// about 100 registers at 32 rows, which held that kernel to a quarter of the
// SM's warps: latency-bound). A warp's row access stays 32 consecutive
// columns (two lanes per column within a warp, 16 columns per row access,
// measured twice as slow for 16-bit types on an H200). Hadamard stages 0-3
// run in registers, stage 4 (rows i and i + 16) through shared memory: the
// lower thread keeps a + b, the upper one a - b (Butterfly's two results,
// bit-identical); otherwise as LsqWeightBackwardColumnsRegKernel. Block: 128
// columns. R % 32 == 0.
constexpr int kPairCols = kColThreads / 2;

// Stage 4 of a 32-row column split as above: v holds rows 16 upper .. +15;
// x is the block's exchange buffer [2][16][kPairCols]. Starts and ends with
// a barrier.
__device__ __forceinline__ void ExchangeStage4(float* v, float (*x)[16][kPairCols], int upper,
                                               int col) {
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 16; ++i) x[upper][i][col] = v[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const float other = x[1 - upper][i][col];
    v[i] = upper ? other - v[i] : v[i] + other;
  }
}

template <typename T, typename G>
__global__ void __launch_bounds__(kColThreads)
LsqWeightBackwardColumnsPairKernel(const G* __restrict__ grad, const T* __restrict__ kernel,
                                   int64_t R, int64_t S, const float* __restrict__ step_ptr,
                                   const int32_t* __restrict__ log2_ptr, int qn, int qp,
                                   T* __restrict__ dk, float* __restrict__ delta_sum) {
  __shared__ float x[2][16][kPairCols];
  const int upper = threadIdx.x >= kPairCols;  // warps 4-7: rows 16-31
  const int col = threadIdx.x & (kPairCols - 1);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kPairCols + col;
  const bool col_ok = c < S;  // the same for both threads of a column
  const int L = ClampedLog2(log2_ptr, 5);
  const float factor = QuantFactor(L, *step_ptr);
  const float scale = HadamardScale(L);
  const int64_t tiles = R >> 5;
  float acc = 0.0f;
  for (int64_t rt = blockIdx.y; rt < tiles; rt += gridDim.y) {  // uniform: barriers below
    const int64_t r0 = (rt << 5) + 16 * upper;
    // All 32 loads in flight before any is used (raw values first: converted
    // on arrival, they would be issued pair by pair).
    T kraw[16];
    G graw[16];
    if (col_ok) {
      const T* kp = kernel + r0 * S + c;
      const G* gp = grad + r0 * S + c;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        kraw[i] = kp[i * S];
        graw[i] = gp[i * S];
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        kraw[i] = FromFloat<T>(0.0f);
        graw[i] = FromFloat<G>(0.0f);
      }
    }
    float kv[16], gv[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      kv[i] = ToFloat(kraw[i]);
      gv[i] = ToFloat(graw[i]);
    }
    RegisterHadamard<16>(kv, L);
    if (L > 4) ExchangeStage4(kv, x, upper, col);  // L uniform
#pragma unroll
    for (int i = 0; i < 16; ++i) gv[i] = WeightMaskDelta(kv[i] * factor, gv[i], qn, qp, &acc);
    RegisterHadamard<16>(gv, L);
    if (L > 4) ExchangeStage4(gv, x, upper, col);
    if (col_ok) {
#pragma unroll
      for (int i = 0; i < 16; ++i) dk[(r0 + i) * S + c] = FromFloat<T>(gv[i] * scale);
    }
  }
  BlockSumToGlobal<kColThreads>(acc, delta_sum);  // any summation order is allowed
}

// The register kernels for max_log2 <= 5 (grid: column blocks x row steps).
template <typename T, typename G>
void LaunchWeightColumnsReg(int max_log2, cudaStream_t stream, const G* grad,
                            const T* kernel, int64_t R, int64_t S, const float* step,
                            const int32_t* log2, int qn, int qp, T* dk, float* sum) {
  const int64_t cols = max_log2 == 5 ? kPairCols : kColThreads;
  const int rows_per_step = max_log2 >= 3 ? (1 << max_log2) : 8;  // the kernels' kRows
  const int64_t steps = CeilDiv(R, rows_per_step);
  const dim3 grid(static_cast<unsigned>(CeilDiv(S, cols)),
                  static_cast<unsigned>(steps < 65535 ? steps : 65535));
  switch (max_log2) {
#define JINT4_WCOLS_CASE(LG)                                                             \
  case LG:                                                                               \
    LsqWeightBackwardColumnsRegKernel<T, G, 1 << LG><<<grid, kColThreads, 0, stream>>>(  \
        grad, kernel, R, S, step, log2, max_log2, qn, qp, dk, sum);                      \
    break;
    JINT4_WCOLS_CASE(0)
    JINT4_WCOLS_CASE(1)
    JINT4_WCOLS_CASE(2)
    JINT4_WCOLS_CASE(3)
    JINT4_WCOLS_CASE(4)
#undef JINT4_WCOLS_CASE
    case 5:
      LsqWeightBackwardColumnsPairKernel<T, G><<<grid, kColThreads, 0, stream>>>(
          grad, kernel, R, S, step, log2, qn, qp, dk, sum);
      break;
    default: break;
  }
}

// Kernel side: tiles of 2^max_log2 rows x kColTile / 2^max_log2 columns of
// kernel[D, C] and grad[D, C], column-major in shared memory (as the axis-0
// quantize in quantize.cu), so each column segment is whole Hadamard blocks;
// one pad float per column (Padded) keeps the row-wise accesses conflict-free.
constexpr int kColTile = 2048;

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
LsqWeightBackwardKernel(const G* __restrict__ grad, const T* __restrict__ kernel,
                        int64_t R, int64_t S, const float* __restrict__ step_ptr,
                        const int32_t* __restrict__ log2_ptr, int max_log2, int qn, int qp,
                        T* __restrict__ dk, float* __restrict__ delta_sum) {
  __shared__ float sk[2 * kColTile];
  __shared__ float sg[2 * kColTile];
  const int TR = 1 << max_log2;
  const int TC = kColTile / TR;
  const int L = ClampedLog2(log2_ptr, max_log2);
  const float factor = QuantFactor(L, *step_ptr);
  const float scale = HadamardScale(L);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * TC;
  const int64_t row_tiles = R / TR;
  float acc = 0.0f;
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t r0 = rt * TR;
    for (int i = threadIdx.x; i < kColTile; i += kThreads) {
      const int r = i / TC;
      const int c = i - r * TC;
      const bool in = c0 + c < S;
      const int64_t e = (r0 + r) * S + c0 + c;
      const int p = Padded(c * TR + r, max_log2);
      sk[p] = in ? ToFloat(kernel[e]) : 0.0f;
      sg[p] = in ? ToFloat(grad[e]) : 0.0f;
    }
    BlockHadamardSmem<kThreads>(sk, kColTile, L, max_log2);
    for (int i = threadIdx.x; i < kColTile; i += kThreads) {
      const int p = Padded(i, max_log2);
      sg[p] = WeightMaskDelta(sk[p] * factor, sg[p], qn, qp, &acc);
    }
    BlockHadamardSmem<kThreads>(sg, kColTile, L, max_log2);
    for (int i = threadIdx.x; i < kColTile; i += kThreads) {
      const int r = i / TC;
      const int c = i - r * TC;
      if (c0 + c < S) {
        dk[(r0 + r) * S + c0 + c] = FromFloat<T>(sg[Padded(c * TR + r, max_log2)] * scale);
      }
    }
    __syncthreads();
  }
  BlockSumToGlobal<kThreads>(acc, delta_sum);  // any summation order is allowed
}

// Checks the residual buffers against the element count; returns planes.
ffi::Error CheckResidual(const char* op, ffi::AnyBuffer nibbles, ffi::AnyBuffer flags,
                         int64_t total, int32_t qn, int32_t qp, int* planes) {
  ffi::Error range = CheckQuantRange(qn, qp, op);
  if (range.failure()) return range;
  if (nibbles.element_type() != ffi::DataType::U8 ||
      flags.element_type() != ffi::DataType::U8) {
    return InvalidArgument(std::string(op) + ": nibbles and flags must be uint8");
  }
  *planes = qn <= 7 ? 1 : 2;
  if (static_cast<int64_t>(nibbles.element_count()) != CeilDiv(total, 2)) {
    return InvalidArgument(std::string(op) + ": nibbles must have ceil(M*K/2) bytes");
  }
  auto fd = flags.dimensions();
  if (fd.size() != 2 || fd[0] != *planes || fd[1] != CeilDiv(total, 8)) {
    return InvalidArgument(std::string(op) + ": flags must be u8[F, ceil(M*K/8)]");
  }
  return ffi::Error::Success();
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

ffi::Error LsqBackwardImpl(cudaStream_t stream, ffi::AnyBuffer grad,
                           ffi::AnyBuffer nibbles, ffi::AnyBuffer flags,
                           ffi::AnyBuffer slots, ffi::AnyBuffer log2_block,
                           ffi::Result<ffi::AnyBuffer> dt,
                           ffi::Result<ffi::AnyBuffer> delta_sum, int32_t qn,
                           int32_t qp, int32_t gather) {
  const FloatKind out_kind = KindOf(dt->element_type());
  const FloatKind grad_kind = KindOf(grad.element_type());
  if (grad_kind == FloatKind::kInvalid || out_kind == FloatKind::kInvalid ||
      slots.element_type() != ffi::DataType::S32 ||
      log2_block.element_type() != ffi::DataType::S32 ||
      delta_sum->element_type() != ffi::DataType::F32) {
    return InvalidArgument("lsq_backward: grad f32/bf16/f16, slots s32, log2_block s32, dt f32/bf16/f16,"
                           " delta_sum f32");
  }
  auto gd = grad.dimensions();
  auto dd = dt->dimensions();
  auto sd = slots.dimensions();
  if (gd.size() != 2 || dd.size() != 2 || sd.size() != 2 || sd[0] != 2 ||
      delta_sum->element_count() != 1 || log2_block.element_count() != 1) {
    return InvalidArgument("lsq_backward: grad[S, K], slots[2, M], dt[M, K], scalars");
  }
  const int64_t S = gd[0], K = gd[1], M = dd[0];
  if (dd[1] != K || (gather ? sd[1] != M : (sd[1] != 0 || S != M))) {
    return InvalidArgument("lsq_backward: dt must be [M, K] with slots [2, M] (gather) or"
                           " grad's shape (no gather)");
  }
  int planes = 1;
  ffi::Error err = CheckResidual("lsq_backward", nibbles, flags, M * K, qn, qp, &planes);
  if (err.failure()) return err;
  float* sum = reinterpret_cast<float*>(delta_sum->untyped_data());
  err = CheckCuda("lsq_backward memset", cudaMemsetAsync(sum, 0, sizeof(float), stream));
  if (err.failure()) return err;
  if (M * K == 0) return ffi::Error::Success();
  const int64_t chunks = CeilDiv(M * K, kChunk);
  if (chunks > 0x7FFFFFFF) return InvalidArgument("lsq_backward: too large");
  // Full chunks with whole, aligned groups of 8: the register kernel; the
  // rest (the partial last chunk, or everything otherwise): the general one.
  const bool vec = K % 8 == 0 && IsAligned(grad.untyped_data(), 16) &&
                   IsAligned(dt->untyped_data(), 16) && IsAligned(nibbles.untyped_data(), 4);
  const int64_t full = vec ? (M * K) / kChunk : 0;
  const int32_t* slots_p = gather ? reinterpret_cast<const int32_t*>(slots.untyped_data()) : nullptr;
  const uint8_t* nib_p = reinterpret_cast<const uint8_t*>(nibbles.untyped_data());
  const uint8_t* flag_p = reinterpret_cast<const uint8_t*>(flags.untyped_data());
  const int32_t* log2_p = reinterpret_cast<const int32_t*>(log2_block.untyped_data());
  const int64_t Q = CeilDiv(M * K, 8);
  const int max_log2 = MaxLog2Block(K);
  DispatchFloat(grad_kind, [&](auto gtag) {
    using G = decltype(gtag);
    const G* grad_p = reinterpret_cast<const G*>(grad.untyped_data());
    DispatchFloat(out_kind, [&](auto tag) {
      using OutT = decltype(tag);
      OutT* dt_p = reinterpret_cast<OutT*>(dt->untyped_data());
      if (full > 0) {
        const unsigned fb = static_cast<unsigned>(CeilDiv(full, kChunksPerBlock));
        if (gather) {
          LsqBackwardChunksKernel<G, OutT, true><<<fb, kThreads, 0, stream>>>(
              grad_p, slots_p, M, K, full, nib_p, flag_p, Q, planes, qn, qp, log2_p, max_log2,
              dt_p, sum);
        } else {
          LsqBackwardChunksKernel<G, OutT, false><<<fb, kThreads, 0, stream>>>(
              grad_p, slots_p, M, K, full, nib_p, flag_p, Q, planes, qn, qp, log2_p, max_log2,
              dt_p, sum);
        }
      }
      if (chunks > full) {
        LsqBackwardKernel<G, OutT><<<static_cast<unsigned>(chunks - full), kThreads, 0, stream>>>(
            grad_p, S, slots_p, M, K, nib_p, flag_p, Q, planes, qn, qp, log2_p, max_log2, full,
            dt_p, sum);
      }
    });
  });
  return CheckLaunch("lsq_backward kernel launch");
}

ffi::Error LsqWeightBackwardImpl(cudaStream_t stream, ffi::AnyBuffer grad,
                                 ffi::AnyBuffer kernel, ffi::AnyBuffer step,
                                 ffi::AnyBuffer log2_block, ffi::Result<ffi::AnyBuffer> dk,
                                 ffi::Result<ffi::AnyBuffer> delta_sum, int32_t qn, int32_t qp,
                                 int32_t log2_hint) {
  const FloatKind kind = KindOf(kernel.element_type());
  const bool grad_bf16 = grad.element_type() == ffi::DataType::BF16;
  if ((grad.element_type() != ffi::DataType::F32 && !grad_bf16) || kind == FloatKind::kInvalid ||
      dk->element_type() != kernel.element_type() ||
      step.element_type() != ffi::DataType::F32 ||
      log2_block.element_type() != ffi::DataType::S32 ||
      delta_sum->element_type() != ffi::DataType::F32) {
    return InvalidArgument("lsq_weight_backward: grad f32/bf16, kernel f32/bf16/f16, dk of the"
                           " kernel's dtype, step f32, log2_block s32, delta_sum f32");
  }
  ffi::Error range = CheckQuantRange(qn, qp, "lsq_weight_backward");
  if (range.failure()) return range;
  auto gd = grad.dimensions();
  auto kd = kernel.dimensions();
  auto dd = dk->dimensions();
  if (gd.size() != 2 || kd.size() != 2 || dd.size() != 2 || gd[0] != kd[0] ||
      gd[1] != kd[1] || dd[0] != kd[0] || dd[1] != kd[1] || step.element_count() != 1 ||
      log2_block.element_count() != 1 || delta_sum->element_count() != 1) {
    return InvalidArgument("lsq_weight_backward: grad, kernel and dk must be [D, C];"
                           " step, log2_block and delta_sum scalars");
  }
  const int64_t R = kd[0], S = kd[1];
  float* sum = reinterpret_cast<float*>(delta_sum->untyped_data());
  ffi::Error err = CheckCuda("lsq_weight_backward memset",
                             cudaMemsetAsync(sum, 0, sizeof(float), stream));
  if (err.failure()) return err;
  if (R * S == 0) return ffi::Error::Success();
  int max_log2;
  dim3 grid;
  if (!ColumnTiling(R, S, log2_hint, kColTile, &max_log2, &grid)) {
    return InvalidArgument("lsq_weight_backward: too large");
  }
  const void* grad_p = grad.untyped_data();
  const float* step_p = reinterpret_cast<const float*>(step.untyped_data());
  const int32_t* log2_p = reinterpret_cast<const int32_t*>(log2_block.untyped_data());
  // (ColumnTiling caps max_log2 at the static block, so a traced block
  // larger than 32 rows takes the shared-memory kernel below.)
  if (max_log2 <= 5) {
    if (CeilDiv(S, kPairCols) > 0x7FFFFFFF) return InvalidArgument("lsq_weight_backward: too large");
    DispatchFloat(kind, [&](auto tag) {
      using T = decltype(tag);
      const T* k_p = reinterpret_cast<const T*>(kernel.untyped_data());
      T* dk_p = reinterpret_cast<T*>(dk->untyped_data());
      if (grad_bf16) {
        LaunchWeightColumnsReg<T>(max_log2, stream, static_cast<const __nv_bfloat16*>(grad_p),
                                  k_p, R, S, step_p, log2_p, qn, qp, dk_p, sum);
      } else {
        LaunchWeightColumnsReg<T>(max_log2, stream, static_cast<const float*>(grad_p), k_p, R, S,
                                  step_p, log2_p, qn, qp, dk_p, sum);
      }
    });
    return CheckLaunch("lsq_weight_backward kernel launch");
  }
  DispatchFloat(kind, [&](auto tag) {
    using T = decltype(tag);
    const T* k_p = reinterpret_cast<const T*>(kernel.untyped_data());
    T* dk_p = reinterpret_cast<T*>(dk->untyped_data());
    if (grad_bf16) {
      LsqWeightBackwardKernel<T><<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(grad_p), k_p, R, S, step_p, log2_p, max_log2, qn, qp,
          dk_p, sum);
    } else {
      LsqWeightBackwardKernel<T><<<grid, kThreads, 0, stream>>>(
          static_cast<const float*>(grad_p), k_p, R, S, step_p, log2_p, max_log2, qn, qp, dk_p,
          sum);
    }
  });
  return CheckLaunch("lsq_weight_backward kernel launch");
}

}  // namespace
}  // namespace cuda
}  // namespace jint4

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_lsq_weight_backward, jint4::cuda::LsqWeightBackwardImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()     // grad f32 | bf16 [D, C]
        .Arg<xla::ffi::AnyBuffer>()     // kernel f32 | bf16 | f16 [D, C]
        .Arg<xla::ffi::AnyBuffer>()     // step f32[]
        .Arg<xla::ffi::AnyBuffer>()     // log2_block s32[]
        .Ret<xla::ffi::AnyBuffer>()     // dk [D, C], the kernel's dtype
        .Ret<xla::ffi::AnyBuffer>()     // delta_sum f32[]
        .Attr<int32_t>("qn")
        .Attr<int32_t>("qp")
        .Attr<int32_t>("log2_hint"));

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_lsq_backward, jint4::cuda::LsqBackwardImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()     // grad f32 | bf16 | f16 [S, K]
        .Arg<xla::ffi::AnyBuffer>()     // nibbles u8[P]
        .Arg<xla::ffi::AnyBuffer>()     // flags u8[F, Q]
        .Arg<xla::ffi::AnyBuffer>()     // slots s32[2, M] or [2, 0]
        .Arg<xla::ffi::AnyBuffer>()     // log2_block s32[]
        .Ret<xla::ffi::AnyBuffer>()     // dt f32 | bf16 | f16 [M, K]
        .Ret<xla::ffi::AnyBuffer>()     // delta_sum f32[]
        .Attr<int32_t>("qn")
        .Attr<int32_t>("qp")
        .Attr<int32_t>("gather"));

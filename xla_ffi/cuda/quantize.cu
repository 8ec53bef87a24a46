// jint4_hadamard_quantize (CUDA). axis = 1 (activations): fused
// block-diagonal Hadamard + LSQ quantize + packed backward residual + row
// norms over chunks of kHqChunk = 2048 consecutive elements of the
// row-major x[M, K]. Full, aligned chunks run in registers,
// kHqChunksPerBlock per block with all their loads issued first
// (HadamardQuantizeChunksKernel: ChunkHadamard8, then QuantizeFullChunk);
// the partial last chunk (and everything when a pointer is misaligned) runs
// through shared memory (HadamardQuantizeKernel).
//
// Why flat chunks work: the Hadamard block 2^L divides K (L is clamped to the
// largest such power, <= 10), so every flat index that is a multiple of 2^L
// starts a Hadamard block of some row; a chunk starts at a multiple of kChunk
// (a multiple of 1024 >= 2^L) and holds whole blocks, also the last, partial
// one (M*K is a multiple of 2^L). The butterfly pairs of HadamardInPlace never
// cross a chunk, and each pair is the same float operation in any order, so
// the result is bit-identical to the reference (both paths make the same
// Butterfly calls on the same values). A chunk also starts at a
// multiple of 8, so it owns whole nibble bytes and flag bytes; only the last
// chunk has padding, which is exactly the README's zero padding.
//
// Every path runs the butterflies on x * Pow2(-L) and quantizes v = (y *
// QuantFactor) * Pow2(L) (the float contract of jint4_math.h: one multiply
// per element on load and one at the end, so the +-1 sums of a finite x
// never overflow).
//
// axis = 0 (a Flax kernel[D, C], Hadamard down each column): blocks of at
// most 32 rows (max_log2 <= 5) run HadamardQuantizeColumnsRegKernel, one
// thread per column segment in registers; larger blocks take
// HadamardQuantizeColumnsKernel, which stages a tile of 2^max_log2 rows (the
// static block when known: log2_hint) x TC = 4096 / 2^max_log2 columns
// column-major in shared memory, so each column segment is a run of whole
// Hadamard blocks for the same ButterflyPass. Both write q as [R, S] or,
// transposed, [S, R] (the forward GEMM's K-major operand).
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

constexpr int kHqThreads = 256;
constexpr int kHqChunk = 2048;  // multiple of 1024 (largest block) and of 8
static_assert(kHqChunk % 1024 == 0 && kHqChunk % 8 == 0, "chunk size");
static_assert(kHqChunk == 8 * kHqThreads, "register path: 8 elements per thread");

// The NaN of a poisoned row norm or weight column.
__device__ __forceinline__ float QuietNaN() { return __int_as_float(0x7FC00000); }

// Row statistics for the residual's norms: the integer sum of q^2 and a
// non-finite flag per row, either per chunk in shared memory (first_row: the
// chunk's first row; flushed to the global accumulators at the end) or
// straight in the global int32 accumulators (first_row 0).
struct RowStats {
  int* sum;   // [rows] from first_row
  int* bad;
  int64_t first_row;
  int64_t K;

  // Adds the run of elements [e, e + n) (one row) of this thread.
  __device__ __forceinline__ void Add(int64_t row, int q2, bool nonfinite) {
    const int64_t i = row - first_row;
    if (q2) atomicAdd(&sum[i], q2);
    if (nonfinite) atomicOr(&bad[i], 1);
  }
};

// Adds element k's (q^2, non-finite) of a thread's group starting at flat e0
// to the row statistics, one atomic per row run.
__device__ __forceinline__ void AccumulateRows(RowStats& st, int64_t e0, int n,
                                               const int* q2, const bool* nonfinite) {
  int64_t row = e0 / st.K;
  int64_t row_end = (row + 1) * st.K;
  int acc = 0;
  bool bad = false;
  for (int k = 0; k < n; ++k) {
    if (e0 + k >= row_end) {
      st.Add(row, acc, bad);
      ++row;
      row_end += st.K;
      acc = 0;
      bad = false;
    }
    acc += q2[k];
    bad = bad || nonfinite[k];
  }
  st.Add(row, acc, bad);
}

// AccumulateRows for a full warp whose lanes each hold 8 consecutive
// elements (the warp's 256 start at a multiple of 256): when all 256 lie in
// one row, one warp reduction and one atomic instead of 32 contending ones.
// k256 = K / 256 when K % 256 == 0 (and the element count < 2^40): then the
// warp's elements always share row (e0 / 256) / k256, one 32-bit division;
// 0: the general test with 64-bit divisions.
__device__ __forceinline__ void AccumulateRowsWarp(RowStats& st, int64_t e0, uint32_t k256,
                                                   const int* q2, const bool* nonfinite) {
  int64_t row;
  bool one_row;
  if (k256 != 0) {
    row = static_cast<uint32_t>(e0 >> 8) / k256;
    one_row = true;
  } else {
    row = e0 / st.K;
    const bool single = (e0 + 7) / st.K == row;
    const int64_t row0 = __shfl_sync(0xffffffffu, row, 0);
    one_row = __all_sync(0xffffffffu, single && row == row0);
  }
  if (one_row) {
    int sum = 0;
    bool bad = false;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      sum += q2[k];
      bad = bad || nonfinite[k];
    }
    sum = WarpSumInt(sum);
    bad = __any_sync(0xffffffffu, bad);
    if ((threadIdx.x & 31) == 0) st.Add(row, sum, bad);
  } else {
    AccumulateRows(st, e0, 8, q2, nonfinite);
  }
}

__device__ __forceinline__ bool NonFinite(float v) { return !isfinite(v); }

// The low nibbles of the eight bytes of w (element k at byte k) as one
// word, element k at bits 4k .. 4k + 3: each word's bytes 0 and 2 take the
// nibbles of elements (0, 1) and (2, 3), then one byte permute joins them.
__device__ __forceinline__ uint32_t PackNibbles8(uint2 w) {
  const uint32_t x0 = (w.x & 0x0F0F0F0Fu) | ((w.x >> 4) & 0xF0F0F0F0u);
  const uint32_t x1 = (w.y & 0x0F0F0F0Fu) | ((w.y >> 4) & 0xF0F0F0F0u);
  return __byte_perm(x0, x1, 0x6420);
}

// acc + (bit 31 of w) << k, on the multiply-add pipe (PTX, so that the
// high-word multiply stays one): hi(w * 2) is w's bit 31.
__device__ __forceinline__ uint32_t Bit31Into(uint32_t w, int k, uint32_t acc) {
  uint32_t bit;
  asm("mul.hi.u32 %0, %1, 2;" : "=r"(bit) : "r"(w));
  return bit * (1u << k) + acc;
}

// A full, aligned chunk whose 8 elements per thread (8t .. 8t+7) are
// already in v (loaded by the caller, so that several chunks' loads are in
// flight at once): ChunkHadamard8 of v * down, v = (y * factor) * up (the
// float contract: down = Pow2(-L), factor = QuantFactor, up = Pow2(L)), then
// QuantizeEncode per element (noise: one UniformPair per two), byte-permute
// packing, one 8-byte q store, one 4-byte nibble store, one flag byte per
// plane, and the row statistics. The same Butterfly calls on the same values
// as the shared-memory path.
// kWarpRows (K % 256 == 0): a warp's 256 elements lie in one row, so the
// row statistics are one warp sum: the sum of q^2 accumulates in float
// (exact: integers <= 8 * 64 per thread) and non-finite inputs are found by
// an FMA chain of x * 0 (0 for finite x, NaN for NaN or +-Inf) instead of a
// compare per element. Otherwise every element keeps its own q^2 and flag
// for AccumulateRowsWarp's general path.
template <bool kResidual, bool kWarpRows>
__device__ __forceinline__ void QuantizeFullChunk(
    float* v, int64_t start, int L, float* sx, float down, float factor, float up,
    uint32_t seed0, uint32_t seed1, int qn, int qp, int planes,
    int8_t* __restrict__ q, uint8_t* __restrict__ nibbles,
    uint8_t* __restrict__ flags, int64_t plane_stride, uint32_t k256, RowStats& stats) {
  const int tid = threadIdx.x;
  float poison = 0.0f;
  bool nonfinite[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    if (kResidual && kWarpRows) poison = __fmaf_rn(v[k], 0.0f, poison);
    if (kResidual && !kWarpRows) nonfinite[k] = NonFinite(v[k]);
    v[k] *= down;
  }
  ChunkHadamard8<kHqThreads>(v, L, sx);
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = (v[k] * factor) * up;

  const int64_t e0 = start + 8 * tid;
  const float lo = -static_cast<float>(qn);
  const float hi = static_cast<float>(qp);
  const bool clip_code = qn <= 7;
  float u[8];
  if (kResidual) {
    Uniform8(seed0, seed1, static_cast<uint32_t>(e0), u);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) u[k] = 0.0f;
  }
  uint32_t qb[8], cb[8];
  uint32_t f0 = 0, f1 = 0;
  float q2sum = 0.0f;
  int q2[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const ElementCodes ec = QuantizeEncode(v[k], u[k], lo, hi, clip_code);
    qb[k] = ec.q_bits;
    cb[k] = ec.code_bits;
    f0 = Bit31Into(ec.bit0_word, k, f0);
    if (kWarpRows) {
      q2sum = __fmaf_rn(ec.q, ec.q, q2sum);
    } else {
      q2[k] = __float2int_rn(ec.q * ec.q);
    }
  }
  const uint2 qw = PackLowBytes8(qb);
  *reinterpret_cast<uint2*>(q + e0) = qw;
  if (!kResidual) return;
  *reinterpret_cast<uint32_t*>(nibbles + (e0 >> 1)) = PackNibbles8(PackLowBytes8(cb));
  flags[e0 >> 3] = static_cast<uint8_t>(f0);
  if (planes == 2) {  // qn == 8 only: ElementCodes::clipped, recomputed here
    // rather than kept through the loop (8 live bits in the common qn <= 7 case)
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      f1 |= static_cast<uint32_t>(ClampMinMax(v[k], lo, hi) != v[k]) << k;
    }
    flags[plane_stride + (e0 >> 3)] = static_cast<uint8_t>(f1);
  }
  if (kWarpRows) {
    const int64_t row = static_cast<uint32_t>(e0 >> 8) / k256;
    const int sum = WarpSumInt(__float2int_rn(q2sum));
    const bool bad = __any_sync(0xffffffffu, poison != poison);
    if ((threadIdx.x & 31) == 0) stats.Add(row, sum, bad);
  } else {
    AccumulateRowsWarp(stats, e0, 0, q2, nonfinite);
  }
}

// Full, aligned chunks: kHqChunksPerBlock consecutive chunks per block,
// every chunk's 16-byte loads issued before any of them is transformed (a
// chunk alone keeps too few bytes in flight to cover the DRAM latency); row
// statistics go straight to the global accumulators (one atomic per warp
// and row).
constexpr int kHqChunksPerBlock = 2;

template <typename T, bool kResidual, bool kWarpRows>
__global__ void __launch_bounds__(kHqThreads)
HadamardQuantizeChunksKernel(const T* __restrict__ x, int64_t full_chunks, int64_t K,
                             const float* __restrict__ step_ptr,
                             const uint32_t* __restrict__ seed,
                             const int32_t* __restrict__ log2_ptr, int max_log2,
                             int qn, int qp, int planes,
                             int8_t* __restrict__ q, uint8_t* __restrict__ nibbles,
                             uint8_t* __restrict__ flags, int64_t plane_stride,
                             uint32_t k256, int* __restrict__ row_sum,
                             int* __restrict__ row_bad) {
  __shared__ __align__(16) float sx[kHqChunk];
  constexpr int U = kHqChunksPerBlock;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * U;
  float v[U][8];
#pragma unroll
  for (int j = 0; j < U; ++j) {
    if (first + j < full_chunks) Load8(x + (first + j) * kHqChunk + 8 * threadIdx.x, v[j]);
  }
  const int L = ClampedLog2(log2_ptr, max_log2);
  const float factor = QuantFactor(L, *step_ptr);
  const float down = Pow2(-L), up = Pow2(L);
  const uint32_t seed0 = kResidual ? seed[0] : 0u;
  const uint32_t seed1 = kResidual ? seed[1] : 0u;
  RowStats stats{row_sum, row_bad, 0, K};
#pragma unroll
  for (int j = 0; j < U; ++j) {
    if (first + j < full_chunks) {  // uniform across the block
      QuantizeFullChunk<kResidual, kWarpRows>(v[j], (first + j) * kHqChunk, L, sx, down,
                                              factor, up, seed0, seed1, qn, qp, planes, q,
                                              nibbles, flags, plane_stride, k256, stats);
    }
  }
}

// General path (the partial last chunk, or misaligned pointers): one chunk
// per block, starting at chunk `first_chunk`, through shared memory.
template <typename T>
__global__ void __launch_bounds__(kHqThreads)
HadamardQuantizeKernel(const T* __restrict__ x, int64_t total, int64_t K,
                       const float* __restrict__ step_ptr,
                       const uint32_t* __restrict__ seed,
                       const int32_t* __restrict__ log2_ptr, int max_log2,
                       int qn, int qp, int with_residual, int planes,
                       int8_t* __restrict__ q, uint8_t* __restrict__ nibbles,
                       uint8_t* __restrict__ flags, int64_t plane_stride,
                       int* __restrict__ row_sum, int* __restrict__ row_bad,
                       int64_t first_chunk) {
  __shared__ __align__(16) float sx[kHqChunk];
  __shared__ int8_t scode[kHqChunk];
  __shared__ uint8_t sflag[kHqChunk];
  __shared__ int s_sum[kHqChunk];
  __shared__ int s_bad[kHqChunk];

  const int64_t start = (first_chunk + blockIdx.x) * kHqChunk;
  const int64_t rest = total - start;
  const int len = static_cast<int>(rest < kHqChunk ? rest : kHqChunk);
  const int tid = threadIdx.x;

  const int L = ClampedLog2(log2_ptr, max_log2);
  const float factor = QuantFactor(L, *step_ptr);
  const float down = Pow2(-L), up = Pow2(L);  // the float contract
  const uint32_t seed0 = seed[0];
  const uint32_t seed1 = seed[1];

  RowStats stats{s_sum, s_bad, start / K, K};
  const int chunk_rows = static_cast<int>((start + len - 1) / K - stats.first_row + 1);
  if (with_residual) {
    for (int i = tid; i < chunk_rows; i += kHqThreads) {
      s_sum[i] = 0;
      s_bad[i] = 0;
    }
    __syncthreads();
  }

  // General path through shared memory (partial last chunk, odd alignment).
  for (int i = tid; i < len; i += kHqThreads) {
    const float v = ToFloat(x[start + i]);
    sx[i] = v * down;
    if (with_residual && NonFinite(v)) {
      atomicOr(&s_bad[(start + i) / K - stats.first_row], 1);
    }
  }
  BlockHadamardSmem<kHqThreads>(sx, len, L);

  // Groups of 4 consecutive elements per thread: one 4-byte store of q.
  const bool q_aligned = (reinterpret_cast<uintptr_t>(q) & 3) == 0;
  for (int i0 = tid * 4; i0 < len; i0 += kHqThreads * 4) {
    const int n = len - i0 < 4 ? len - i0 : 4;
    uint32_t packed = 0;
    int q2[4] = {0, 0, 0, 0};
    const bool none[4] = {false, false, false, false};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < n) {
        const int i = i0 + k;
        const float v = (sx[i] * factor) * up;
        const int8_t qv = QuantizeCode(v, qn, qp);
        q2[k] = static_cast<int>(qv) * static_cast<int>(qv);
        packed |= static_cast<uint32_t>(static_cast<uint8_t>(qv)) << (8 * k);
        if (with_residual) {
          const float u = Uniform(seed0, seed1, static_cast<uint32_t>(start + i));
          int8_t code;
          uint8_t fl;
          EncodeBackwardState(v, u, qn, qp, &code, &fl);
          scode[i] = code;
          sflag[i] = fl;
        }
      }
    }
    if (n == 4 && q_aligned) {
      *reinterpret_cast<uint32_t*>(q + start + i0) = packed;  // start + i0 % 4 == 0
    } else {
      for (int k = 0; k < n; ++k) q[start + i0 + k] = static_cast<int8_t>((packed >> (8 * k)) & 0xFF);
    }
    if (with_residual) AccumulateRows(stats, start + i0, n, q2, none);
  }
  if (with_residual) {
    const int len8 = (len + 7) & ~7;  // <= kHqChunk
    for (int i = len + tid; i < len8; i += kHqThreads) {
      scode[i] = 0;  // padding bits are 0
      sflag[i] = 0;
    }
    __syncthreads();
    const int groups = len8 >> 3;
    const bool nib_aligned = (reinterpret_cast<uintptr_t>(nibbles) & 3) == 0;
    for (int g = tid; g < groups; g += kHqThreads) {
      const int e = g << 3;
      const int64_t nib0 = (start + e) >> 1;  // start + e is a multiple of 8
      uint32_t nib = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t lo = static_cast<uint32_t>(static_cast<uint8_t>(scode[e + 2 * k])) & 0xFu;
        const uint32_t hi = static_cast<uint32_t>(static_cast<uint8_t>(scode[e + 2 * k + 1])) & 0xFu;
        nib |= (lo | (hi << 4)) << (8 * k);
      }
      if (e + 8 <= len && nib_aligned) {
        *reinterpret_cast<uint32_t*>(nibbles + nib0) = nib;  // nib0 % 4 == 0
      } else {
        for (int k = 0; k < 4; ++k) {
          if (e + 2 * k < len) nibbles[nib0 + k] = static_cast<uint8_t>((nib >> (8 * k)) & 0xFF);
        }
      }
      uint32_t f0 = 0, f1 = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        f0 |= static_cast<uint32_t>(sflag[e + b] & 1) << b;
        f1 |= static_cast<uint32_t>((sflag[e + b] >> 1) & 1) << b;
      }
      const int64_t fb = (start + e) >> 3;
      flags[fb] = static_cast<uint8_t>(f0);
      if (planes == 2) flags[plane_stride + fb] = static_cast<uint8_t>(f1);
    }
  }
  if (!with_residual) return;  // uniform across the block
  __syncthreads();
  for (int i = tid; i < chunk_rows; i += kHqThreads) {
    const int64_t r = stats.first_row + i;
    if (s_sum[i]) atomicAdd(&row_sum[r], s_sum[i]);
    if (s_bad[i]) atomicOr(&row_bad[r], 1);
  }
}

__global__ void __launch_bounds__(kHqThreads)
RowNormsKernel(int64_t rows, const int* __restrict__ row_sum,
               const int* __restrict__ row_bad, float* __restrict__ norms) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       r < rows; r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    norms[r] = row_bad[r] ? QuietNaN() : sqrtf(static_cast<float>(row_sum[r]));
  }
}

// axis = 0: a tile of TR = 2^max_log2 rows x TC columns (TR * TC = kColTile)
// per step, column-major in shared memory.
constexpr int kColTile = 4096;

template <typename T>
__global__ void __launch_bounds__(kHqThreads)
HadamardQuantizeColumnsKernel(const T* __restrict__ x, int64_t R, int64_t S,
                              const float* __restrict__ step_ptr,
                              const int32_t* __restrict__ log2_ptr, int max_log2,
                              int qn, int qp, int8_t* __restrict__ q_rows,
                              int8_t* __restrict__ q_cols, float* __restrict__ col_poison) {
  // Column c, row r of the tile at sx[Padded(c * TR + r)]: one pad float per
  // column, so the row-wise loads and stores hit distinct banks.
  __shared__ float sx[2 * kColTile];
  const int TR = 1 << max_log2;
  const int TC = kColTile / TR;
  const int L = ClampedLog2(log2_ptr, max_log2);
  const float factor = QuantFactor(L, *step_ptr);
  const float down = Pow2(-L), up = Pow2(L);  // the float contract
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * TC;
  const int64_t row_tiles = R / TR;
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t r0 = rt * TR;
    for (int i = threadIdx.x; i < kColTile; i += kHqThreads) {
      const int r = i / TC;
      const int c = i - r * TC;
      const float f = c0 + c < S ? ToFloat(x[(r0 + r) * S + c0 + c]) : 0.0f;
      if (col_poison != nullptr && !isfinite(f)) col_poison[c0 + c] = QuietNaN();
      sx[Padded(c * TR + r, max_log2)] = f * down;
    }
    BlockHadamardSmem<kHqThreads>(sx, kColTile, L, max_log2);
    if (q_cols != nullptr) {  // q_cols[S, R]: runs of TR bytes along r
      for (int i = threadIdx.x; i < kColTile; i += kHqThreads) {
        const int c = i / TR;
        const int r = i - c * TR;
        if (c0 + c < S) {
          q_cols[(c0 + c) * R + r0 + r] =
              QuantizeCode((sx[Padded(i, max_log2)] * factor) * up, qn, qp);
        }
      }
    }
    if (q_rows != nullptr) {  // q_rows[R, S]: runs of TC bytes along c
      for (int i = threadIdx.x; i < kColTile; i += kHqThreads) {
        const int r = i / TC;
        const int c = i - r * TC;
        if (c0 + c < S) {
          q_rows[(r0 + r) * S + c0 + c] =
              QuantizeCode((sx[Padded(c * TR + r, max_log2)] * factor) * up, qn, qp);
        }
      }
    }
    __syncthreads();
  }
}

// axis = 0 with blocks of at most 32 rows (max_log2 <= 5, the common static
// block): thread = one column c of one tile of TR = 2^max_log2 rows. Its TR
// loads (consecutive threads: consecutive columns, coalesced) are all in
// flight at once, the Hadamard runs in registers (RegisterHadamard), and the
// codes are stored as q_rows[R, S] (one byte per row; a warp writes 32
// consecutive bytes) and/or q_cols[S, R] (the thread's TR codes are
// contiguous: 16-byte stores when TR >= 16 and `wide` (R % 16 == 0, q_cols
// 16-byte aligned), else 4-byte stores when TR >= 4); a null pointer skips
// that layout.
constexpr int kColThreads = 256;

template <typename T, int TR>
__global__ void __launch_bounds__(kColThreads)
HadamardQuantizeColumnsRegKernel(const T* __restrict__ x, int64_t R, int64_t S,
                                 const float* __restrict__ step_ptr,
                                 const int32_t* __restrict__ log2_ptr, int max_log2,
                                 int qn, int qp, bool wide, int8_t* __restrict__ q_rows,
                                 int8_t* __restrict__ q_cols, float* __restrict__ col_poison) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  if (c >= S) return;
  const int L = ClampedLog2(log2_ptr, max_log2);
  const float factor = QuantFactor(L, *step_ptr);
  const float down = Pow2(-L), up = Pow2(L);  // the float contract
  const int64_t row_tiles = R / TR;
  bool bad = false;  // a NaN or Inf among this thread's elements of column c
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t r0 = rt * TR;
    float v[TR];
#pragma unroll
    for (int i = 0; i < TR; ++i) v[i] = ToFloat(x[(r0 + i) * S + c]);
#pragma unroll
    for (int i = 0; i < TR; ++i) {
      bad |= !isfinite(v[i]);
      v[i] *= down;
    }
    RegisterHadamard<TR>(v, L);
    int8_t code[TR];
#pragma unroll
    for (int i = 0; i < TR; ++i) code[i] = QuantizeCode((v[i] * factor) * up, qn, qp);
    if (q_rows != nullptr) {
#pragma unroll
      for (int i = 0; i < TR; ++i) q_rows[(r0 + i) * S + c] = code[i];
    }
    if (q_cols == nullptr) continue;
    if constexpr (TR >= 4) {  // c * R + r0 is a multiple of 4 (TR divides R)
      uint32_t words[TR / 4];
#pragma unroll
      for (int w = 0; w < TR / 4; ++w) {
        words[w] = static_cast<uint32_t>(static_cast<uint8_t>(code[4 * w])) |
                   (static_cast<uint32_t>(static_cast<uint8_t>(code[4 * w + 1])) << 8) |
                   (static_cast<uint32_t>(static_cast<uint8_t>(code[4 * w + 2])) << 16) |
                   (static_cast<uint32_t>(static_cast<uint8_t>(code[4 * w + 3])) << 24);
      }
      if (TR >= 16 && wide) {  // 16-byte stores: a warp's store covers half
        // of each of its 32 sectors instead of an eighth (4-byte stores).
        uint4* out = reinterpret_cast<uint4*>(q_cols + c * R + r0);
#pragma unroll
        for (int w = 0; w < TR / 16; ++w) {
          out[w] = make_uint4(words[4 * w], words[4 * w + 1], words[4 * w + 2], words[4 * w + 3]);
        }
      } else {
        uint32_t* out = reinterpret_cast<uint32_t*>(q_cols + c * R + r0);
#pragma unroll
        for (int w = 0; w < TR / 4; ++w) out[w] = words[w];
      }
    } else {
#pragma unroll
      for (int i = 0; i < TR; ++i) q_cols[c * R + r0 + i] = code[i];
    }
  }
  if (bad && col_poison != nullptr) col_poison[c] = QuietNaN();
}

template <typename T>
void LaunchColumnsReg(int max_log2, dim3 grid, cudaStream_t stream, const T* x, int64_t R,
                      int64_t S, const float* step, const int32_t* log2, int qn, int qp,
                      bool wide, int8_t* q_rows, int8_t* q_cols, float* col_poison) {
  switch (max_log2) {
#define JINT4_COLS_CASE(LG)                                                            \
  case LG:                                                                             \
    HadamardQuantizeColumnsRegKernel<T, 1 << LG><<<grid, kColThreads, 0, stream>>>(   \
        x, R, S, step, log2, max_log2, qn, qp, wide, q_rows, q_cols, col_poison);      \
    break;
    JINT4_COLS_CASE(0)
    JINT4_COLS_CASE(1)
    JINT4_COLS_CASE(2)
    JINT4_COLS_CASE(3)
    JINT4_COLS_CASE(4)
    JINT4_COLS_CASE(5)
#undef JINT4_COLS_CASE
    default: break;
  }
}

// axis = 0 (Hadamard down the columns of x[R, S]) into q_rows[R, S] and/or
// q_cols[S, R] (null: not written), one pass over x; col_poison (null: not
// written; else zeroed by the caller) gets NaN at every column holding a NaN
// or Inf.
ffi::Error QuantizeColumns(cudaStream_t stream, FloatKind kind, const void* x, int64_t R,
                           int64_t S, const float* step_p, const int32_t* log2_p, int qn,
                           int qp, int32_t log2_hint, int8_t* q_rows, int8_t* q_cols,
                           float* col_poison, const char* op) {
  int max_log2;
  dim3 grid;
  if (!ColumnTiling(R, S, log2_hint, kColTile, &max_log2, &grid)) {
    return InvalidArgument(std::string(op) + ": too large");
  }
  // (ColumnTiling caps max_log2 at the static block, so a traced block
  // larger than 32 rows takes the shared-memory kernel below.)
  if (max_log2 <= 5) {
    const int64_t col_blocks = CeilDiv(S, kColThreads);
    const int64_t row_tiles = R >> max_log2;
    if (col_blocks > 0x7FFFFFFF) return InvalidArgument(std::string(op) + ": too large");
    const bool wide = R % 16 == 0 && (reinterpret_cast<uintptr_t>(q_cols) & 15) == 0;
    const dim3 rgrid(static_cast<unsigned>(col_blocks),
                     static_cast<unsigned>(row_tiles < 65535 ? row_tiles : 65535));
    DispatchFloat(kind, [&](auto tag) {
      using T = decltype(tag);
      LaunchColumnsReg<T>(max_log2, rgrid, stream, reinterpret_cast<const T*>(x), R, S, step_p,
                          log2_p, qn, qp, wide, q_rows, q_cols, col_poison);
    });
    return CheckLaunch((std::string(op) + " (axis 0) kernel launch").c_str());
  }
  DispatchFloat(kind, [&](auto tag) {
    using T = decltype(tag);
    HadamardQuantizeColumnsKernel<T><<<grid, kHqThreads, 0, stream>>>(
        reinterpret_cast<const T*>(x), R, S, step_p, log2_p, max_log2, qn, qp, q_rows, q_cols,
        col_poison);
  });
  return CheckLaunch((std::string(op) + " (axis 0) kernel launch").c_str());
}

ffi::Error HadamardQuantizeImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                                ffi::AnyBuffer x, ffi::AnyBuffer step,
                                ffi::AnyBuffer seed, ffi::AnyBuffer log2_block,
                                ffi::Result<ffi::AnyBuffer> q,
                                ffi::Result<ffi::AnyBuffer> nibbles,
                                ffi::Result<ffi::AnyBuffer> flags,
                                ffi::Result<ffi::AnyBuffer> norms, int32_t qn,
                                int32_t qp, int32_t with_residual, int32_t axis,
                                int32_t transpose, int32_t log2_hint) {
  const FloatKind kind = KindOf(x.element_type());
  if (kind == FloatKind::kInvalid || step.element_type() != ffi::DataType::F32 ||
      seed.element_type() != ffi::DataType::U32 ||
      log2_block.element_type() != ffi::DataType::S32 ||
      q->element_type() != ffi::DataType::S8 ||
      nibbles->element_type() != ffi::DataType::U8 ||
      flags->element_type() != ffi::DataType::U8 ||
      norms->element_type() != ffi::DataType::F32) {
    return InvalidArgument("hadamard_quantize: x must be f32/bf16/f16, step f32, seed u32,"
                           " log2_block s32; results s8, u8, u8, f32");
  }
  ffi::Error range = CheckQuantRange(qn, qp, "hadamard_quantize");
  if (range.failure()) return range;
  if ((axis != 0 && axis != 1) || (transpose != 0 && transpose != 1)) {
    return InvalidArgument("hadamard_quantize: axis and transpose must be 0 or 1");
  }
  if (with_residual && (axis != 1 || transpose)) {
    return InvalidArgument("hadamard_quantize: a residual needs axis=1, transpose=0");
  }
  auto dims = x.dimensions();
  auto qd = q->dimensions();
  if (dims.size() != 2 || qd.size() != 2) {
    return InvalidArgument("hadamard_quantize: x and q must be rank 2");
  }
  const int64_t R = dims[0], S = dims[1];
  if (qd[0] != (transpose ? S : R) || qd[1] != (transpose ? R : S)) {
    return InvalidArgument("hadamard_quantize: q must be x's shape ([S, R] with transpose)");
  }
  if (step.element_count() < 1 || seed.element_count() < 2 ||
      log2_block.element_count() < 1) {
    return InvalidArgument("hadamard_quantize: step, seed[2], log2_block required");
  }
  const int64_t total = R * S;
  const int planes = qn <= 7 ? 1 : 2;
  const int64_t P = with_residual ? CeilDiv(total, 2) : 0;
  const int64_t Q = with_residual ? CeilDiv(total, 8) : 0;
  if (static_cast<int64_t>(nibbles->element_count()) != P ||
      static_cast<int64_t>(norms->element_count()) != (with_residual ? R : 0)) {
    return InvalidArgument("hadamard_quantize: nibbles must have ceil(R*S/2) bytes and"
                           " norms R floats (both empty without residual)");
  }
  if (with_residual) {
    auto fd = flags->dimensions();
    if (fd.size() != 2 || fd[0] != planes || fd[1] != Q) {
      return InvalidArgument("hadamard_quantize: flags must be u8[F, ceil(R*S/8)]");
    }
  } else if (flags->element_count() != 0) {
    return InvalidArgument("hadamard_quantize: flags must be empty without residual");
  }
  if (total == 0) return ffi::Error::Success();

  const float* step_p = reinterpret_cast<const float*>(step.untyped_data());
  const int32_t* log2_p = reinterpret_cast<const int32_t*>(log2_block.untyped_data());
  int8_t* q_p = reinterpret_cast<int8_t*>(q->untyped_data());
  if (axis == 0) {
    return QuantizeColumns(stream, kind, x.untyped_data(), R, S, step_p, log2_p, qn, qp,
                           log2_hint, transpose ? nullptr : q_p, transpose ? q_p : nullptr,
                           nullptr, "hadamard_quantize");
  }

  int* row_sum = nullptr;
  int* row_bad = nullptr;
  if (with_residual) {
    const size_t bytes = sizeof(int) * static_cast<size_t>(2 * R);
    void* buf = nullptr;
    if (!AllocateScratch(scratch, bytes, &buf)) return ScratchError(bytes);
    row_sum = reinterpret_cast<int*>(buf);
    row_bad = row_sum + R;
    ffi::Error err = CheckCuda("hadamard_quantize memset", cudaMemsetAsync(buf, 0, bytes, stream));
    if (err.failure()) return err;
  }
  const int max_log2 = MaxLog2Block(S);
  const int64_t chunks = CeilDiv(total, kHqChunk);
  if (chunks > 0x7FFFFFFF) return InvalidArgument("hadamard_quantize: too large");
  uint8_t* nib_p = reinterpret_cast<uint8_t*>(nibbles->untyped_data());
  uint8_t* flag_p = reinterpret_cast<uint8_t*>(flags->untyped_data());
  const uint32_t* seed_p = reinterpret_cast<const uint32_t*>(seed.untyped_data());
  // Full chunks with aligned pointers: the register kernel; the rest (the
  // partial last chunk, or everything when misaligned): the general one.
  const bool aligned = (reinterpret_cast<uintptr_t>(x.untyped_data()) & 15) == 0 &&
                       (reinterpret_cast<uintptr_t>(q_p) & 7) == 0 &&
                       (!with_residual || (reinterpret_cast<uintptr_t>(nib_p) & 3) == 0);
  const int64_t full = aligned ? total / kHqChunk : 0;
  // Warps of 256 elements never straddle a row when K % 256 == 0.
  const uint32_t k256 =
      (S % 256 == 0 && (total >> 40) == 0) ? static_cast<uint32_t>(S / 256) : 0u;
  DispatchFloat(kind, [&](auto tag) {
    using T = decltype(tag);
    const T* x_p = reinterpret_cast<const T*>(x.untyped_data());
    if (full > 0) {
      const unsigned fb = static_cast<unsigned>(CeilDiv(full, kHqChunksPerBlock));
      auto kernel = !with_residual ? HadamardQuantizeChunksKernel<T, false, false>
                    : k256 != 0    ? HadamardQuantizeChunksKernel<T, true, true>
                                   : HadamardQuantizeChunksKernel<T, true, false>;
      kernel<<<fb, kHqThreads, 0, stream>>>(x_p, full, S, step_p, seed_p, log2_p, max_log2,
                                            qn, qp, planes, q_p, nib_p, flag_p, Q, k256,
                                            row_sum, row_bad);
    }
    if (chunks > full) {
      HadamardQuantizeKernel<T><<<static_cast<unsigned>(chunks - full), kHqThreads, 0, stream>>>(
          x_p, total, S, step_p, seed_p, log2_p, max_log2, qn, qp, with_residual ? 1 : 0,
          planes, q_p, nib_p, flag_p, Q, row_sum, row_bad, full);
    }
  });
  if (with_residual) {
    int64_t nb = CeilDiv(R, kHqThreads);
    nb = nb < 1 ? 1 : (nb > 4096 ? 4096 : nb);
    RowNormsKernel<<<static_cast<unsigned>(nb), kHqThreads, 0, stream>>>(
        R, row_sum, row_bad, reinterpret_cast<float*>(norms->untyped_data()));
  }
  return CheckLaunch("hadamard_quantize kernel launch");
}

// jint4_hadamard_quantize_weight: a Flax kernel[D, C]'s two GEMM operands in
// one pass, Hb down its columns: q_t[C, D] (the forward's, K-major over D)
// and q[D, C] (the dX GEMM's, K-major over C), the same codes as two
// axis-0 jint4_hadamard_quantize calls (transpose 1 and 0).
ffi::Error HadamardQuantizeWeightImpl(cudaStream_t stream, ffi::AnyBuffer x,
                                      ffi::AnyBuffer step, ffi::AnyBuffer log2_block,
                                      ffi::Result<ffi::AnyBuffer> q_t,
                                      ffi::Result<ffi::AnyBuffer> q,
                                      ffi::Result<ffi::AnyBuffer> col_poison, int32_t qn,
                                      int32_t qp, int32_t log2_hint) {
  const FloatKind kind = KindOf(x.element_type());
  if (kind == FloatKind::kInvalid || step.element_type() != ffi::DataType::F32 ||
      log2_block.element_type() != ffi::DataType::S32 ||
      q_t->element_type() != ffi::DataType::S8 || q->element_type() != ffi::DataType::S8 ||
      col_poison->element_type() != ffi::DataType::F32) {
    return InvalidArgument("hadamard_quantize_weight: x must be f32/bf16/f16, step f32,"
                           " log2_block s32; results s8, s8, f32");
  }
  ffi::Error range = CheckQuantRange(qn, qp, "hadamard_quantize_weight");
  if (range.failure()) return range;
  auto dims = x.dimensions();
  if (dims.size() != 2 || q_t->dimensions().size() != 2 || q->dimensions().size() != 2) {
    return InvalidArgument("hadamard_quantize_weight: x, q_t and q must be rank 2");
  }
  const int64_t R = dims[0], S = dims[1];
  if (q_t->dimensions()[0] != S || q_t->dimensions()[1] != R || q->dimensions()[0] != R ||
      q->dimensions()[1] != S || col_poison->dimensions().size() != 1 ||
      col_poison->dimensions()[0] != S) {
    return InvalidArgument("hadamard_quantize_weight: need q_t [S, R], q [R, S] and"
                           " col_poison [S] for x [R, S]");
  }
  if (step.element_count() < 1 || log2_block.element_count() < 1) {
    return InvalidArgument("hadamard_quantize_weight: step and log2_block required");
  }
  float* poison = reinterpret_cast<float*>(col_poison->untyped_data());
  if (S > 0) {  // 0 everywhere; the kernels store NaN at non-finite columns
    ffi::Error err = CheckCuda("hadamard_quantize_weight memset",
                               cudaMemsetAsync(poison, 0, S * sizeof(float), stream));
    if (err.failure()) return err;
  }
  if (R * S == 0) return ffi::Error::Success();
  return QuantizeColumns(stream, kind, x.untyped_data(), R, S,
                         reinterpret_cast<const float*>(step.untyped_data()),
                         reinterpret_cast<const int32_t*>(log2_block.untyped_data()), qn, qp,
                         log2_hint, reinterpret_cast<int8_t*>(q->untyped_data()),
                         reinterpret_cast<int8_t*>(q_t->untyped_data()), poison,
                         "hadamard_quantize_weight");
}

}  // namespace
}  // namespace cuda
}  // namespace jint4

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_hadamard_quantize, jint4::cuda::HadamardQuantizeImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::ScratchAllocator>()
        .Arg<xla::ffi::AnyBuffer>()     // x f32 | bf16 | f16 [R, S]
        .Arg<xla::ffi::AnyBuffer>()     // step f32[]
        .Arg<xla::ffi::AnyBuffer>()     // seed u32[2]
        .Arg<xla::ffi::AnyBuffer>()     // log2_block s32[]
        .Ret<xla::ffi::AnyBuffer>()     // q s8[R, S] or [S, R]
        .Ret<xla::ffi::AnyBuffer>()     // nibbles u8[P]
        .Ret<xla::ffi::AnyBuffer>()     // flags u8[F, Q]
        .Ret<xla::ffi::AnyBuffer>()     // norms f32[R] or [0]
        .Attr<int32_t>("qn")
        .Attr<int32_t>("qp")
        .Attr<int32_t>("with_residual")
        .Attr<int32_t>("axis")
        .Attr<int32_t>("transpose")
        .Attr<int32_t>("log2_hint"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_hadamard_quantize_weight, jint4::cuda::HadamardQuantizeWeightImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()     // x f32 | bf16 | f16 [R, S]
        .Arg<xla::ffi::AnyBuffer>()     // step f32[]
        .Arg<xla::ffi::AnyBuffer>()     // log2_block s32[]
        .Ret<xla::ffi::AnyBuffer>()     // q_t s8[S, R]
        .Ret<xla::ffi::AnyBuffer>()     // q s8[R, S]
        .Ret<xla::ffi::AnyBuffer>()     // col_poison f32[S]
        .Attr<int32_t>("qn")
        .Attr<int32_t>("qp")
        .Attr<int32_t>("log2_hint"));
